"""Shared helpers of the ponderttt-ttt tests."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ponderttt.ttt import TTTConfig


def make_layer(cls, cfg: TTTConfig, seed: int = 0):
    """A tiny layer whose outputs are O(1), so that tolerances can be absolute."""
    layer = cls(cfg, rngs=nnx.Rngs(seed))
    if hasattr(layer, "o_proj"):
        layer.o_proj[...] = jnp.eye(cfg.hidden_size)  # y = the post-norm output
    if hasattr(layer, "lora_b"):  # a non-zero initial delta, so that outputs test more than the update
        layer.lora_b[...] = 0.3 * jax.random.normal(jax.random.key(seed + 1), layer.lora_b[...].shape)
        layer.qkv_proj[...] = layer.qkv_proj[...] * 10.0
    return layer


def max_abs(a, b) -> float:
    return max(float(jnp.max(jnp.abs(x - y))) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True))


def assert_close(a, b, what: str, tol: float) -> None:
    """Max abs difference within tol, relative to the reference's scale when that exceeds 1."""
    scale = max(1.0, max(float(jnp.max(jnp.abs(x))) for x in jax.tree.leaves(b)))
    err = max_abs(a, b)
    assert err <= tol * scale, f"{what} differ by {err} (scale {scale})"


def random_case(layer, rng: np.random.Generator, seq: int, lam: float, with_reset: bool, dtype=jnp.float32):
    """Inputs of a dual-vs-primal check for 2 sequences: x [2, seq, C]; per (sequence, mini-batch) gates (λ for
    sequence 0, a random mix of 0, 0.5 and λ for sequence 1); random resets or None; a perturbed initial state."""
    cfg = layer.cfg
    x = jnp.asarray(rng.normal(size=(2, seq, cfg.hidden_size)), dtype)
    num_mb = -(-seq // cfg.mini_batch_size)
    gate = jnp.asarray(np.stack([np.full(num_mb, lam), rng.choice([0.0, 0.5, lam], size=num_mb)]), dtype)
    reset = jnp.asarray(rng.random((2, seq)) < 0.2) if with_reset else None
    state = jax.tree.map(lambda a: a + jnp.asarray(0.05 * rng.normal(size=a.shape), a.dtype), layer.init_state(2))
    return x, gate, reset, state


# Tests run tiny shapes: compile time dominates, so compile with XLA's cheap CPU settings.
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


@functools.partial(jax.jit, static_argnums=(0, 6, 7), compiler_options=FAST_COMPILE)
def _dual(graphdef, params, x, gating_scale, reset_mask, state, num_steps, chunk_size):
    layer = nnx.merge(graphdef, params)
    return layer(
        x, gating_scale=gating_scale, reset_mask=reset_mask, state=state, num_steps=num_steps, chunk_size=chunk_size
    )


@functools.partial(jax.jit, static_argnums=(0, 6), compiler_options=FAST_COMPILE)
def _primal(graphdef, params, x, gating_scale, reset_mask, state, num_steps):
    layer = nnx.merge(graphdef, params)
    return layer.primal_forward(x, gating_scale=gating_scale, reset_mask=reset_mask, state=state, num_steps=num_steps)


@functools.partial(jax.jit, static_argnums=(0, 6), compiler_options=FAST_COMPILE)
def _decode(graphdef, params, x_b1c, dstate, gating_scale, reset, num_steps):
    layer = nnx.merge(graphdef, params)
    return layer.decode_step(x_b1c, dstate, gating_scale=gating_scale, reset=reset, num_steps=num_steps)


def dual(layer, x, gating_scale=None, reset_mask=None, state=None, *, num_steps=1, chunk_size=None):
    """Jitted `layer(x, ...)`."""
    return _dual(*nnx.split(layer), x, gating_scale, reset_mask, state, num_steps, chunk_size)


def primal(layer, x, gating_scale=None, reset_mask=None, state=None, *, num_steps=1):
    """Jitted `layer.primal_forward(x, ...)`."""
    return _primal(*nnx.split(layer), x, gating_scale, reset_mask, state, num_steps)


def decode(layer, x_b1c, dstate, gating_scale=None, reset=None, *, num_steps=1):
    """Jitted `layer.decode_step(...)`."""
    return _decode(*nnx.split(layer), x_b1c, dstate, gating_scale, reset, num_steps)
