"""save_hf_causal_lm: HF directories that load back exactly, with HF's tensor names, layouts and config fields."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from safetensors import safe_open

from ponderttt.models import (
    BACKBONE,
    AdaptedLM,
    AdapterSpec,
    Gemma3Config,
    GPT2Config,
    build_model,
    config_from_hf,
    load_hf_causal_lm,
    save_hf_causal_lm,
)
from ponderttt.ttt import TTTConfig

FIXTURES = ("gpt2_tiny", "gemma3_tiny", "gemma3_untied")


def backbone_params(model) -> dict[str, np.ndarray]:
    flat = nnx.to_flat_state(nnx.state(model, BACKBONE))
    return {".".join(map(str, p)): np.asarray(v.get_value()) for p, v in flat}


def tensors_of(folder) -> dict[str, np.ndarray]:
    out = {}
    for file in sorted(folder.glob("*.safetensors")):
        with safe_open(str(file), framework="numpy") as f:
            out.update({k: f.get_tensor(k) for k in f.keys()})
    return out


@nnx.jit
def logits(model, ids):
    return model(ids).logits


@pytest.mark.parametrize("name", FIXTURES)
def test_loaded_checkpoint_saves_back_to_the_same_tensors_and_config(tmp_path, hf_data, name):
    src = hf_data.dir(name)
    model = load_hf_causal_lm(src)
    out = save_hf_causal_lm(model, tmp_path / "saved")
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
    original, saved = tensors_of(src), tensors_of(out)
    assert sorted(saved) == sorted(original)  # the names save_pretrained writes; a tied head is not written
    for key, value in original.items():
        np.testing.assert_array_equal(saved[key], value, err_msg=key)
    fields = json.loads((out / "config.json").read_text())
    hf_fields = json.loads((src / "config.json").read_text())
    assert fields["model_type"] == hf_fields["model_type"] and fields["architectures"] == hf_fields["architectures"]
    assert config_from_hf(fields) == config_from_hf(hf_fields) == model.config
    with safe_open(str(out / "model.safetensors"), framework="numpy") as f:
        assert f.metadata() == {"format": "pt"}  # transformers refuses safetensors files without it


@pytest.mark.parametrize(
    "config",
    [
        GPT2Config(vocab_size=50, n_positions=16, n_embd=12, n_layer=2, n_head=3, n_inner=20, tie_word_embeddings=False),  # noqa: E501
        Gemma3Config(
            vocab_size=40, hidden_size=16, intermediate_size=24, num_layers=3, num_heads=4, num_kv_heads=2, head_dim=6,
            query_pre_attn_scalar=9.0, sliding_window=3, rope_global_scale=4.0, final_logit_softcapping=5.0,
            max_position_embeddings=64,
        ),
    ],
    ids=["gpt2_untied", "gemma3_tied"],
)  # fmt: skip
def test_built_model_round_trips_exactly(tmp_path, config):
    model = build_model(config, rngs=nnx.Rngs(4))
    for _, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):  # no parameter keeps its init constant
        var.set_value(var.get_value() + 0.1 * jax.random.normal(jax.random.key(var.size), var.shape))
    folder = save_hf_causal_lm(model, tmp_path / "m", config={"bos_token_id": 1, "eos_token_id": 2})
    fields = json.loads((folder / "config.json").read_text())
    assert fields["bos_token_id"] == 1 and fields["eos_token_id"] == 2 and fields["dtype"] == "float32"
    back = load_hf_causal_lm(folder)
    assert back.config == config
    mine, theirs = backbone_params(model), backbone_params(back)
    assert sorted(mine) == sorted(theirs)
    for key in mine:
        np.testing.assert_array_equal(theirs[key], mine[key], err_msg=key)
    ids = np.arange(10, dtype=np.int32).reshape(2, 5) % config.vocab_size
    np.testing.assert_array_equal(np.asarray(logits(back, ids)), np.asarray(logits(model, ids)))


def test_bf16_sharded_files_and_dtype_cast(tmp_path, hf_data):
    model = load_hf_causal_lm(hf_data.dir("gemma3_tiny"))
    folder = save_hf_causal_lm(model, tmp_path / "bf16", dtype=jnp.bfloat16, max_shard_bytes=4000)
    files = sorted(p.name for p in folder.glob("*.safetensors"))
    assert len(files) > 2 and files[0] == f"model-00001-of-{len(files):05d}.safetensors"
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    tensors = tensors_of(folder)
    assert set(index["weight_map"]) == set(tensors) and set(index["weight_map"].values()) == set(files)
    assert index["metadata"]["total_size"] == sum(v.nbytes for v in tensors.values())
    assert {str(v.dtype) for v in tensors.values()} == {"bfloat16"}
    assert json.loads((folder / "config.json").read_text())["dtype"] == "bfloat16"
    back = load_hf_causal_lm(folder, dtype=jnp.bfloat16)
    for key, value in backbone_params(model).items():
        np.testing.assert_array_equal(backbone_params(back)[key], value.astype(jnp.bfloat16), err_msg=key)


def test_adapters_are_not_written_and_the_directory_appears_atomically(tmp_path, hf_data):
    backbone = load_hf_causal_lm(hf_data.dir("gpt2_tiny"))
    spec = AdapterSpec(TTTConfig.tiny(hidden_size=30, num_heads=3, chunk_size=4), sites=("head", 0))
    model = AdaptedLM(backbone, spec)
    folder = save_hf_causal_lm(model, tmp_path / "m")
    assert sorted(tensors_of(folder)) == sorted(tensors_of(hf_data.dir("gpt2_tiny")))
    with pytest.raises(FileExistsError, match="overwrite=True"):
        save_hf_causal_lm(model, folder)
    (folder / "stale.txt").write_text("from an older save")
    save_hf_causal_lm(model, folder, overwrite=True)
    assert not (folder / "stale.txt").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]  # no temporary or old directory left behind
    with pytest.raises(ValueError, match="model_type"):
        save_hf_causal_lm(model, tmp_path / "x", config={"model_type": "llama"})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]
