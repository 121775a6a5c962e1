"""HF checkpoints ↔ NNX: `load_hf_causal_lm`, `save_hf_causal_lm` (and `load_hf_tokenizer`, from `tokenizer`).

The model is built abstractly (`nnx.eval_shape`), every parameter is matched to a checkpoint tensor by a
regex table (one per architecture, with a transform: identity, transpose or a slice of a fused tensor),
every shape and dtype is checked and all problems are reported together, then each parameter is filled. Tensors
are read with `safetensors.safe_open` slice by slice, and with a mesh each device's shard is read on its own
(`jax.make_array_from_callback`, once per distinct slice), so a process reads only the slices it holds. Every
value read is checked to be finite. A file that cannot be used raises `AssetError` (`<path>: <problem>`, one line).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import pathlib
import re
import shutil
import uuid
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import safetensors
import safetensors.numpy
from flax import nnx
from jax.sharding import Mesh, NamedSharding, SingleDeviceSharding
from jax.typing import DTypeLike

from ponderttt.models.adapter import AdaptedLM, AdapterSpec
from ponderttt.models.config import (
    GLOBAL_ATTENTION,
    LOCAL_ATTENTION,
    AssetError,
    Gemma3Config,
    GPT2Config,
    load_hf_config,
    read_json_object,
)
from ponderttt.models.model import CausalLM, build_model
from ponderttt.models.sharding import LOGICAL_RULES, Rules, variable_spec
from ponderttt.models.tokenizer import HFTokenizer as HFTokenizer  # re-exported: hf.HFTokenizer keeps working
from ponderttt.models.tokenizer import load_hf_tokenizer as load_hf_tokenizer

logger = logging.getLogger(__name__)

# Buffers some checkpoints carry that are not parameters (GPT-2 causal-mask buffers, cached RoPE tables).
_IGNORED_SUFFIXES = (".attn.bias", ".attn.masked_bias", "rotary_emb.inv_freq")
# A load error lists at most this many problems (and counts the rest): one readable line.
_MAX_LISTED_PROBLEMS = 20


class SafetensorsFile:
    """One .safetensors file opened with the `safetensors` library; tensors are read slice by slice."""

    def __init__(self, path: pathlib.Path):
        self.path = path
        try:
            self.handle = safetensors.safe_open(str(path), framework="numpy")
        except Exception as err:  # the library raises its own SafetensorError for corrupt or truncated files
            raise AssetError(path, f"not a readable .safetensors file ({err})") from err

    def keys(self) -> list[str]:
        """Tensor names stored in this file."""
        return list(self.handle.keys())

    def shape(self, key: str) -> tuple[int, ...]:
        """Shape of tensor `key`, from the header (no data is read)."""
        return tuple(self.handle.get_slice(key).get_shape())

    def dtype(self, key: str) -> str:
        """safetensors' dtype name of tensor `key` ("F32", "BF16", "I8", "BOOL", ...), from the header."""
        return self.handle.get_slice(key).get_dtype()

    def array(self, key: str) -> Any:
        """A lazy view of the tensor: indexing it with slices reads only those bytes."""
        return self.handle.get_slice(key)


def read_weight_map(index: pathlib.Path) -> dict[str, str]:
    """The tensor name → shard file mapping of a model.safetensors.index.json whose shards all exist beside it.

    Raises AssetError naming the index when it is not a JSON object, has no `weight_map` object of tensor names to
    file names in its directory, or names a shard that is missing.
    """
    index_json = read_json_object(index)
    if "weight_map" not in index_json:
        raise AssetError(index, "has no 'weight_map' (the object of tensor names to shard files)")
    weight_map = index_json["weight_map"]
    if not isinstance(weight_map, dict) or not weight_map:
        raise AssetError(index, f"'weight_map' must be a non-empty object of tensor names to shard files, not "
                                f"{weight_map!r:.60}")
    for key, name in weight_map.items():
        if not isinstance(name, str) or name in ("", ".", "..") or pathlib.PurePath(name).name != name:
            raise AssetError(index, f"weight_map[{key!r}] = {name!r} is not the name of a file in its directory")
    for name in sorted(set(weight_map.values())):
        if not (index.parent / name).is_file():
            raise AssetError(index, f"weight_map names shard {name!r}, which is not in {index.parent}")
    return weight_map


class Checkpoint:
    """All tensors of a HF directory: model.safetensors, a sharded index, or every *.safetensors file."""

    def __init__(self, folder: pathlib.Path):
        self.folder = folder
        index = folder / "model.safetensors.index.json"
        if index.exists():
            weight_map = read_weight_map(index)
            files = {name: SafetensorsFile(folder / name) for name in sorted(set(weight_map.values()))}
            self.where = {key: files[name] for key, name in weight_map.items()}
        else:
            paths = sorted(folder.glob("*.safetensors"))
            if not paths:
                raise FileNotFoundError(
                    f"{folder}: no model.safetensors, model.safetensors.index.json or *.safetensors file; "
                    "save the checkpoint with safe_serialization=True"
                )
            self.where = {}
            for p in paths:
                f = SafetensorsFile(p)
                self.where.update({k: f for k in f.keys()})

    def __contains__(self, key: str) -> bool:
        return key in self.where

    def keys(self) -> list[str]:
        """Every tensor name of the checkpoint, across its files."""
        return list(self.where)

    def shape(self, key: str) -> tuple[int, ...]:
        """Shape of tensor `key` (KeyError when absent)."""
        return self.where[key].shape(key)

    def dtype(self, key: str) -> str:
        """safetensors' dtype name of tensor `key` (KeyError when absent)."""
        return self.where[key].dtype(key)

    def file(self, key: str) -> pathlib.Path:
        """The .safetensors file holding tensor `key`."""
        return self.where[key].path

    def array(self, key: str) -> Any:
        """A lazy view of tensor `key` (see `SafetensorsFile.array`): indexing reads only those bytes."""
        return self.where[key].array(key)


# -- transforms: how a target parameter is read from its source tensor ---------------------------------


@dataclasses.dataclass(frozen=True)
class Identity:
    """The source tensor has the parameter's layout (Conv1D kernels, norms, embeddings, biases)."""

    def source_shape(self, target: tuple[int, ...]) -> tuple[int, ...]:
        """The source shape a parameter of shape `target` needs: the same."""
        return target

    def read(self, src: np.ndarray, index: tuple[slice, ...]) -> np.ndarray:
        """The parameter's slice `index` (one slice per axis) from `src`."""
        return np.asarray(src[index])


@dataclasses.dataclass(frozen=True)
class Transpose:
    """torch Linear weights are [out, in]; our kernels are [in, out]."""

    def source_shape(self, target: tuple[int, ...]) -> tuple[int, ...]:
        """The reversed shape: [out, in] for an [in, out] kernel."""
        return target[::-1]

    def read(self, src: np.ndarray, index: tuple[slice, ...]) -> np.ndarray:
        """The kernel's slice `index`: the transposed slice of the [out, in] source, transposed back."""
        return np.asarray(src[index[::-1]]).T


@dataclasses.dataclass(frozen=True)
class SplitLast:
    """Part `part` of `parts` equal pieces of the source's last axis (GPT-2's fused c_attn → q, k, v)."""

    part: int
    parts: int

    def source_shape(self, target: tuple[int, ...]) -> tuple[int, ...]:
        """The fused shape: the last axis `parts` times as wide."""
        return (*target[:-1], target[-1] * self.parts)

    def read(self, src: np.ndarray, index: tuple[slice, ...], width: int = 0) -> np.ndarray:
        """The part's slice `index`, `width` being the part's full last-axis size (the parameter's)."""
        last = index[-1]
        offset = self.part * width
        start = (last.start or 0) + offset
        stop = (width if last.stop is None else last.stop) + offset
        return np.asarray(src[(*index[:-1], slice(start, stop))])


Transform = Identity | Transpose | SplitLast

_LEAF = {"kernel": "weight", "scale": "weight", "embedding": "weight", "bias": "bias"}

# (target parameter path regex, source key template, transform). {0}, {1}... are the regex groups; {leaf} is
# the HF name of the last path element.
GPT2_KEY_MAP: tuple[tuple[str, str, Transform], ...] = (
    (r"wte\.embedding", "wte.weight", Identity()),
    (r"wpe\.embedding", "wpe.weight", Identity()),
    (r"blocks\.(\d+)\.(ln_1|ln_2)\.(scale|bias)", "h.{0}.{1}.{leaf}", Identity()),
    (r"blocks\.(\d+)\.attn\.q\.(kernel|bias)", "h.{0}.attn.c_attn.{leaf}", SplitLast(0, 3)),
    (r"blocks\.(\d+)\.attn\.k\.(kernel|bias)", "h.{0}.attn.c_attn.{leaf}", SplitLast(1, 3)),
    (r"blocks\.(\d+)\.attn\.v\.(kernel|bias)", "h.{0}.attn.c_attn.{leaf}", SplitLast(2, 3)),
    (r"blocks\.(\d+)\.attn\.c_proj\.(kernel|bias)", "h.{0}.attn.c_proj.{leaf}", Identity()),  # Conv1D: [in, out]
    (r"blocks\.(\d+)\.mlp\.(c_fc|c_proj)\.(kernel|bias)", "h.{0}.mlp.{1}.{leaf}", Identity()),
    (r"ln_f\.(scale|bias)", "ln_f.{leaf}", Identity()),
    (r"lm_head\.kernel", "@lm_head.weight", Transpose()),
)

GEMMA3_KEY_MAP: tuple[tuple[str, str, Transform], ...] = (
    (r"embed_tokens\.embedding", "embed_tokens.weight", Identity()),
    (
        r"blocks\.(\d+)\.self_attn\.(q_proj|k_proj|v_proj|o_proj)\.kernel",
        "layers.{0}.self_attn.{1}.weight",
        Transpose(),
    ),
    (r"blocks\.(\d+)\.self_attn\.(q_norm|k_norm)\.scale", "layers.{0}.self_attn.{1}.weight", Identity()),
    (r"blocks\.(\d+)\.mlp\.(gate_proj|up_proj|down_proj)\.kernel", "layers.{0}.mlp.{1}.weight", Transpose()),
    (
        r"blocks\.(\d+)\.(input_layernorm|post_attention_layernorm|pre_feedforward_layernorm|post_feedforward_layernorm)"
        r"\.scale",
        "layers.{0}.{1}.weight",
        Identity(),
    ),
    (r"norm\.scale", "norm.weight", Identity()),
    (r"lm_head\.kernel", "@lm_head.weight", Transpose()),
)

# Where the decoder's tensors may sit in a checkpoint: the anchor key below the prefix, and candidate prefixes.
_PREFIXES = {
    GPT2Config: ("wte.weight", ("transformer.", "")),
    Gemma3Config: (
        "embed_tokens.weight",
        ("model.", "", "model.language_model.", "language_model.model.", "language_model."),
    ),
}


@dataclasses.dataclass(frozen=True)
class Assignment:
    """Parameter `target` is read from checkpoint tensor `key` through `transform`."""

    target: str
    key: str
    transform: Transform


def detect_prefix(config: GPT2Config | Gemma3Config, ckpt: Checkpoint) -> str:
    """The first candidate prefix ('transformer.', 'model.', 'language_model.model.', ...) under which the
    architecture's anchor tensor (`wte.weight` / `embed_tokens.weight`) exists; AssetError when none does."""
    anchor, candidates = _PREFIXES[type(config)]
    for prefix in candidates:
        if prefix + anchor in ckpt:
            return prefix
    raise AssetError(
        ckpt.folder,
        f"cannot find the {type(config).__name__} tensors: no key {anchor!r} under any of the prefixes "
        f"{list(candidates)}; pass key_prefix=... (first keys: {ckpt.keys()[:5]})",
    )


def _head_key(prefix: str, ckpt: Checkpoint, name: str) -> str:
    """lm_head sits beside the decoder: 'model.' → '', 'language_model.model.' → 'language_model.'."""
    candidates = [prefix[: -len("model.")] if prefix.endswith("model.") else prefix, "", prefix]
    for p in candidates:
        if p + name in ckpt:
            return p + name
    return candidates[0] + name


def plan_assignments(
    config: GPT2Config | Gemma3Config, target_shapes: dict[str, tuple[int, ...]], ckpt: Checkpoint, prefix: str
) -> tuple[list[Assignment], list[str]]:
    """Matches every target parameter ('blocks.0.attn.q.kernel': shape) to a checkpoint tensor under `prefix`;
    returns (assignments, errors): tensors that are not floating point (listed first), missing tensors, shape
    mismatches, unmapped parameters, unused tensors."""
    table = GPT2_KEY_MAP if isinstance(config, GPT2Config) else GEMMA3_KEY_MAP
    assignments, errors, not_float, used = [], [], [], set()
    for target, shape in target_shapes.items():
        for pattern, template, transform in table:
            m = re.fullmatch(pattern, target)
            if m is None:
                continue
            leaf = _LEAF[target.rsplit(".", 1)[-1]]
            name = template.format(*m.groups(), leaf=leaf)
            key = _head_key(prefix, ckpt, name[1:]) if name.startswith("@") else prefix + name
            if key not in ckpt:
                errors.append(f"missing tensor {key!r} for parameter {target} {shape}")
            elif not ckpt.dtype(key).startswith(("F", "BF")):  # F16, BF16, F32, F64, F8_*: all the others are not
                not_float.append(f"{key!r} is {ckpt.dtype(key)}")
                used.add(key)
            else:
                want = transform.source_shape(shape)
                if ckpt.shape(key) != want:
                    errors.append(
                        f"shape mismatch: {key!r} is {ckpt.shape(key)}, parameter {target} needs {want} "
                        f"(target {shape}, transform {transform})"
                    )
                else:
                    assignments.append(Assignment(target, key, transform))
                used.add(key)
            break
        else:
            errors.append(f"no checkpoint mapping for parameter {target} {shape}")
    head = _head_key(prefix, ckpt, "lm_head.weight")
    for key in ckpt.keys():
        if not key.startswith(prefix) or key in used or key.endswith(_IGNORED_SUFFIXES):
            continue
        if key == head and config.tie_word_embeddings:
            continue  # an explicit copy of the tied embedding
        errors.append(f"unexpected tensor {key!r} {ckpt.shape(key)} (not used by {type(config).__name__})")
    if not_float:
        errors.insert(0, f"{len(not_float)} tensor(s) hold integers or booleans where the model needs floating-point "
                         f"weights ({', '.join(not_float[:3])}{', ...' if len(not_float) > 3 else ''}): quantised "
                         "checkpoints are not supported, load a float32, float16 or bfloat16 one")
    return assignments, errors


def _read(
    ckpt: Checkpoint, a: Assignment, shape: tuple[int, ...], index: tuple[slice, ...] | None, dtype: DTypeLike
) -> np.ndarray:
    src = ckpt.array(a.key)
    index = tuple(slice(None) for _ in shape) if index is None else tuple(index)
    if isinstance(a.transform, SplitLast):
        out = a.transform.read(src, index, width=shape[-1])
    else:
        out = a.transform.read(src, index)
    with np.errstate(over="ignore"):  # a value beyond the dtype's range becomes Inf, which `_require_finite` reports
        return np.asarray(out).astype(dtype, copy=False)  # the read is already a fresh array: no second copy


def count_non_finite(x: np.ndarray) -> int:
    """How many entries of the floating-point array `x` are NaN or ±Inf, in one cheap pass when there are none.

    float32 / float64: NaN and Inf propagate through a sum, half the cost of `isfinite(x).all()` (a sum that
    overflows on finite values only sends it to the exact count). 2-byte floats (float16, bfloat16, whose sums
    overflow and whose ml_dtypes ufuncs are slow): the bits of the largest magnitude against those of Inf.
    """
    if x.dtype.itemsize == 2:
        suspect = _largest_magnitude_bits(x) >= np.array(np.inf, x.dtype).view(np.uint16)
    else:
        with np.errstate(over="ignore", invalid="ignore"):  # overflow and Inf - Inf are what we look for
            suspect = not np.isfinite(np.sum(x))
    return int(np.count_nonzero(~np.isfinite(x))) if suspect else 0


def _largest_magnitude_bits(x: np.ndarray, block_size: int = 1 << 18) -> int:
    """max(|x|) of a 2-byte float array as its bit pattern (sign cleared), block by block so that each masked block
    stays in cache (2.4x faster than masking the whole array at once)."""
    bits = x.ravel(order="K").view(np.uint16)  # no copy for C- or F-ordered arrays
    buffer = np.empty(min(bits.size, block_size), np.uint16)
    largest = 0
    for start in range(0, bits.size, block_size):
        block = bits[start : start + block_size]
        largest = max(largest, int(np.bitwise_and(block, 0x7FFF, out=buffer[: block.size]).max()))
    return largest


def _require_finite(value: np.ndarray, key: str, ckpt: Checkpoint, allow_non_finite: bool) -> np.ndarray:
    """`value` (read from tensor `key`) when it is finite; else AssetError naming the file, tensor and count, or with
    `allow_non_finite` a logged warning."""
    bad = count_non_finite(value)
    if bad:
        problem = f"tensor {key!r} has {bad} non-finite (NaN or Inf) values of {value.size} read as {value.dtype}"
        if not allow_non_finite:
            raise AssetError(ckpt.file(key), f"{problem}; pass allow_non_finite=True to load it anyway")
        logger.warning("%s: %s; loaded anyway (allow_non_finite=True)", ckpt.file(key), problem)
    return value


class _ShardReader:
    """make_array_from_callback's callback for one parameter: reads the slice of each addressable device, once
    per distinct slice (devices of this process holding the same replica share one read)."""

    def __init__(
        self, ckpt: Checkpoint, a: Assignment, shape: tuple[int, ...], dtype: DTypeLike, allow_non_finite: bool
    ):
        self.ckpt, self.a, self.shape, self.dtype = ckpt, a, shape, dtype
        self.allow_non_finite = allow_non_finite
        self.done: dict[tuple, np.ndarray] = {}

    def __call__(self, index: tuple[slice, ...]) -> np.ndarray:
        key = tuple((s.start, s.stop, s.step) for s in index)
        if key not in self.done:
            value = _read(self.ckpt, self.a, self.shape, index, self.dtype)
            self.done[key] = _require_finite(value, self.a.key, self.ckpt, self.allow_non_finite)
        return self.done[key]


def load_hf_causal_lm(
    path: str | pathlib.Path,
    *,
    dtype: DTypeLike = jnp.float32,
    mesh: Mesh | None = None,
    ttt: Any = None,
    key_prefix: str | None = None,
    rules: Rules = LOGICAL_RULES,
    remat: str | None = None,
    allow_non_finite: bool = False,
    **ttt_options: Any,
) -> CausalLM | AdaptedLM:
    """A GPT-2 or Gemma 3 model with the weights of the HF directory `path`.

    path: a folder with config.json and model.safetensors (or a sharded model.safetensors.index.json).
    dtype: parameter and activation dtype (logits are always float32).
    mesh: a (data, fsdp, tensor) mesh; parameters are created sharded and each shard is read on its own.
    ttt: a `ponderttt.ttt.TTTConfig` (with `ttt_options` kind=, sites=, seed= of `AdapterSpec`) or an
         `AdapterSpec`: the model is then an `AdaptedLM` carrying those fast-weight adapters.
    key_prefix: where the decoder's tensors sit in the checkpoint ('model.', 'transformer.', ...);
         detected when None.
    allow_non_finite: load tensors holding NaN or Inf with a logged warning instead of raising.
    Raises FileNotFoundError without config.json or safetensors files, and `AssetError` (a ValueError), one line
    `<path>: <problem>`, for: a config.json that is empty, not UTF-8, not a JSON object, without a supported
    model_type or with a field of the wrong type or value; a malformed model.safetensors.index.json or a shard it
    names that is missing; a truncated or corrupt .safetensors file; tensors that are missing, mis-shaped,
    unexpected or not floating point (listed together, at most 20, with both shapes); a tensor with NaN or Inf
    values (also after the cast to `dtype`).
    """
    folder = pathlib.Path(path)
    if not (folder / "config.json").exists():
        raise FileNotFoundError(f"{folder}: no config.json; expected a HF model directory")
    config = load_hf_config(folder)
    ckpt = Checkpoint(folder)
    prefix = detect_prefix(config, ckpt) if key_prefix is None else key_prefix

    def build() -> CausalLM:
        return build_model(config, dtype=dtype, rngs=nnx.Rngs(0), mesh=mesh, rules=rules, remat=remat)

    abstract = nnx.eval_shape(build)
    graphdef, abstract_state = nnx.split(abstract)
    flat = list(nnx.to_flat_state(abstract_state))
    names = [".".join(str(p) for p in path) for path, _ in flat]
    shapes = {n: tuple(v.shape) for n, (_, v) in zip(names, flat, strict=True)}
    assignments, errors = plan_assignments(config, shapes, ckpt, prefix)
    if errors:
        listed = "; ".join(errors[:_MAX_LISTED_PROBLEMS])
        more = f"; and {len(errors) - _MAX_LISTED_PROBLEMS} more" if len(errors) > _MAX_LISTED_PROBLEMS else ""
        what = f"cannot load as {type(config).__name__} (prefix {prefix!r})"
        raise AssetError(folder, f"{what}: {len(errors)} problem(s): {listed}{more}")
    by_target = {a.target: a for a in assignments}
    filled = []
    for name, (p, var) in zip(names, flat, strict=True):
        a, shape = by_target[name], shapes[name]
        np_dtype = np.dtype(var.dtype)
        if mesh is None:
            host = _require_finite(_read(ckpt, a, shape, None, np_dtype), a.key, ckpt, allow_non_finite)
            value = jax.device_put(host, SingleDeviceSharding(jax.devices()[0]))
        else:
            sharding = NamedSharding(mesh, variable_spec(var, mesh, rules))
            reader = _ShardReader(ckpt, a, shape, np_dtype, allow_non_finite)
            value = jax.make_array_from_callback(shape, sharding, reader)
        filled.append((p, var.replace(value)))
    model = nnx.merge(graphdef, nnx.from_flat_state(filled))
    if ttt is None:
        return model
    return AdaptedLM(model, ttt if isinstance(ttt, AdapterSpec) else AdapterSpec(ttt, **ttt_options))


# -- saving: the inverse of the key maps ------------------------------------------------------------------

# Where save_hf_causal_lm puts the decoder (what transformers' save_pretrained writes); lm_head sits at the top.
_SAVE_PREFIX = {GPT2Config: "transformer.", Gemma3Config: "model."}


def hf_config_dict(config: GPT2Config | Gemma3Config) -> dict[str, Any]:
    """The HF `config.json` fields of an architecture config (transformers 5.x names; `config_from_hf` inverts it)."""
    if isinstance(config, GPT2Config):
        return {
            "architectures": ["GPT2LMHeadModel"],
            "model_type": "gpt2",
            "vocab_size": config.vocab_size,
            "n_positions": config.n_positions,
            "n_embd": config.n_embd,
            "n_layer": config.n_layer,
            "n_head": config.n_head,
            "n_inner": config.n_inner,
            "activation_function": "gelu_new",
            "layer_norm_epsilon": config.layer_norm_epsilon,
            "scale_attn_weights": config.scale_attn_weights,
            "scale_attn_by_inverse_layer_idx": config.scale_attn_by_inverse_layer_idx,
            "reorder_and_upcast_attn": False,
            "tie_word_embeddings": config.tie_word_embeddings,
        }
    if isinstance(config, Gemma3Config):
        scale = config.rope_global_scale
        global_rope = {"rope_type": "default", "rope_theta": config.rope_global_base}
        if scale != 1.0:
            global_rope = {"rope_type": "linear", "factor": scale, "rope_theta": config.rope_global_base}
        return {
            "architectures": ["Gemma3ForCausalLM"],
            "model_type": "gemma3_text",
            "vocab_size": config.vocab_size,
            "hidden_size": config.hidden_size,
            "intermediate_size": config.intermediate_size,
            "num_hidden_layers": config.num_layers,
            "num_attention_heads": config.num_heads,
            "num_key_value_heads": config.num_kv_heads,
            "head_dim": config.head_dim,
            "rms_norm_eps": config.rms_norm_eps,
            "query_pre_attn_scalar": _int_if_whole(config.query_pre_attn_scalar),  # transformers 5 wants an int
            "sliding_window": config.sliding_window,
            "layer_types": list(config.layer_types),
            "rope_parameters": {
                GLOBAL_ATTENTION: global_rope,
                LOCAL_ATTENTION: {"rope_type": "default", "rope_theta": config.rope_local_base},
            },
            "hidden_activation": "gelu_pytorch_tanh",
            "final_logit_softcapping": config.final_logit_softcapping,
            "attn_logit_softcapping": None,
            "attention_bias": False,
            "use_bidirectional_attention": False,
            "max_position_embeddings": config.max_position_embeddings,
            "tie_word_embeddings": config.tie_word_embeddings,
        }
    raise TypeError(f"hf_config_dict: expected GPT2Config or Gemma3Config, got {type(config).__name__}")


def _int_if_whole(x: float) -> int | float:
    return int(x) if float(x).is_integer() else x


def _host_array(value: Any) -> np.ndarray:
    """A parameter as one host array; a value sharded across processes is gathered from all of them."""
    if isinstance(value, jax.Array) and not value.is_fully_addressable:
        from jax.experimental import multihost_utils

        return np.asarray(multihost_utils.process_allgather(value, tiled=True))
    return np.asarray(jax.device_get(value))


def export_tensors(model: CausalLM | AdaptedLM, *, dtype: DTypeLike | None = None) -> dict[str, np.ndarray]:
    """The backbone's parameters under their HF names and layouts (the inverse of `load_hf_causal_lm`'s maps).

    Kernels are transposed back to torch's [out, in] where HF uses nn.Linear, GPT-2's q, k, v are fused into
    c_attn, and a tied head is not written (HF re-ties it). Adapter parameters are not part of the HF format.
    dtype: cast every tensor (e.g. jnp.bfloat16); None keeps each parameter's dtype.
    """
    if isinstance(model, AdaptedLM):
        model = model.backbone
    config = model.config
    table = GPT2_KEY_MAP if isinstance(config, GPT2Config) else GEMMA3_KEY_MAP
    prefix = _SAVE_PREFIX[type(config)]
    out: dict[str, np.ndarray] = {}
    fused: dict[str, dict[int, np.ndarray]] = {}
    unmapped = []
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        target = ".".join(str(p) for p in path)
        for pattern, template, transform in table:
            m = re.fullmatch(pattern, target)
            if m is None:
                continue
            name = template.format(*m.groups(), leaf=_LEAF[target.rsplit(".", 1)[-1]])
            key = name[1:] if name.startswith("@") else prefix + name
            value = _host_array(var.get_value())
            if dtype is not None:
                value = value.astype(np.dtype(dtype))
            if isinstance(transform, SplitLast):
                fused.setdefault(key, {})[transform.part] = value
            elif isinstance(transform, Transpose):
                out[key] = np.ascontiguousarray(value.T)
            else:
                out[key] = value
            break
        else:
            unmapped.append(target)
    if unmapped:
        raise ValueError(f"no HF name for parameter(s) {unmapped} of {type(model).__name__}")
    for key, parts in fused.items():
        out[key] = np.concatenate([parts[i] for i in sorted(parts)], axis=-1)
    return out


def _shard_groups(tensors: dict[str, np.ndarray], max_shard_bytes: int | None) -> list[list[str]]:
    """Tensor names per file, in order, each file at most `max_shard_bytes` (a larger tensor gets its own file)."""
    if max_shard_bytes is None:
        return [list(tensors)]
    if max_shard_bytes <= 0:
        raise ValueError(f"max_shard_bytes={max_shard_bytes} must be positive (or None for one file)")
    groups: list[list[str]] = [[]]
    size = 0
    for key, value in tensors.items():
        if groups[-1] and size + value.nbytes > max_shard_bytes:
            groups.append([])
            size = 0
        groups[-1].append(key)
        size += value.nbytes
    return groups


def save_hf_causal_lm(
    model: CausalLM | AdaptedLM,
    path: str | pathlib.Path,
    *,
    config: Mapping[str, Any] | None = None,
    dtype: DTypeLike | None = None,
    max_shard_bytes: int | None = None,
    overwrite: bool = False,
) -> pathlib.Path:
    """Writes `model`'s backbone as a HF directory that `load_hf_causal_lm` and transformers both read.

    path: the directory to create; it is written in a temporary sibling and renamed into place, so it never
         exists half-written. An existing directory is an error unless `overwrite=True` (then it is replaced).
    config: extra config.json fields merged over the architecture's (e.g. {"bos_token_id": 2, "eos_token_id": 1}).
    dtype: tensor dtype on disk (default: each parameter's own); config.json's "dtype" says which.
    max_shard_bytes: split the tensors into model-0000i-of-0000n.safetensors files with an index when larger.
    Files: config.json (model_type gpt2 / gemma3_text) and model.safetensors (or shards + index), with HF
    tensor names (`transformer.h.0.attn.c_attn.weight`, `model.layers.0.self_attn.q_proj.weight`, ...).
    Only backbone parameters are written (adapters and gates are not part of the HF format). With parameters
    sharded across processes every process must call this (they gather); process 0 writes.
    """
    folder = pathlib.Path(path)
    if folder.exists() and not overwrite:
        raise FileExistsError(f"{folder} exists; pass overwrite=True to replace it or choose another path")
    model_type = hf_config_dict(model.config)["model_type"]
    if (config or {}).get("model_type", model_type) != model_type:
        raise ValueError(f"config= may not change model_type {model_type!r} (got {config['model_type']!r})")
    tensors = export_tensors(model, dtype=dtype)
    if jax.process_index() == 0:
        _write_hf_dir(folder, model.config, tensors, config, max_shard_bytes)
    if jax.process_count() > 1:  # nobody reads the directory before process 0 has renamed it into place
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(f"save_hf_causal_lm {folder}")
    return folder


def _write_hf_dir(
    folder: pathlib.Path,
    arch: GPT2Config | Gemma3Config,
    tensors: dict[str, np.ndarray],
    config: Mapping[str, Any] | None,
    max_shard_bytes: int | None,
) -> None:
    dtypes = {str(v.dtype) for v in tensors.values()}
    fields = hf_config_dict(arch)
    fields["dtype"] = dtypes.pop() if len(dtypes) == 1 else "float32"
    fields.update(dict(config or {}))
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = folder.parent / f".{folder.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        (tmp / "config.json").write_text(json.dumps(fields, indent=2, sort_keys=True) + "\n")
        groups = _shard_groups(tensors, max_shard_bytes)
        metadata = {"format": "pt"}  # what transformers expects in a safetensors header
        if len(groups) == 1:
            safetensors.numpy.save_file(tensors, str(tmp / "model.safetensors"), metadata=metadata)
        else:
            weight_map = {}
            for i, keys in enumerate(groups):
                name = f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
                safetensors.numpy.save_file({k: tensors[k] for k in keys}, str(tmp / name), metadata=metadata)
                weight_map.update(dict.fromkeys(keys, name))
            index = {"metadata": {"total_size": sum(v.nbytes for v in tensors.values())}, "weight_map": weight_map}
            (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
        old = None
        if folder.exists():  # overwrite: move the old directory aside, rename, then delete it
            old = folder.parent / f".{folder.name}.old-{uuid.uuid4().hex[:8]}"
            os.rename(folder, old)
        os.rename(tmp, folder)
        if old is not None:
            shutil.rmtree(old)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
