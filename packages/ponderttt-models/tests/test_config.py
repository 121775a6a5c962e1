"""Configs: presets at the released dimensions, HF config parsing in both transformers formats, clear errors."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest
from flax import nnx

from ponderttt.models import Gemma3Config, GPT2Config, ModelConfig, build_model, config_from_hf, preset


def _param_count(config) -> int:
    abstract = nnx.eval_shape(lambda: build_model(config, dtype=jnp.bfloat16, rngs=nnx.Rngs(0)))
    return sum(x.size for x in jax.tree.leaves(nnx.state(abstract, nnx.Param)))


@pytest.mark.parametrize(
    ("name", "params_millions"),
    [
        ("gpt2-125m", 124.4),
        pytest.param("gpt2-355m", 354.8, marks=pytest.mark.slow),
    ],
)
def test_gpt2_presets_have_the_released_parameter_counts(name, params_millions):
    assert _param_count(preset(name)) / 1e6 == pytest.approx(params_millions, abs=0.1)


@pytest.mark.parametrize(
    ("name", "params_billions"),
    [
        ("gemma3-1b", 1.000),
        pytest.param("gemma3-4b", 3.880, marks=pytest.mark.slow),
        pytest.param("gemma3-27b", 27.009, marks=pytest.mark.slow),  # 12b: same code path, 11.766
    ],
)
def test_gemma3_presets_have_the_released_text_parameter_counts(name, params_billions):
    # Text-model parameter counts of google/gemma-3-*: 999.9M, 3.88B, 11.77B, 27.01B.
    assert _param_count(preset(name)) / 1e9 == pytest.approx(params_billions, abs=0.01)


def test_gemma3_presets_layer_pattern_and_rope():
    cfg = Gemma3Config.gemma3_27b()
    assert cfg.layer_types[:6] == ("sliding_attention",) * 5 + ("full_attention",)
    assert cfg.layer_types.count("full_attention") == 10
    assert cfg.head_dim == 128 and cfg.query_pre_attn_scalar == 168 and cfg.rope_global_scale == 8.0
    assert Gemma3Config.gemma3_1b().rope_global_scale == 1.0 and Gemma3Config.gemma3_1b().sliding_window == 512


def test_gemma3_config_from_transformers_4_format():
    hf = {
        "model_type": "gemma3",
        "text_config": {
            "model_type": "gemma3_text",
            "hidden_size": 2560,
            "intermediate_size": 10240,
            "num_hidden_layers": 34,
            "rope_scaling": {"factor": 8.0, "rope_type": "linear"},
            "sliding_window": 1024,
        },
    }
    assert config_from_hf(hf) == Gemma3Config.gemma3_4b()


def test_gpt2_config_from_hf_and_errors():
    assert config_from_hf({"model_type": "gpt2", "n_embd": 1600, "n_layer": 48, "n_head": 25}) == GPT2Config.gpt2_1_5b()
    with pytest.raises(ValueError, match="model_type='llama' is not supported"):
        config_from_hf({"model_type": "llama"})
    with pytest.raises(ValueError, match="n_embd=100 is not divisible by n_head=3"):
        GPT2Config(n_embd=100, n_head=3)
    with pytest.raises(ValueError, match="rope_type='yarn' is not supported"):
        config_from_hf({"model_type": "gemma3_text", "rope_scaling": {"rope_type": "yarn", "factor": 2.0}})
    with pytest.raises(ValueError, match="unknown preset 'gpt3'"):
        preset("gpt3")
    with pytest.raises(ValueError, match="num_heads=6 is not a multiple of num_kv_heads=4"):
        Gemma3Config(num_heads=6, num_kv_heads=4)


@pytest.mark.parametrize("name", ["gpt2-125m", "gemma3-1b"])
def test_both_configs_answer_the_model_config_protocol(name):
    cfg = preset(name)
    assert isinstance(cfg, ModelConfig)
    assert cfg.num_heads % cfg.num_kv_heads == 0 and cfg.head_dim * cfg.num_heads >= cfg.hidden_size // 2
    if name.startswith("gpt2"):
        assert (cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.mlp_size) == (12, 12, 64, 3072)
        assert (cfg.norm, cfg.gated_mlp, cfg.position_limit, cfg.max_positions) == ("layernorm", False, 1024, 1024)
    else:
        assert (cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.mlp_size) == (4, 1, 256, 6912)
        assert (cfg.norm, cfg.gated_mlp, cfg.position_limit) == ("rmsnorm", True, None)
        assert cfg.max_positions == 32768
