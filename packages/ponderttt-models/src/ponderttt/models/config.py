"""Architecture configs: frozen dataclasses with presets, built from HF `config.json` dicts and files too.

Only the architecture lives here. Dtypes, meshes and adapters are arguments of the model constructors,
so one config describes a checkpoint whatever it is run with. `AssetError` is the one error for a model file
that cannot be used (config.json here; safetensors in `hf`, tokenizer files in `tokenizer`).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import pathlib
from collections.abc import Mapping
from typing import Any, Literal, Protocol, runtime_checkable

GLOBAL_ATTENTION = "full_attention"
LOCAL_ATTENTION = "sliding_attention"

# HF activation names that all mean GELU with the tanh approximation.
_TANH_GELU_NAMES = ("gelu_new", "gelu_pytorch_tanh", "gelu_fast", "gelu")


class AssetError(ValueError):
    """A model file that cannot be used: config.json, a safetensors index or file, a tensor in it, a tokenizer file.

    The message is one line, `<path>: <problem>` (the file, and the tensor or field when there is one).
    """

    def __init__(self, path: str | os.PathLike[str], problem: str):
        self.path = pathlib.Path(path)
        self.problem = " ".join(str(problem).split())  # one line, whatever a wrapped library error held
        super().__init__(f"{self.path}: {self.problem}")

    def __reduce__(self) -> tuple[Any, ...]:
        return type(self), (self.path, self.problem)


def read_json_object(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The JSON object in file `path` (config.json, an index, tokenizer_config.json).

    Raises AssetError naming the file when it is empty, not UTF-8, not JSON, or holds something else than an object.
    """
    path = pathlib.Path(path)
    data = path.read_bytes()
    if not data.strip():
        raise AssetError(path, "the file is empty; expected a JSON object")
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise AssetError(path, f"not UTF-8 text (byte {data[err.start]:#04x} at offset {err.start})") from err
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        raise AssetError(path, f"not valid JSON ({err})") from err
    if not isinstance(value, dict):
        raise AssetError(path, f"holds a JSON {_json_kind(value)}, not an object")
    return value


def _json_kind(value: Any) -> str:
    """JSON's name for the type of a parsed value: object, array, string, number, boolean or null."""
    for kind, name in ((dict, "object"), (list, "array"), (str, "string"), (bool, "boolean"), (int | float, "number")):
        if isinstance(value, kind):
            return name
    return "null"


_EXPECTED = {int: "an integer", float: "a finite number", bool: "true or false", str: "a string",
             list: "an array", dict: "an object"}  # fmt: skip


def _field(hf: Mapping[str, Any], key: str, kind: type, default: Any, *, nullable: bool = False) -> Any:
    """hf[key], or `default` when absent, checked to be of `kind` (null allowed when `nullable`); a float field takes
    integers too. Raises ValueError naming the key and the value otherwise (true is not an integer here)."""
    value = hf.get(key, default)
    if value is None and nullable:
        return None
    if kind is float:
        ok = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
    else:
        ok = isinstance(value, kind) and (kind is bool or not isinstance(value, bool))
    if not ok:
        raise ValueError(f"{key}={value!r} must be {_EXPECTED[kind]}" + (" or null" if nullable else ""))
    return float(value) if kind is float else value


@dataclasses.dataclass(frozen=True)
class GPT2Config:
    """GPT-2 (radford et al. 2019) exactly as HF `GPT2LMHeadModel`: pre-LayerNorm, learned positions, tied head."""

    vocab_size: int = 50257
    n_positions: int = 1024
    n_embd: int = 768
    n_layer: int = 12
    n_head: int = 12
    n_inner: int | None = None  # None: 4 * n_embd
    layer_norm_epsilon: float = 1e-5
    scale_attn_weights: bool = True
    scale_attn_by_inverse_layer_idx: bool = False
    tie_word_embeddings: bool = True

    def __post_init__(self) -> None:
        _require_positive(self, "vocab_size", "n_positions", "n_embd", "n_layer", "n_head", "layer_norm_epsilon")
        if self.n_inner is not None:
            _require_positive(self, "n_inner")
        if self.n_embd % self.n_head:
            raise ValueError(f"GPT2Config: n_embd={self.n_embd} is not divisible by n_head={self.n_head}")

    @property
    def hidden_size(self) -> int:
        """Residual width C (HF `n_embd`)."""
        return self.n_embd

    @property
    def num_layers(self) -> int:
        """Number of transformer blocks (HF `n_layer`)."""
        return self.n_layer

    @property
    def head_dim(self) -> int:
        """Per-head width: n_embd // n_head (divisibility is checked at construction)."""
        return self.n_embd // self.n_head

    @property
    def mlp_size(self) -> int:
        """MLP hidden width: `n_inner`, or 4 * n_embd when it is None (as HF)."""
        return self.n_inner if self.n_inner is not None else 4 * self.n_embd

    @property
    def num_heads(self) -> int:
        """Query heads (HF `n_head`)."""
        return self.n_head

    @property
    def num_kv_heads(self) -> int:
        """Key/value heads: equal to `n_head` (GPT-2 has no grouped-query attention)."""
        return self.n_head

    @property
    def max_positions(self) -> int:
        """Size of the learned position table (HF `n_positions`)."""
        return self.n_positions

    @property
    def position_limit(self) -> int:
        """Learned position embeddings: no position at or past n_positions exists."""
        return self.n_positions

    @property
    def norm(self) -> Literal["layernorm", "rmsnorm"]:
        """Always "layernorm" (scale and bias)."""
        return "layernorm"

    @property
    def gated_mlp(self) -> bool:
        """Always False: c_fc → tanh GELU → c_proj."""
        return False

    @property
    def norm_eps(self) -> float:
        """LayerNorm epsilon (HF `layer_norm_epsilon`, 1e-5)."""
        return self.layer_norm_epsilon

    # Presets: the four released GPT-2 sizes (openai-community/gpt2, -medium, -large, -xl).
    @classmethod
    def gpt2_125m(cls) -> GPT2Config:
        """openai-community/gpt2: 12 layers, 12 heads, C = 768."""
        return cls(n_embd=768, n_layer=12, n_head=12)

    @classmethod
    def gpt2_355m(cls) -> GPT2Config:
        """openai-community/gpt2-medium: 24 layers, 16 heads, C = 1024."""
        return cls(n_embd=1024, n_layer=24, n_head=16)

    @classmethod
    def gpt2_774m(cls) -> GPT2Config:
        """openai-community/gpt2-large: 36 layers, 20 heads, C = 1280."""
        return cls(n_embd=1280, n_layer=36, n_head=20)

    @classmethod
    def gpt2_1_5b(cls) -> GPT2Config:
        """openai-community/gpt2-xl: 48 layers, 25 heads, C = 1600."""
        return cls(n_embd=1600, n_layer=48, n_head=25)

    @classmethod
    def from_hf(cls, hf: Mapping[str, Any]) -> GPT2Config:
        """From a HF GPT-2 `config.json` dict; missing keys take HF's defaults.

        Raises ValueError naming the field for a value of the wrong type or out of range, and for an activation
        other than tanh GELU (`gelu_new` and its aliases).
        """
        act = _field(hf, "activation_function", str, "gelu_new")
        if act not in _TANH_GELU_NAMES:
            raise ValueError(f"GPT-2 activation_function={act!r} is not supported; expected one of {_TANH_GELU_NAMES}")
        return cls(
            vocab_size=_field(hf, "vocab_size", int, 50257),
            n_positions=_field(hf, "n_positions", int, 1024),
            n_embd=_field(hf, "n_embd", int, 768),
            n_layer=_field(hf, "n_layer", int, 12),
            n_head=_field(hf, "n_head", int, 12),
            n_inner=_field(hf, "n_inner", int, None, nullable=True),
            layer_norm_epsilon=_field(hf, "layer_norm_epsilon", float, 1e-5),
            scale_attn_weights=_field(hf, "scale_attn_weights", bool, True),
            scale_attn_by_inverse_layer_idx=_field(hf, "scale_attn_by_inverse_layer_idx", bool, False),
            tie_word_embeddings=_field(hf, "tie_word_embeddings", bool, True),
        )


@dataclasses.dataclass(frozen=True)
class Gemma3Config:
    """Gemma 3 text decoder exactly as HF `Gemma3ForCausalLM` (and the language model of `gemma3` checkpoints).

    `layer_types[i]` is "sliding_attention" (local: window `sliding_window`, RoPE base `rope_local_base`) or
    "full_attention" (global: RoPE base `rope_global_base`, positions divided by `rope_global_scale`).
    """

    vocab_size: int = 262144
    hidden_size: int = 1152
    intermediate_size: int = 6912
    num_layers: int = 26
    num_heads: int = 4
    num_kv_heads: int = 1
    head_dim: int = 256
    rms_norm_eps: float = 1e-6
    query_pre_attn_scalar: float = 256.0
    sliding_window: int = 512
    layer_types: tuple[str, ...] | None = None  # None: 5 local then 1 global, repeated
    rope_global_base: float = 1_000_000.0
    rope_local_base: float = 10_000.0
    rope_global_scale: float = 1.0  # HF rope_type "linear" factor on global layers
    final_logit_softcapping: float | None = None
    tie_word_embeddings: bool = True
    max_position_embeddings: int = 32768

    def __post_init__(self) -> None:
        _require_positive(
            self, "vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads",
            "head_dim", "rms_norm_eps", "query_pre_attn_scalar", "sliding_window", "rope_global_base",
            "rope_local_base", "rope_global_scale", "max_position_embeddings",
        )  # fmt: skip
        if self.final_logit_softcapping is not None:
            _require_positive(self, "final_logit_softcapping")
        if self.layer_types is None:
            object.__setattr__(self, "layer_types", default_layer_types(self.num_layers))
        else:
            object.__setattr__(self, "layer_types", tuple(self.layer_types))
        if len(self.layer_types) != self.num_layers:
            raise ValueError(
                f"Gemma3Config: {len(self.layer_types)} layer_types given for num_layers={self.num_layers}"
            )
        bad = sorted(set(self.layer_types) - {GLOBAL_ATTENTION, LOCAL_ATTENTION})
        if bad:
            raise ValueError(f"Gemma3Config: unknown layer types {bad}; use {GLOBAL_ATTENTION!r}/{LOCAL_ATTENTION!r}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"Gemma3Config: num_heads={self.num_heads} is not a multiple of num_kv_heads={self.num_kv_heads}"
            )
        if self.head_dim % 2:
            raise ValueError(f"Gemma3Config: head_dim={self.head_dim} must be even for RoPE")

    @property
    def mlp_size(self) -> int:
        """Width of the gated MLP's gate/up projections (HF `intermediate_size`)."""
        return self.intermediate_size

    @property
    def max_positions(self) -> int:
        """HF `max_position_embeddings`: the trained context, not a hard limit (see `position_limit`)."""
        return self.max_position_embeddings

    @property
    def position_limit(self) -> None:
        """RoPE positions: no hard limit (HF does not stop at max_position_embeddings either)."""
        return None

    @property
    def norm(self) -> Literal["layernorm", "rmsnorm"]:
        """Always "rmsnorm" (Gemma's x / rms(x) * (1 + w))."""
        return "rmsnorm"

    @property
    def gated_mlp(self) -> bool:
        """Always True: down(gelu_tanh(gate(x)) * up(x))."""
        return True

    @property
    def norm_eps(self) -> float:
        """RMSNorm epsilon (HF `rms_norm_eps`, 1e-6)."""
        return self.rms_norm_eps

    # Presets at the released dimensions (google/gemma-3-{1b,4b,12b,27b}-pt, text part).
    @classmethod
    def gemma3_1b(cls) -> Gemma3Config:
        """google/gemma-3-1b-pt: 26 layers, 4 query / 1 kv heads, C = 1152, window 512, 32K positions."""
        return cls(
            vocab_size=262144, hidden_size=1152, intermediate_size=6912, num_layers=26, num_heads=4,
            num_kv_heads=1, head_dim=256, query_pre_attn_scalar=256, sliding_window=512,
            rope_global_scale=1.0, max_position_embeddings=32768,
        )  # fmt: skip

    @classmethod
    def gemma3_4b(cls) -> Gemma3Config:
        """google/gemma-3-4b-pt text model: 34 layers, 8 / 4 heads, C = 2560, window 1024, global RoPE x8."""
        return cls(
            vocab_size=262208, hidden_size=2560, intermediate_size=10240, num_layers=34, num_heads=8,
            num_kv_heads=4, head_dim=256, query_pre_attn_scalar=256, sliding_window=1024,
            rope_global_scale=8.0, max_position_embeddings=131072,
        )  # fmt: skip

    @classmethod
    def gemma3_12b(cls) -> Gemma3Config:
        """google/gemma-3-12b-pt text model: 48 layers, 16 / 8 heads, C = 3840, window 1024, global RoPE x8."""
        return cls(
            vocab_size=262208, hidden_size=3840, intermediate_size=15360, num_layers=48, num_heads=16,
            num_kv_heads=8, head_dim=256, query_pre_attn_scalar=256, sliding_window=1024,
            rope_global_scale=8.0, max_position_embeddings=131072,
        )  # fmt: skip

    @classmethod
    def gemma3_27b(cls) -> Gemma3Config:
        """google/gemma-3-27b-pt text model: 62 layers, 32 / 16 heads of 128, C = 5376, query scale 168."""
        return cls(
            vocab_size=262208, hidden_size=5376, intermediate_size=21504, num_layers=62, num_heads=32,
            num_kv_heads=16, head_dim=128, query_pre_attn_scalar=168, sliding_window=1024,
            rope_global_scale=8.0, max_position_embeddings=131072,
        )  # fmt: skip

    @classmethod
    def from_hf(cls, hf: Mapping[str, Any]) -> Gemma3Config:
        """From a HF `gemma3_text` config dict (transformers 4.5x `rope_*` keys or 5.x `rope_parameters`).

        Missing keys take `Gemma3TextConfig`'s defaults. Raises ValueError naming the field for a value of the wrong
        type or out of range, and for what this port does not implement: a non-tanh-GELU activation, attention_bias,
        bidirectional attention, RoPE types other than default/linear.
        """
        act = _field(hf, "hidden_activation", str, hf.get("hidden_act", "gelu_pytorch_tanh"))
        if act not in _TANH_GELU_NAMES:
            raise ValueError(f"Gemma 3 hidden_activation={act!r} is not supported; expected one of {_TANH_GELU_NAMES}")
        if _field(hf, "attention_bias", bool, False):
            raise ValueError("Gemma 3 attention_bias=True is not supported (no released Gemma 3 checkpoint uses it)")
        if _field(hf, "use_bidirectional_attention", bool, False, nullable=True):
            raise ValueError("Gemma 3 use_bidirectional_attention=True is not supported: this is a causal LM")
        # Missing keys take Gemma3TextConfig's defaults: released multimodal configs omit some of them.
        num_layers = _field(hf, "num_hidden_layers", int, 26)
        layer_types = _field(hf, "layer_types", list, None, nullable=True)
        if layer_types is None:
            pattern = _field(hf, "sliding_window_pattern", int, 6)
            if pattern <= 0:
                raise ValueError(f"sliding_window_pattern={pattern} must be positive")
            layer_types = default_layer_types(num_layers, pattern)
        if not all(isinstance(t, str) for t in layer_types):
            raise ValueError(f"layer_types={layer_types!r} must be an array of strings")
        global_rope, local_rope = _gemma3_rope(hf)
        return cls(
            vocab_size=_field(hf, "vocab_size", int, 262208),
            hidden_size=_field(hf, "hidden_size", int, 2304),
            intermediate_size=_field(hf, "intermediate_size", int, 9216),
            num_layers=num_layers,
            num_heads=_field(hf, "num_attention_heads", int, 8),
            num_kv_heads=_field(hf, "num_key_value_heads", int, 4),
            head_dim=_field(hf, "head_dim", int, 256),
            rms_norm_eps=_field(hf, "rms_norm_eps", float, 1e-6),
            query_pre_attn_scalar=_field(hf, "query_pre_attn_scalar", float, 256),
            sliding_window=_field(hf, "sliding_window", int, 4096),
            layer_types=tuple(layer_types),
            rope_global_base=global_rope[0],
            rope_global_scale=global_rope[1],
            rope_local_base=local_rope[0],
            # attn_logit_softcapping is ignored, as by HF's Gemma 3: Gemma 3 replaced it with q/k RMSNorm.
            final_logit_softcapping=_field(hf, "final_logit_softcapping", float, None, nullable=True),
            tie_word_embeddings=_field(hf, "tie_word_embeddings", bool, True),
            max_position_embeddings=_field(hf, "max_position_embeddings", int, 131072),
        )


def _require_positive(config: Any, *names: str) -> None:
    """ValueError naming the config class, the field and its value when a size or scale is not positive."""
    for name in names:
        if not getattr(config, name) > 0:
            raise ValueError(f"{type(config).__name__}: {name}={getattr(config, name)!r} must be positive")


def default_layer_types(num_layers: int, pattern: int = 6) -> tuple[str, ...]:
    """Gemma 3's pattern: every `pattern`-th layer is global, the others local (4 layers, pattern 2:
    ("sliding_attention", "full_attention", "sliding_attention", "full_attention"))."""
    return tuple(LOCAL_ATTENTION if (i + 1) % pattern else GLOBAL_ATTENTION for i in range(num_layers))


def _rope_entry(params: Any, default_base: float, where: str) -> tuple[float, float]:
    """(base, linear scale) from one HF rope dict; only the "default" and "linear" RoPE types exist in Gemma 3."""
    if params is not None and not isinstance(params, Mapping):
        raise ValueError(f"{where} RoPE parameters {params!r} must be an object or null")
    params = dict(params or {})
    kind = _field(params, "rope_type", str, params.get("type", "default"))
    base = _field(params, "rope_theta", float, default_base)
    if kind == "default":
        return base, 1.0
    if kind == "linear":
        if "factor" not in params:
            raise ValueError(f"Gemma 3 {where} rope_type='linear' needs a factor")
        return base, _field(params, "factor", float, None)
    raise ValueError(f"Gemma 3 {where} rope_type={kind!r} is not supported; expected 'default' or 'linear'")


def _gemma3_rope(hf: Mapping[str, Any]) -> tuple[tuple[float, float], tuple[float, float]]:
    """((base, scale) of global layers, (base, scale) of local layers) from either HF rope layout."""
    local_base = _field(hf, "rope_local_base_freq", float, 10_000.0)
    rp = _field(hf, "rope_parameters", dict, None, nullable=True)
    if rp is not None:
        if GLOBAL_ATTENTION in rp or LOCAL_ATTENTION in rp:
            return (
                _rope_entry(rp.get(GLOBAL_ATTENTION), 1_000_000.0, "full_attention"),
                _rope_entry(rp.get(LOCAL_ATTENTION), 10_000.0, "sliding_attention"),
            )
        glob = _rope_entry(rp, _field(hf, "rope_theta", float, 1_000_000.0), "global")
        return glob, (local_base, 1.0)
    scaling = dict(_field(hf, "rope_scaling", dict, None, nullable=True) or {})
    scaling.setdefault("rope_theta", _field(hf, "rope_theta", float, 1_000_000.0))
    glob = _rope_entry(scaling, 1_000_000.0, "global")
    return glob, (local_base, 1.0)


@runtime_checkable
class ModelConfig(Protocol):
    """What every backbone architecture config answers, so that no caller sniffs attributes: sizes, heads,
    positions, norm kind and whether the MLP is gated (GPT2Config and Gemma3Config follow it)."""

    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    mlp_size: int
    max_positions: int
    position_limit: int | None
    norm: Literal["layernorm", "rmsnorm"]
    norm_eps: float
    gated_mlp: bool
    tie_word_embeddings: bool


PRESETS = {
    "gpt2-125m": GPT2Config.gpt2_125m,
    "gpt2-355m": GPT2Config.gpt2_355m,
    "gpt2-774m": GPT2Config.gpt2_774m,
    "gpt2-1.5b": GPT2Config.gpt2_1_5b,
    "gemma3-1b": Gemma3Config.gemma3_1b,
    "gemma3-4b": Gemma3Config.gemma3_4b,
    "gemma3-12b": Gemma3Config.gemma3_12b,
    "gemma3-27b": Gemma3Config.gemma3_27b,
}
PRESETS["gpt2"] = PRESETS["gpt2-125m"]
PRESETS["gpt2-medium"] = PRESETS["gpt2-355m"]
PRESETS["gpt2-large"] = PRESETS["gpt2-774m"]
PRESETS["gpt2-xl"] = PRESETS["gpt2-1.5b"]


def preset(name: str) -> GPT2Config | Gemma3Config:
    """A preset config by name: gpt2-125m/355m/774m/1.5b (or gpt2, -medium, -large, -xl), gemma3-1b/4b/12b/27b.

    Raises ValueError for an unknown name, listing the known ones.
    """
    try:
        return PRESETS[name]()
    except KeyError:
        raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}") from None


def config_from_hf(hf: Mapping[str, Any]) -> GPT2Config | Gemma3Config:
    """The architecture of a HF `config.json` dict, picked by `model_type`.

    `gemma3` (multimodal) checkpoints give the config of their language model (`text_config`). Raises ValueError
    for a missing or other `model_type`, a field of the wrong type or out of range (naming it), and for features the
    configs' `from_hf` reject.
    """
    if not isinstance(hf, Mapping):
        raise ValueError(f"a HF config is a JSON object of settings, not a {type(hf).__name__}")
    supported = "ponderttt.models reads 'gpt2', 'gemma3_text' and 'gemma3'"
    if "model_type" not in hf:
        raise ValueError(f"no model_type; {supported}")
    model_type = hf["model_type"]
    if model_type == "gpt2":
        return GPT2Config.from_hf(hf)
    if model_type == "gemma3_text":
        return Gemma3Config.from_hf(hf)
    if model_type == "gemma3":
        text = dict(_field(hf, "text_config", dict, {}, nullable=True) or {})
        text.setdefault("tie_word_embeddings", hf.get("tie_word_embeddings", True))
        return Gemma3Config.from_hf(text)
    raise ValueError(f"model_type={model_type!r} is not supported; {supported}")


def load_hf_config(path: str | os.PathLike[str]) -> GPT2Config | Gemma3Config:
    """The architecture in the config.json of HF directory `path` (or in the file `path`), by `config_from_hf`.

    Raises FileNotFoundError without the file, and AssetError `<file>: <problem>` when it is empty, not UTF-8, not
    a JSON object, lacks model_type or names another, or has a field of the wrong type or value (named).
    """
    file = pathlib.Path(path)
    if file.is_dir():
        file = file / "config.json"
    if not file.is_file():
        raise FileNotFoundError(f"{path}: no config.json; expected a HF model directory")
    hf = read_json_object(file)
    try:
        return config_from_hf(hf)
    except ValueError as err:
        raise AssetError(file, str(err)) from err
