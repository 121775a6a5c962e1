"""Pure array functions shared by the TTT layers: LayerNorm, GELU, RoPE, causal conv, token learning rates."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import DTypeLike


def inner_dtype(x_dtype: DTypeLike) -> np.dtype:
    """dtype of the inner loop, fast weights and stats for inputs of x_dtype: float32, or float64 for float64
    inputs (with jax_enable_x64; bfloat16 / float16 activations keep a float32 inner loop)."""
    return jnp.dtype(jnp.float64) if jnp.dtype(x_dtype) == jnp.float64 else jnp.dtype(jnp.float32)


def layer_norm(x: jax.Array, weight: jax.Array, bias: jax.Array, eps: float) -> jax.Array:
    """LayerNorm over the last axis (biased variance, as torch.nn.LayerNorm)."""
    mean = jnp.mean(x, axis=-1, keepdims=True)
    centered = x - mean
    var = jnp.mean(centered * centered, axis=-1, keepdims=True)
    return centered * jax.lax.rsqrt(var + eps) * weight + bias


def gelu_tanh(x: jax.Array) -> jax.Array:
    """GELU with the tanh approximation (the official TTT-LM and GPT-2 activation)."""
    return jax.nn.gelu(x, approximate=True)


def rope_tables(
    mini_batch_size: int, head_dim: int, theta: float, dtype: DTypeLike = jnp.float32
) -> tuple[jax.Array, jax.Array]:
    """cos, sin [mini_batch_size, head_dim // 2] for positions 0..mini_batch_size-1, computed in float64 NumPy
    at trace time and rounded to dtype: constants of the compiled program (XLA would otherwise fuse cos/sin
    into every consumer and evaluate them once per element of q and k)."""
    inv_freq = 1.0 / (theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim))
    angles = np.arange(mini_batch_size, dtype=np.float64)[:, None] * inv_freq[None, :]
    return jnp.asarray(np.cos(angles), dtype), jnp.asarray(np.sin(angles), dtype)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotates interleaved pairs (x[2i], x[2i+1]) of the last axis; cos/sin broadcast to x[..., d//2].

    Written as x·cos' + swap(x)·sin' (cos', sin' repeated per pair, swap(x) = (−x[2i+1], x[2i])) so that it
    stays one elementwise fusion.
    """
    cos2 = jnp.repeat(cos, 2, axis=-1)
    sin2 = jnp.repeat(sin, 2, axis=-1) * jnp.tile(jnp.array([-1.0, 1.0], cos.dtype), cos.shape[-1])
    pairs = x.reshape(*x.shape[:-1], x.shape[-1] // 2, 2)
    swapped = jnp.flip(pairs, axis=-1).reshape(x.shape)
    return x * cos2 + swapped * sin2


def causal_depthwise_conv(x_btc: jax.Array, weight_kc: jax.Array, bias_c: jax.Array) -> jax.Array:
    """Depthwise causal convolution: out[t] = bias + sum_s weight[s] * x[t - (k-1) + s]; out t sees x[t-k+1..t].

    weight_kc[k-1] multiplies the current token (the layout of torch Conv1d weight[c, 0, :] with left padding).
    """
    k = weight_kc.shape[0]
    t = x_btc.shape[1]
    padded = jnp.pad(x_btc, ((0, 0), (k - 1, 0), (0, 0)))
    out = bias_c.astype(x_btc.dtype) + sum(padded[:, s : s + t, :] * weight_kc[s].astype(x_btc.dtype) for s in range(k))
    return out


def token_scale(mini_batch_size: int, token_idx_offset: jax.Array, dtype: DTypeLike = jnp.float32) -> jax.Array:
    """max(1/(i+1) + δ_i, 0) for positions i = 0..mini_batch_size-1: the row factor of η."""
    base = 1.0 / jnp.arange(1, mini_batch_size + 1, dtype=dtype)
    return jnp.maximum(base + token_idx_offset.astype(dtype), 0.0)


def token_lr(
    x_btc: jax.Array,
    lr_weight_hc: jax.Array,
    lr_bias_h: jax.Array,
    base_lr: float,
    head_dim: int,
    dtype: DTypeLike = jnp.float32,
) -> jax.Array:
    """base_lr · σ(x_j·w_h + c_h) / head_dim, [B, h, T] in dtype: the column factor of η.

    A non-finite base_lr gives that constant, independent of the parameters (base_lr · σ(…) would give their
    backward pass 0 · ∞ = NaN); the layers skip and count every update whose η is not finite."""
    if not math.isfinite(base_lr):
        return jnp.full((x_btc.shape[0], lr_weight_hc.shape[0], x_btc.shape[1]), base_lr, dtype)
    # x @ wᵀ then a transpose of the small [B, T, h] result (an einsum straight to [B, h, T] transposes x)
    logits = (x_btc.astype(dtype) @ lr_weight_hc.astype(dtype).T).swapaxes(1, 2)
    return base_lr * jax.nn.sigmoid(logits + lr_bias_h.astype(dtype)[None, :, None]) / head_dim


def clip_by_norm(g: jax.Array, max_norm: float | None) -> jax.Array:
    """Scales each vector of the last axis down to L2 norm <= max_norm (identity for None)."""
    if max_norm is None:
        return g
    norm = jnp.sqrt(jnp.sum(g * g, axis=-1, keepdims=True))
    return g * jnp.minimum(1.0, max_norm / jnp.maximum(norm, 1e-30))
