"""A backbone directory whose files cannot be used stops the app with one line and exit status 2, before training."""

import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest
import tokenizers
from flax import nnx
from safetensors.numpy import load_file, save_file

from ponderttt.models import GPT2, GPT2Config, save_hf_causal_lm
from ponderttt.train import cli
from ponderttt.train.backbone import load_backbone
from ponderttt.train.config import BackboneConfig, ConfigError, PlatformConfig

APP = pathlib.Path(__file__).resolve().parents[1]
C_FC = "transformer.h.0.mlp.c_fc.weight"


@pytest.fixture
def backbone_dir(tmp_path) -> pathlib.Path:
    """A tiny HF GPT-2 directory (128 positions: the smoke preset's --data.seq-len) with its tokenizer."""
    config = GPT2Config(vocab_size=16, n_positions=128, n_embd=8, n_layer=1, n_head=2)
    folder = save_hf_causal_lm(GPT2(config, rngs=nnx.Rngs(0)), tmp_path / "gpt2")
    vocab = {"<unk>": 0, "<|endoftext|>": 1, **{f"w{i}": i for i in range(2, 16)}}
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    tok.save(str(folder / "tokenizer.json"))
    return folder


def with_nan(folder: pathlib.Path) -> None:
    tensors = load_file(folder / "model.safetensors")
    tensors[C_FC][0, 0] = np.nan
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})


def test_load_backbone_turns_asset_errors_into_one_line_config_errors(backbone_dir):
    platform = PlatformConfig()
    assert isinstance(load_backbone(BackboneConfig(path=str(backbone_dir)), platform, None, None), GPT2)

    with_nan(backbone_dir)
    with pytest.raises(ConfigError) as info:
        load_backbone(BackboneConfig(path=str(backbone_dir)), platform, None, None)
    assert str(info.value) == (f"--backbone.path: {backbone_dir / 'model.safetensors'}: tensor '{C_FC}' has 1 "
                               "non-finite (NaN or Inf) values of 256 read as float32; pass allow_non_finite=True to "
                               "load it anyway")

    config = json.loads((backbone_dir / "config.json").read_text())
    (backbone_dir / "config.json").write_text(json.dumps({**config, "n_embd": "abc"}))
    with pytest.raises(ConfigError) as info:
        load_backbone(BackboneConfig(path=str(backbone_dir)), platform, None, None)
    assert str(info.value) == f"--backbone.path: {backbone_dir / 'config.json'}: n_embd='abc' must be an integer"


def test_the_app_exits_2_with_one_line_before_training(backbone_dir, tmp_path):
    with_nan(backbone_dir)
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, str(APP), "ttt", "--preset", "smoke", "--backbone.path", str(backbone_dir),
                           "--output-dir", str(out), "--name", "r"], capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, COLUMNS="250"))
    assert proc.returncode == cli.EXIT_USAGE, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if "error" in line.lower()]
    assert errors == [f"error: --backbone.path: {backbone_dir / 'model.safetensors'}: tensor '{C_FC}' has 1 non-finite "
                      "(NaN or Inf) values of 256 read as float32; pass allow_non_finite=True to load it anyway"]
    assert "Traceback" not in proc.stderr
    assert not (out / "r" / "checkpoints").exists()  # nothing was trained
