"""Shared math (pure functions) and the thin NNX layers both backbones are built from.

One LayerNorm, one RMSNorm, one RoPE, one attention: GPT-2 and Gemma 3 differ only in which they call.
Norm statistics and softmax are computed in float32 whatever the parameter dtype, as HF does.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.typing import DTypeLike

# Large negative bias for masked attention logits; finite so fully masked rows (left padding) give no NaN.
MASK_VALUE = -1e30


def layer_norm(x: jax.Array, scale: jax.Array, bias: jax.Array, eps: float) -> jax.Array:
    """LayerNorm of x [..., C] over its last axis with scale, bias [C]; statistics in float32, result in x's dtype."""
    xf = x.astype(jnp.float32)
    mean = xf.mean(-1, keepdims=True)
    var = jnp.square(xf - mean).mean(-1, keepdims=True)
    y = (xf - mean) * jax.lax.rsqrt(var + eps)
    return (y * scale.astype(jnp.float32) + bias.astype(jnp.float32)).astype(x.dtype)


def rms_norm(x: jax.Array, weight: jax.Array, eps: float) -> jax.Array:
    """Gemma RMSNorm of x [..., C] with weight [C]: x / rms(x) * (1 + weight), computed in float32 (the stored
    weight is an offset from 1), returned in x's dtype."""
    xf = x.astype(jnp.float32)
    y = xf * jax.lax.rsqrt(jnp.square(xf).mean(-1, keepdims=True) + eps)
    return (y * (1.0 + weight.astype(jnp.float32))).astype(x.dtype)


def gelu_tanh(x: jax.Array) -> jax.Array:
    """GELU with the tanh approximation: HF's `gelu_new` / `gelu_pytorch_tanh` (GPT-2 and Gemma 3 MLPs)."""
    return jax.nn.gelu(x, approximate=True)


def rope_inv_freq(head_dim: int, base: float, scale: float = 1.0) -> np.ndarray:
    """Inverse frequencies of RoPE; `scale` > 1 is HF's "linear" scaling (positions divided by `scale`)."""
    exponents = np.arange(0, head_dim, 2, dtype=np.float32) / np.float32(head_dim)
    return (1.0 / (np.float32(base) ** exponents) / np.float32(scale)).astype(np.float32)


def apply_rope(x_bthd: jax.Array, positions_bt: jax.Array, inv_freq: jax.Array | np.ndarray) -> jax.Array:
    """Rotary embedding of x [B, T, H, D] at integer positions [B, T] with `inv_freq` [D/2] (`rope_inv_freq`),
    in HF's rotate-half convention (first half / second half of head_dim); angles in float32, result in x's dtype."""
    angles = positions_bt.astype(jnp.float32)[..., None] * inv_freq  # [B, T, D/2]
    angles = jnp.concatenate([angles, angles], axis=-1)[:, :, None, :]  # [B, T, 1, D]
    cos, sin = jnp.cos(angles).astype(x_bthd.dtype), jnp.sin(angles).astype(x_bthd.dtype)
    half = x_bthd.shape[-1] // 2
    rotated = jnp.concatenate([-x_bthd[..., half:], x_bthd[..., :half]], axis=-1)
    return x_bthd * cos + rotated * sin


def causal_mask(q_slots_bt: jax.Array, k_slots_s: jax.Array, key_valid_bs: jax.Array, window: int | None) -> jax.Array:
    """Boolean [B, T, S]: causal over slots, valid keys only, and within `window` slots when given.

    Slots are cache indices (or sequence indices without a cache). Left padding shifts every slot of a row by
    the same amount, so slot differences equal position differences among a row's real tokens.
    """
    q = q_slots_bt[:, :, None]
    k = k_slots_s[None, None, :]
    allowed = (k <= q) & key_valid_bs[:, None, :]
    if window is not None:
        allowed &= (q - k) < window
    return allowed


LayerCache = tuple[jax.Array, jax.Array, jax.Array, bool]
"""One layer's part of a KV cache: (keys, values, index, ring): keys and values [B, S, kv_heads, head_dim] (or
[B, W, ...] for a ring buffer of W entries), index the next slot to write (int32 scalar), ring whether the arrays
are a sliding-window ring buffer."""


def write_cache(
    k_new: jax.Array, v_new: jax.Array, layer_cache: LayerCache | None
) -> tuple[tuple[jax.Array, jax.Array], tuple[jax.Array, jax.Array]]:
    """((keys, values) to attend over, (keys, values) of the new cache) for this call's k, v [B, T, kv, D].

    No cache: the new ones for both. Full cache: the cache with the new ones written at `index`, for both.
    Ring buffer of W entries: attend over [ring as it was, new ones] (what `ring_mask` describes), and write
    the last min(T, W) new ones into entries (slot % W). New keys and values are cast to the cache's dtype.
    """
    if layer_cache is None:
        return (k_new, v_new), (k_new, v_new)
    k_cache, v_cache, index, ring = layer_cache
    k_new, v_new = k_new.astype(k_cache.dtype), v_new.astype(v_cache.dtype)
    if not ring:
        k = jax.lax.dynamic_update_slice(k_cache, k_new, (0, index, 0, 0))
        v = jax.lax.dynamic_update_slice(v_cache, v_new, (0, index, 0, 0))
        return (k, v), (k, v)
    size, t = k_cache.shape[1], k_new.shape[1]
    n = min(t, size)
    entries = (index + t - n + jnp.arange(n, dtype=jnp.int32)) % size
    k_ring = k_cache.at[:, entries].set(k_new[:, t - n :])
    v_ring = v_cache.at[:, entries].set(v_new[:, t - n :])
    both = (jnp.concatenate([k_cache, k_new], axis=1), jnp.concatenate([v_cache, v_new], axis=1))
    return both, (k_ring, v_ring)


def ring_mask(
    q_slots_bt: jax.Array, valid_bt: jax.Array, key_valid_bs: jax.Array, index: jax.Array, size: int, window: int | None
) -> jax.Array:
    """Boolean mask [B, T, size + T] of T queries at slots index.. over [a ring buffer of `size` entries, the T new
    keys]; valid_bt [B, T] marks the new tokens, key_valid_bs [B, S] every slot of the cache.

    Ring entry j holds the latest slot a < index with a % size == j (none yet when a < 0).
    """
    j = jnp.arange(size, dtype=jnp.int32)
    held = index - 1 - jnp.remainder(index - 1 - j, size)
    held_valid = (held >= 0)[None, :] & jnp.take(key_valid_bs, jnp.maximum(held, 0), axis=1)
    t = q_slots_bt.shape[1]
    k_slots = jnp.concatenate([held, index + jnp.arange(t, dtype=jnp.int32)])
    return causal_mask(q_slots_bt, k_slots, jnp.concatenate([held_valid, valid_bt], axis=1), window)


def attention(
    q_bthd: jax.Array,
    k_bshd: jax.Array,
    v_bshd: jax.Array,
    mask_bts: jax.Array,
    scale: float,
    *,
    query_block: int | None = None,
    window: int | None = None,
    loop: bool = False,
) -> jax.Array:
    """Scaled dot-product attention with grouped queries (query head j reads kv head j // group, HF's order).

    q [B, T, H, D], k and v [B, S, kv, D] (H a multiple of kv), boolean mask [B, T, S] (True = may attend);
    returns [B, T, H, D] in q's dtype, logits and softmax in float32. Masked logits get MASK_VALUE, so a fully
    masked row (left padding) gives finite values rather than NaN.

    Computed head-major: q as [B, kv, group * T, D] against k, v as [B, kv, S, D], so grouped queries share
    their kv head without a repeated copy and every contraction is a plain batched matmul. The softmax is
    normalised after the value product (one division of [.., T, D] instead of [.., T, S]).

    query_block: without a cache (query i is key slot i), queries are processed in blocks that only attend to
    the keys a causal (and `window`ed) query can see, skipping the masked upper triangle: about half the work.
    loop: attend one (sequence, kv head) at a time in a `lax.map` loop, so that the [T, S] score tiles of the
    several passes (scores, mask, max, exp, sum, values) stay in cache: about 1.5x faster on CPU at T = 1024.
    Only for unsharded runs: a loop over a sharded batch or head axis would gather it.
    The result is the same up to float rounding whatever the options. Raises ValueError when query_block is
    used with T > query_block queries over a different number S of keys (a cache).
    """
    b, t, h, d = q_bthd.shape
    kv, s = k_bshd.shape[2], k_bshd.shape[1]
    group = h // kv
    if query_block is not None and t > query_block and t != s:
        raise ValueError(f"query_block needs one key per query slot (no cache); got {t} queries, {s} keys")
    q = q_bthd.reshape(b, t, kv, group, d).transpose(0, 2, 3, 1, 4)  # [B, kv, G, T, D]
    k = k_bshd.transpose(0, 2, 1, 3)  # [B, kv, S, D]
    v = v_bshd.transpose(0, 2, 1, 3)
    if loop:

        def one_sequence(args):
            q_b, k_b, v_b, mask_b = args  # [kv, G, T, D], [kv, S, D], [kv, S, D], [T, S]

            def one_head(head):
                q_h, k_h, v_h = (x[None, None] for x in head)
                return _attend_blocks(q_h, k_h, v_h, mask_b[None], scale, query_block, window)[0, 0]

            return jax.lax.map(one_head, (q_b, k_b, v_b))

        out = jax.lax.map(one_sequence, (q, k, v, mask_bts))
    else:
        out = _attend_blocks(q, k, v, mask_bts, scale, query_block, window)
    return out.transpose(0, 3, 1, 2, 4).reshape(b, t, h, d).astype(q_bthd.dtype)


def _attend_blocks(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    mask_bts: jax.Array,
    scale: float,
    query_block: int | None,
    window: int | None,
) -> jax.Array:
    """q [B, kv, G, T, D] over k, v [B, kv, S, D]: in query blocks skipping masked keys when query_block is set."""
    t = q.shape[3]
    if query_block is None or t <= query_block:
        return _attend(q, k, v, mask_bts, scale)
    outs = []
    for t0 in range(0, t, query_block):
        t1 = min(t, t0 + query_block)
        lo = 0 if window is None else max(0, t0 - window + 1)
        outs.append(_attend(q[:, :, :, t0:t1], k[:, :, lo:t1], v[:, :, lo:t1], mask_bts[:, t0:t1, lo:t1], scale))
    return jnp.concatenate(outs, axis=3)


def _attend(q_bkgtd: jax.Array, k_bksd: jax.Array, v_bksd: jax.Array, mask_bts: jax.Array, scale: float) -> jax.Array:
    """One block: q [B, kv, G, T, D], k/v [B, kv, S, D], mask [B, T, S] → [B, kv, G, T, D] float32."""
    b, kv, g, t, d = q_bkgtd.shape
    s = k_bksd.shape[2]
    logits = jnp.einsum(
        "bkqd,bksd->bkqs", q_bkgtd.reshape(b, kv, g * t, d), k_bksd, preferred_element_type=jnp.float32
    ).reshape(b, kv, g, t, s)
    logits = jnp.where(mask_bts[:, None, None], logits, MASK_VALUE)
    peak = logits.max(-1, keepdims=True)
    weights = jnp.exp((logits - peak) * scale)  # softmax(scale * logits) up to its normaliser (scale > 0)
    total = weights.sum(-1, keepdims=True)
    out = jnp.einsum(
        "bkqs,bksd->bkqd",
        weights.reshape(b, kv, g * t, s).astype(v_bksd.dtype),
        v_bksd,
        preferred_element_type=jnp.float32,
    ).reshape(b, kv, g, t, d)
    return out / total


class Dense(nnx.Module):
    """y = x @ kernel (+ bias); kernel [in, out] with logical axes; HF torch Linear weights are its transpose."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        axes: tuple[str, str],
        *,
        use_bias: bool,
        dtype: DTypeLike,
        rngs: nnx.Rngs,
        init_std: float = 0.02,
    ):
        key = rngs.params()
        kernel = init_std * jax.random.normal(key, (in_features, out_features), jnp.float32)
        self.kernel = nnx.Param(kernel.astype(dtype), logical_axes=axes)
        self.bias = nnx.Param(jnp.zeros((out_features,), dtype), logical_axes=(axes[1],)) if use_bias else None

    def __call__(self, x: jax.Array) -> jax.Array:
        """x [..., in] → [..., out], accumulated in float32 and returned in x's dtype."""
        y = jnp.einsum("...i,io->...o", x, self.kernel[...], preferred_element_type=jnp.float32)
        if self.bias is not None:
            y = y + self.bias[...].astype(jnp.float32)
        return y.astype(x.dtype)


class Embed(nnx.Module):
    """Token (or position) table [num, features]; `attend` uses it as a tied output head."""

    def __init__(
        self,
        num: int,
        features: int,
        axes: tuple[str, str],
        *,
        dtype: DTypeLike,
        rngs: nnx.Rngs,
        init_std: float = 0.02,
    ):
        table = init_std * jax.random.normal(rngs.params(), (num, features), jnp.float32)
        self.embedding = nnx.Param(table.astype(dtype), logical_axes=axes)

    def __call__(self, ids: jax.Array) -> jax.Array:
        """Rows of the table for integer ids [...] → [..., features], in the table's dtype."""
        return jnp.take(self.embedding[...], ids, axis=0)

    def attend(self, x: jax.Array) -> jax.Array:
        """Logits in float32: x [..., features] @ tableᵀ → [..., num]."""
        return jnp.einsum("...c,vc->...v", x, self.embedding[...], preferred_element_type=jnp.float32)


class LayerNorm(nnx.Module):
    """LayerNorm with a scale (init 1) and bias (init 0) of [features] (HF `nn.LayerNorm`'s weight and bias)."""

    def __init__(self, features: int, eps: float, *, dtype: DTypeLike):
        self.eps = eps
        self.scale = nnx.Param(jnp.ones((features,), dtype), logical_axes=("norm",))
        self.bias = nnx.Param(jnp.zeros((features,), dtype), logical_axes=("norm",))

    def __call__(self, x: jax.Array) -> jax.Array:
        """`layer_norm` of x [..., features] over its last axis, in x's dtype."""
        return layer_norm(x, self.scale[...], self.bias[...], self.eps)


class RMSNorm(nnx.Module):
    """Gemma RMSNorm; the weight starts at 0, i.e. a unit gain."""

    def __init__(self, features: int, eps: float, *, dtype: DTypeLike):
        self.eps = eps
        self.scale = nnx.Param(jnp.zeros((features,), dtype), logical_axes=("norm",))

    def __call__(self, x: jax.Array) -> jax.Array:
        """`rms_norm` of x [..., features] over its last axis, in x's dtype."""
        return rms_norm(x, self.scale[...], self.eps)


def split_heads(x_btf: jax.Array, num_heads: int) -> jax.Array:
    """[B, T, H * D] → [B, T, H, D] (head-major features, as HF's view)."""
    b, t, f = x_btf.shape
    return x_btf.reshape(b, t, num_heads, f // num_heads)


def merge_heads(x_bthd: jax.Array) -> jax.Array:
    """[B, T, H, D] → [B, T, H * D]: the inverse of `split_heads`."""
    b, t, h, d = x_bthd.shape
    return x_bthd.reshape(b, t, h * d)


def remat_policy(name: str | None) -> Callable[..., Any] | None:
    """jax.checkpoint policy by name: None/'none' (no remat: returns None), 'full' (save nothing), 'dots' (save
    matmuls without batch dims), 'everything' (save all). Raises ValueError for any other name."""
    policies = {
        "full": jax.checkpoint_policies.nothing_saveable,
        "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
        "everything": jax.checkpoint_policies.everything_saveable,
    }
    if name in (None, "none"):
        return None
    if name not in policies:
        raise ValueError(f"remat={name!r} is not a known policy; choose none, full, dots or everything")
    return policies[name]
