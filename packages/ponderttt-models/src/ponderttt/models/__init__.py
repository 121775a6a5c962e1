"""ponderttt.models: NNX backbones (GPT-2, Gemma 3), HF safetensors loading, TTT insertion, generation, sharding."""

from importlib.metadata import version as _version

from ponderttt.models.adapter import (
    ADAPTER_KINDS,
    BACKBONE,
    PROTOCOLS,
    TRAINABLE,
    AdaptedLM,
    AdapterSpec,
    ChunkStep,
    FastState,
    TTTControl,
    adapt,
    count_params,
    trainable_state,
)
from ponderttt.models.config import (
    PRESETS,
    AssetError,
    Gemma3Config,
    GPT2Config,
    ModelConfig,
    config_from_hf,
    load_hf_config,
    preset,
)
from ponderttt.models.hf import HFTokenizer, load_hf_causal_lm, load_hf_tokenizer, save_hf_causal_lm
from ponderttt.models.model import GPT2, BackboneOutput, CausalLM, Gemma3, KVCache, ModelOutput, build_model
from ponderttt.models.sharding import (
    LOGICAL_RULES,
    constrain,
    init_sharded,
    logical_to_spec,
    make_mesh,
    shard_model,
    state_specs,
)

__version__ = _version(__name__.replace(".", "-"))

__all__ = [
    "ADAPTER_KINDS",
    "BACKBONE",
    "PROTOCOLS",
    "TRAINABLE",
    "AdaptedLM",
    "AdapterSpec",
    "AssetError",
    "BackboneOutput",
    "ChunkStep",
    "FastState",
    "ModelConfig",
    "TTTControl",
    "adapt",
    "count_params",
    "trainable_state",
    "LOGICAL_RULES",
    "PRESETS",
    "CausalLM",
    "GPT2",
    "GPT2Config",
    "Gemma3",
    "Gemma3Config",
    "HFTokenizer",
    "KVCache",
    "ModelOutput",
    "build_model",
    "config_from_hf",
    "constrain",
    "init_sharded",
    "load_hf_causal_lm",
    "load_hf_config",
    "load_hf_tokenizer",
    "logical_to_spec",
    "make_mesh",
    "preset",
    "save_hf_causal_lm",
    "shard_model",
    "state_specs",
]
