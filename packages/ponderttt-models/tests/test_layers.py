"""The shared math: blockwise and per-head looped causal attention equal full attention; RoPE, norm invariants."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ponderttt.models.layers import apply_rope, attention, causal_mask, rms_norm, rope_inv_freq


@pytest.mark.parametrize(("block", "window", "kv_heads"), [(4, None, 4), (3, 5, 2), (8, 2, 1), (5, None, 1)])
def test_blockwise_attention_equals_full_attention(block, window, kv_heads):
    b, t, h, d = 2, 19, 4, 6
    keys = jax.random.split(jax.random.key(0), 3)
    q = jax.random.normal(keys[0], (b, t, h, d))
    k = jax.random.normal(keys[1], (b, t, kv_heads, d))
    v = jax.random.normal(keys[2], (b, t, kv_heads, d))
    valid = np.ones((b, t), bool)
    valid[1, :6] = False  # left padding
    slots = jnp.broadcast_to(jnp.arange(t), (b, t))
    mask = causal_mask(slots, jnp.arange(t), jnp.asarray(valid), window)
    attend = jax.jit(attention, static_argnames=("scale", "query_block", "window", "loop"))
    full = attend(q, k, v, mask, 0.3)
    blocked = attend(q, k, v, mask, 0.3, query_block=block, window=window)
    looped = attend(q, k, v, mask, 0.3, query_block=block, window=window, loop=True)
    assert np.isfinite(np.asarray(blocked)).all()  # padded query rows see no key: finite, meaningless
    np.testing.assert_allclose(np.asarray(blocked)[valid], np.asarray(full)[valid], atol=1e-5)
    np.testing.assert_allclose(np.asarray(looped), np.asarray(blocked), atol=1e-6)


def test_rope_preserves_norms_and_relative_positions():
    x = jax.random.normal(jax.random.key(1), (1, 5, 2, 8))
    inv = jnp.asarray(rope_inv_freq(8, 10_000.0))
    pos = jnp.arange(5)[None]
    rotated = apply_rope(x, pos, inv)
    np.testing.assert_allclose(jnp.linalg.norm(rotated, axis=-1), jnp.linalg.norm(x, axis=-1), rtol=1e-5)
    # <R(p) a, R(p) b> depends on nothing but the offset: shifting both positions changes nothing.
    a, c = apply_rope(x, pos + 7, inv), apply_rope(x[:, ::-1], pos + 7, inv)
    a0, c0 = rotated, apply_rope(x[:, ::-1], pos, inv)
    np.testing.assert_allclose((a * c).sum(-1), (a0 * c0).sum(-1), atol=1e-4)
    assert rope_inv_freq(8, 10_000.0, scale=8.0)[1] == pytest.approx(rope_inv_freq(8, 10_000.0)[1] / 8)


def test_gemma_rms_norm_uses_one_plus_weight():
    x = jnp.asarray([[3.0, 4.0]])
    np.testing.assert_allclose(rms_norm(x, jnp.zeros(2), 0.0), x / jnp.sqrt(12.5), rtol=1e-6)
    np.testing.assert_allclose(rms_norm(x, jnp.ones(2), 0.0), 2 * x / jnp.sqrt(12.5), rtol=1e-6)
