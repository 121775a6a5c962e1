"""In float64 the dual form equals the primal (sequential gradient-descent) form far below 1e-5, for every k.

The float32 check (test_dual_primal.py) must allow the float32 gap of k sequential inner steps; run in float64
(`jax.enable_x64`, float64 parameters and inputs: the layers then keep their whole inner loop in float64) the
two forms agree to rounding of float64, so any mistake in the dual form's algebra would show up here.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from ttt_testutil import assert_close, dual, make_layer, primal, random_case

from ponderttt.ttt import TTTMLP, LoRATTT, TTTConfig, TTTLinear

CLASSES = {"linear": TTTLinear, "mlp": TTTMLP, "lora": LoRATTT}
TOL = 1e-5  # the tolerance
# What float64 must reach here, 10^5 below the 1e-5: measured max errors over these shapes are
# 1e-16 .. 1.2e-14 (outputs and final weights, 3 seeds each).
FLOAT64_TOL = 1e-10

# (class, variant, mini_batch_size, seq_len, num_steps, with resets): every k in {1, 2, 4} on the fused scan body
# (TTT-Linear and LoRA-TTT without resets) and on the generic one (resets, TTT-MLP); a short last mini-batch.
SHAPES = [
    ("linear", "base", 4, 10, 1, False),
    ("linear", "base", 4, 10, 2, False),
    ("linear", "base", 4, 10, 4, False),
    ("linear", "mamba", 4, 9, 1, True),
    ("linear", "mamba", 4, 9, 2, True),
    ("linear", "mamba", 4, 9, 4, True),
    ("mlp", "base", 2, 7, 2, False),
    ("lora", "base", 4, 10, 1, False),
    ("lora", "base", 4, 10, 4, True),
]


def _to_float64(layer):
    """The same layer with float64 parameters (call under jax.enable_x64)."""
    graphdef, state = nnx.split(layer)
    return nnx.merge(graphdef, jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), state))


@pytest.mark.slow  # ~30 s: one float64 compile of each form per shape
@settings(max_examples=18, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    shape=st.sampled_from(SHAPES),
    lam=st.sampled_from([0.0, 0.3, 1.0, 2.5]),
    seed=st.integers(0, 2**16),
)
def test_dual_equals_primal_in_float64(shape, lam, seed):
    name, variant, mbs, seq, num_steps, with_reset = shape
    cfg = TTTConfig.tiny(variant=variant, mini_batch_size=mbs, chunk_size=4 * mbs, lora_rank=4)
    layer32 = make_layer(CLASSES[name], cfg, seed % 3)
    with jax.enable_x64(True):
        layer = _to_float64(layer32)
        x, gate, reset, state = random_case(layer, np.random.default_rng(seed), seq, lam, with_reset, jnp.float64)
        y, stats = dual(layer, x, gate, reset, state, num_steps=num_steps)
        y_primal, state_primal = primal(layer, x, gate, reset, state, num_steps=num_steps)
        assert y.dtype == jnp.float64 and stats.loss_after.dtype == jnp.float64
        assert all(a.dtype == jnp.float64 for a in jax.tree.leaves(stats.state))
        assert FLOAT64_TOL <= TOL
        assert_close(y, y_primal, "float64 outputs", FLOAT64_TOL)
        assert_close(stats.state, state_primal, "float64 final fast weights", FLOAT64_TOL)
        assert stats.skipped_updates.tolist() == [0, 0]
