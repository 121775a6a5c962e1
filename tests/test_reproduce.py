"""`uv run apps/train reproduce`: the pipeline per backbone scale on HF directories, then the published tables."""

import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

APP = pathlib.Path(__file__).resolve().parents[1] / "apps" / "train"


def tokenizer_json(folder: pathlib.Path, vocab_size: int) -> int:
    """A byte-level BPE trained on a few standard-library files, saved as tokenizer.json; returns its size."""
    import tokenizers
    from tokenizers import decoders, models, pre_tokenizers, trainers

    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    texts = [pathlib.Path(m.__file__).read_text() for m in (json, os, pathlib, subprocess)]
    tok.train_from_iterator(texts, trainer)
    tok.save(str(folder / "tokenizer.json"))
    return tok.get_vocab_size()


def hf_gpt2(folder: pathlib.Path, *, n_embd: int, n_layer: int = 2, n_head: int = 2, n_positions: int = 128,
            seed: int = 0) -> None:
    """A randomly initialised GPT-2 as an HF directory: config.json, model.safetensors (HF names and Conv1D
    layouts), tokenizer.json."""
    from safetensors.numpy import save_file

    folder.mkdir(parents=True)
    vocab = tokenizer_json(folder, 400)
    rng = np.random.default_rng(seed)
    c, inner = n_embd, 4 * n_embd

    def normal(*shape: int) -> np.ndarray:
        return rng.normal(0.0, 0.02, shape).astype(np.float32)

    tensors = {"transformer.wte.weight": normal(vocab, c), "transformer.wpe.weight": normal(n_positions, c),
               "transformer.ln_f.weight": np.ones(c, np.float32), "transformer.ln_f.bias": np.zeros(c, np.float32)}
    for i in range(n_layer):
        p = f"transformer.h.{i}."
        tensors.update({
            p + "ln_1.weight": np.ones(c, np.float32), p + "ln_1.bias": np.zeros(c, np.float32),
            p + "ln_2.weight": np.ones(c, np.float32), p + "ln_2.bias": np.zeros(c, np.float32),
            p + "attn.c_attn.weight": normal(c, 3 * c), p + "attn.c_attn.bias": np.zeros(3 * c, np.float32),
            p + "attn.c_proj.weight": normal(c, c), p + "attn.c_proj.bias": np.zeros(c, np.float32),
            p + "mlp.c_fc.weight": normal(c, inner), p + "mlp.c_fc.bias": np.zeros(inner, np.float32),
            p + "mlp.c_proj.weight": normal(inner, c), p + "mlp.c_proj.bias": np.zeros(c, np.float32),
        })
    save_file(tensors, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps({
        "model_type": "gpt2", "architectures": ["GPT2LMHeadModel"], "vocab_size": vocab, "n_positions": n_positions,
        "n_embd": c, "n_layer": n_layer, "n_head": n_head, "n_inner": None, "activation_function": "gelu_new",
        "layer_norm_epsilon": 1e-5, "tie_word_embeddings": True}))


@pytest.mark.slow
def test_reproduce_two_scales_then_the_published_tables(tmp_path):
    root = tmp_path / "checkpoints"
    hf_gpt2(root / "gpt2", n_embd=32, seed=0)
    hf_gpt2(root / "gpt2-medium", n_embd=48, n_head=4, seed=1)
    out = tmp_path / "out"
    env = dict(os.environ, COLUMNS="250", JAX_PLATFORMS="cpu")
    proc = subprocess.run(
        [sys.executable, str(APP), "reproduce", "--preset", "smoke", "--scales", "125m", "350m", "--backbone-root",
         str(root), "--output-dir", str(out), "--name", "rep", "--no-progress", "--adapter.train-steps", "4",
         "--gate.gates", "--compare.methods", "skip", "update_1", "oracle", "recon", "--compare.protocols", "reset",
         "--compare.n-resamples", "20"],  # the gates and carry have their own tests: keep this one short
        capture_output=True, text=True, timeout=900, env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-4000:]
    per_scale = {}
    for scale in ("125m", "350m"):
        doc = json.loads((out / f"rep-{scale}" / "results.json").read_text())
        assert {r["method"] for r in doc["results"]} == {"skip", "update_1", "oracle", "recon"}
        per_scale[scale] = doc
    text = (out / "rep" / "scaling.md").read_text()
    assert "| Scale | Language | Baseline (SKIP) | Oracle | recon @ 0.5 | Oracle Capture |" in text
    summary = json.loads((out / "rep" / "scaling.json").read_text())
    for scale, doc in per_scale.items():
        recon = next(r for r in doc["results"] if r["method"] == "recon" and r["budget"] == 0.5)
        assert summary[scale]["record"]["loss"] == recon["loss"]
        assert f"| {scale} | python | {recon['loss_skip']:.3f} | {recon['loss_oracle']:.3f} | {recon['loss']:.3f} |" \
            in text
        assert len([line for line in text.splitlines() if line.startswith(f"| {scale} |")]) == 2  # both tables
