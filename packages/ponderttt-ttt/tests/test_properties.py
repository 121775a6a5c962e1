"""Invariants of the layers: causality, λ = 0, non-finite skips, per-sequence stats, carry/reset, jit/grad."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from ttt_testutil import FAST_COMPILE, dual, make_layer, max_abs, primal

from ponderttt.ttt import TTTMLP, FrozenWeight, LoRATTT, TTTConfig, TTTLinear, expand_gating_scale

CFG = TTTConfig.tiny(lora_rank=4)  # hidden 32, 4 heads, mini-batch 4, chunk 8
B, T = 2, 12


def _x(seed=0, t=T):
    return jax.random.normal(jax.random.key(seed), (B, t, CFG.hidden_size))


@pytest.mark.parametrize(
    ("cls", "variant"), [(TTTLinear, "base"), (TTTLinear, "mamba"), (TTTMLP, "base"), (LoRATTT, "base")]
)
def test_future_tokens_never_change_earlier_outputs(cls, variant):
    layer = make_layer(cls, CFG.replace(variant=variant))
    x = _x()
    t0 = 6  # inside the second mini-batch
    x_changed = x.at[:, t0:].set(jax.random.normal(jax.random.key(9), (B, T - t0, CFG.hidden_size)) * 3.0)
    # one call on [x; x_changed]: sequences are independent (tested below), so this is two runs in one compile
    y_all, stats_all = dual(layer, jnp.concatenate([x, x_changed]), jnp.array([1.0, 2.0, 1.0, 2.0]), num_steps=2)
    y, y_changed = y_all[:B], y_all[B:]
    stats = jax.tree.map(lambda a: a[:B], stats_all)
    stats_changed = jax.tree.map(lambda a: a[B:], stats_all)
    assert max_abs(y[:, :t0], y_changed[:, :t0]) <= 1e-6
    assert float(jnp.max(jnp.abs(y[:, t0:] - y_changed[:, t0:]))) > 1e-3  # the change is visible later
    # statistics of the mini-batch before t0 (tokens 0..3) do not depend on the future either
    assert max_abs(stats.loss_after[:, 0], stats_changed.loss_after[:, 0]) <= 1e-6


@pytest.mark.parametrize(("cls", "num_steps"), [(TTTLinear, 4), (TTTMLP, 1), (LoRATTT, 2)])
def test_zero_gate_leaves_fast_weights_bitwise_unchanged(cls, num_steps):
    layer = make_layer(cls, CFG)
    rng = np.random.default_rng(0)
    state = jax.tree.map(lambda a: a + rng.normal(size=a.shape).astype(np.float32) * 0.1, layer.init_state(B))
    gate = jnp.array([0.0, 1.0])  # sequence 0 skips, sequence 1 updates
    y, stats = dual(layer, _x(), gate, None, state, num_steps=num_steps)
    for before, after in zip(jax.tree.leaves(state), jax.tree.leaves(stats.state), strict=True):
        assert np.array_equal(np.asarray(before[0]), np.asarray(after[0]))  # bitwise
        assert not np.array_equal(np.asarray(before[1]), np.asarray(after[1]))
    y_probe, probe = dual(layer, _x(), None, None, state, num_steps=0)  # the no-update forward
    assert np.array_equal(np.asarray(y[0]), np.asarray(y_probe[0]))
    # with unchanged weights, the loss after each step is the loss before it, exactly
    assert np.array_equal(np.asarray(stats.loss_after[0, :, -1]), np.asarray(stats.loss_step0[0]))
    assert max_abs(probe.loss_step0[0], stats.loss_step0[0]) <= 1e-6  # the probe sees the same weights


def test_lora_is_an_exact_no_op_without_update():
    layer = LoRATTT(CFG, rngs=nnx.Rngs(0))
    y, stats = dual(layer, _x(), 0.0, num_steps=1)
    assert float(jnp.max(jnp.abs(y))) == 0.0
    y_probe, _ = dual(layer, _x(), None, num_steps=0)
    assert float(jnp.max(jnp.abs(y_probe))) == 0.0
    y_update, _ = dual(layer, _x(), None, num_steps=1)
    assert float(jnp.min(jnp.max(jnp.abs(y_update), axis=-1))) > 0.0  # every token sees its own update (j <= i)
    # the frozen projection is not a trainable parameter
    assert isinstance(layer.frozen_proj, FrozenWeight)
    params = nnx.state(layer, nnx.Param)
    assert "frozen_proj" not in params and "lora_b" in params


@pytest.mark.parametrize("cls", [TTTLinear, LoRATTT])
def test_non_finite_update_is_skipped_and_counted(cls):
    layer = make_layer(cls, CFG)
    x = _x()
    gate = jnp.array([1.0, jnp.inf])  # sequence 1: every update of every mini-batch is non-finite
    y, stats = dual(layer, x, gate, num_steps=2)
    assert stats.skipped_updates.tolist() == [0, 3]
    assert bool(jnp.all(jnp.isfinite(y)))
    for init, after in zip(jax.tree.leaves(layer.init_state(B)), jax.tree.leaves(stats.state), strict=True):
        assert np.array_equal(np.asarray(init[1]), np.asarray(after[1]))
    y_probe, _ = dual(layer, x, None, num_steps=0)
    assert np.array_equal(np.asarray(y[1]), np.asarray(y_probe[1]))  # fell back to the no-update output
    y_ok, stats_ok = dual(layer, x, jnp.array([1.0, 1.0]), num_steps=2)
    assert max_abs(y[0], y_ok[0]) == 0.0  # sequence 0 is untouched by sequence 1's failure


def test_stats_are_per_sequence_and_per_chunk():
    layer = make_layer(TTTLinear, CFG)
    x = _x(t=13)  # 4 mini-batches (the last has 1 token), 2 chunks of 8 tokens (the last has 5)
    gate = jnp.array([[1.0, 0.0], [0.5, 2.0]])  # [B, n_chunks]
    y, stats = dual(layer, x, gate, num_steps=2)
    assert stats.loss_step0.shape == (B, 4) and stats.loss_after.shape == (B, 4, 2)
    assert stats.chunk_loss_after.shape == (B, 2, 2) and stats.tokens_per_chunk.tolist() == [8, 5]
    assert stats.tokens_per_minibatch.tolist() == [4, 4, 4, 1]
    w = np.array([4.0, 4.0, 4.0, 1.0])
    want = np.stack(
        [np.asarray(stats.loss_step0)[:, :2].mean(1), (np.asarray(stats.loss_step0)[:, 2:] * w[2:]).sum(1) / 5]
    )
    assert np.allclose(np.asarray(stats.chunk_loss_step0), want.T, rtol=1e-6)
    # the same gate given per mini-batch gives the same result
    y_mb, stats_mb = dual(layer, x, jnp.repeat(gate, 2, axis=1), num_steps=2)
    assert max_abs(y, y_mb) == 0.0 and max_abs(stats.state, stats_mb.state) == 0.0
    # each sequence alone gives the same outputs and stats as in the batch
    for b in range(B):
        y_b, stats_b = dual(layer, x[b : b + 1], gate[b : b + 1], num_steps=2)
        assert max_abs(y_b[0], y[b]) <= 1e-6
        assert max_abs(stats_b.loss_after[0], stats.loss_after[b]) <= 1e-5
        assert max_abs(stats_b.loss_init[0], stats.loss_init[b]) <= 1e-5


def test_gating_scale_shapes_and_errors():
    assert expand_gating_scale(None, 2, 3, 2, 2).shape == (2, 3)
    assert expand_gating_scale(0.5, 2, 3, 2, 2).tolist() == [[0.5] * 3] * 2
    assert expand_gating_scale(jnp.array([1.0, 2.0]), 2, 3, 2, 2).tolist() == [[1.0] * 3, [2.0] * 3]
    per_chunk = expand_gating_scale(jnp.array([[1.0, 2.0], [3.0, 4.0]]), 2, 3, 2, 2)
    assert per_chunk.tolist() == [[1.0, 1.0, 2.0], [3.0, 3.0, 4.0]]
    with pytest.raises(ValueError, match=r"gating_scale has shape \(2, 5\)"):
        expand_gating_scale(jnp.ones((2, 5)), 2, 3, 2, 2)
    layer = TTTLinear(CFG, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="chunk_size=6"):
        layer(_x(), chunk_size=6)
    with pytest.raises(ValueError, match="expected \\[batch, time, 32\\]"):
        layer(jnp.ones((1, 4, 16)))
    with pytest.raises(ValueError, match="variant='linear'"):
        TTTConfig(variant="linear")


def test_carry_and_reset_protocols():
    layer = make_layer(TTTLinear, CFG)
    x = _x(t=16)
    y, stats = dual(layer, x, None, num_steps=2)
    # carry: two halves with the state carried equal the whole (split at a mini-batch boundary)
    y1, s1 = dual(layer, x[:, :8], None, num_steps=2)
    y2, s2 = dual(layer, x[:, 8:], None, None, s1.state, num_steps=2)
    assert max_abs(jnp.concatenate([y1, y2], 1), y) <= 1e-5 and max_abs(s2.state, stats.state) <= 1e-5
    # reset: a document start at t=8 equals running the second half from the initial weights
    reset = jnp.zeros((B, 16), bool).at[:, 8].set(True)
    y_reset, s_reset = dual(layer, x, None, reset, num_steps=2)
    y_fresh, s_fresh = dual(layer, x[:, 8:], None, num_steps=2)
    assert max_abs(y_reset[:, 8:], y_fresh) <= 1e-5 and max_abs(s_reset.state, s_fresh.state) <= 1e-5
    assert max_abs(y_reset[:, :8], y1) <= 1e-5
    # an all-False mask is the same as no mask (the generic scan body takes the LayerNorm gradient with jax.vjp,
    # the fused one writes it out: float32 rounding apart, they agree)
    y_none, _ = dual(layer, x, None, jnp.zeros((B, 16), bool), num_steps=2)
    assert max_abs(y_none, y) <= 1e-5


def test_jit_and_grad_through_the_layer_and_the_gate():
    x = _x()

    def loss_fn(params, gate, graphdef):
        y, stats = nnx.merge(graphdef, params)(x, gating_scale=gate, num_steps=2)
        return jnp.mean(y**2) + jnp.mean(stats.loss_after)

    grad_fn = jax.jit(jax.grad(loss_fn, argnums=(0, 1)), static_argnums=2, compiler_options=FAST_COMPILE)
    graphdef, params = nnx.split(make_layer(TTTLinear, CFG.replace(remat_group=2)))
    grads, grad_gate = grad_fn(params, jnp.array([0.7, 1.3]), graphdef)
    assert all(bool(jnp.all(jnp.isfinite(g))) for g in jax.tree.leaves(grads))
    assert float(jnp.abs(grads["W1"][...]).max()) > 0 and float(jnp.abs(grads["lr_weight"][...]).max()) > 0
    assert bool(jnp.all(jnp.isfinite(grad_gate))) and float(jnp.min(jnp.abs(grad_gate))) > 0
    # remat over groups of mini-batches changes nothing but memory
    graphdef_plain, params_plain = nnx.split(make_layer(TTTLinear, CFG))
    grads_plain, grad_gate_plain = grad_fn(params_plain, jnp.array([0.7, 1.3]), graphdef_plain)
    assert max_abs(grad_gate, grad_gate_plain) <= 1e-5
    assert max_abs(grads, grads_plain) <= 1e-5
    # the carried weights stay differentiable in λ at λ = 0 (a continuous gate can learn to open)
    state_sum = lambda gate: jnp.sum(nnx.merge(graphdef, params)(x, gating_scale=gate)[1].state["W1"][0])
    assert abs(float(jax.jit(jax.grad(state_sum), compiler_options=FAST_COMPILE)(jnp.array([0.0, 1.0]))[0])) > 0
    # nnx.jit on the module works too
    y, _ = nnx.jit(lambda layer, x: layer(x))(make_layer(TTTLinear, CFG), x)
    assert y.shape == x.shape


def test_bfloat16_activations_keep_a_float32_inner_loop():
    layer = make_layer(TTTLinear, CFG)
    x = _x()
    y32, s32 = dual(layer, x)
    y16, s16 = dual(layer, x.astype(jnp.bfloat16))
    assert y16.dtype == jnp.bfloat16 and s16.state["W1"].dtype == jnp.float32
    assert s16.loss_step0.dtype == jnp.float32
    assert float(jnp.max(jnp.abs(y16.astype(jnp.float32) - y32))) < 0.1
    assert bool(jnp.all(jnp.isfinite(s16.state["W1"])))


def test_inner_gradient_clipping_is_exact_in_both_forms():
    clipped = make_layer(TTTLinear, CFG.replace(inner_grad_clip=0.05))
    x = _x()
    y, stats = dual(clipped, x, None, num_steps=2)
    y_primal, state_primal = primal(clipped, x, None, num_steps=2)
    assert max_abs(y, y_primal) <= 1e-5 and max_abs(stats.state, state_primal) <= 1e-5
    y_free, stats_free = dual(make_layer(TTTLinear, CFG), x, None, num_steps=2)
    assert max_abs(stats.state, stats_free.state) > 1e-4  # the clip is active at this threshold
