"""Non-finite inner updates (λ = ∞, λ = 1e30, base_lr = ∞): the outputs stay finite, the bad sequence's updates are
skipped and counted, and the outer gradient stays finite. The bad sequence contributes to the gradient exactly what
a sequence without update (λ = 0) contributes, and the good one exactly what it contributes when run alone."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from ttt_testutil import FAST_COMPILE, assert_close, decode, dual, make_layer, max_abs

from ponderttt.ttt import TTTMLP, LoRATTT, TTTConfig, TTTLinear

CFG = TTTConfig.tiny(lora_rank=4)  # hidden 32, 4 heads, mini-batch 4, chunk 8
T = 12  # 3 mini-batches
CLASSES = {"linear": TTTLinear, "mlp": TTTMLP, "lora": LoRATTT}
# (class, variant, num_steps, with resets): the fused scan bodies (TTT-Linear, LoRA-TTT without resets) and the
# generic one (resets, TTT-MLP), one and two inner steps.
SETUPS = [
    ("linear", "base", 1, False),
    ("linear", "mamba", 2, True),
    ("mlp", "base", 1, False),
    ("mlp", "base", 2, True),
    ("lora", "base", 2, False),
    ("lora", "base", 1, True),
]
# Float32 gradients of the same maths in different programs (a bad sequence or λ = 0 beside the good one, or the
# good one alone) differ by rounding only: measured at most 7e-7 of the largest entry over these setups; 1e-5
# leaves room for other CPUs' rounding.
GRAD_TOL = 1e-5


def _x(batch: int, dtype=jnp.float32) -> jax.Array:
    return jax.random.normal(jax.random.key(0), (batch, T, CFG.hidden_size), dtype)


def _reset(batch: int, with_reset: bool) -> jax.Array | None:
    return jnp.zeros((batch, T), bool).at[:, 5].set(True) if with_reset else None


@functools.partial(jax.jit, static_argnums=(0, 6, 7), compiler_options=FAST_COMPILE)
def _outputs_and_grads(graphdef, params, x, gate, weights, reset, num_steps, primal):
    """y, skipped updates (dual form; zeros for the primal form), and the gradients w.r.t. the parameters and λ of
    Σ_b weights_b · (a loss of sequence b's outputs, inner losses and final fast weights)."""

    def loss(params, gate):
        layer = nnx.merge(graphdef, params)
        if primal:
            y, state = layer.primal_forward(x, gating_scale=gate, num_steps=num_steps, reset_mask=reset)
            inner, skipped = 0.0, jnp.zeros((x.shape[0],), jnp.int32)
        else:
            y, stats = layer(x, gating_scale=gate, num_steps=num_steps, reset_mask=reset)
            state, skipped = stats.state, stats.skipped_updates
            inner = jnp.mean(stats.loss_after, axis=(1, 2)) + jnp.mean(stats.loss_step0, axis=1)
        per_sequence = jnp.mean(y**2, axis=(1, 2)) + inner
        # tanh: bounded, also for the huge (finite, kept) weights of TTT-Linear at λ = 1e30
        per_sequence += sum(jnp.mean(jnp.tanh(w.reshape(w.shape[0], -1)), axis=1) for w in jax.tree.leaves(state))
        return jnp.sum(weights * per_sequence), (y, skipped)

    (_, (y, skipped)), grads = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(params, gate)
    return y, skipped, grads


def run(layer, x, gate, weights, reset=None, *, num_steps=1, primal=False):
    """(y, skipped [B], (parameter gradients, λ gradient)) of `_outputs_and_grads`."""
    graphdef, params = nnx.split(layer)
    return _outputs_and_grads(
        graphdef, params, x, jnp.asarray(gate, x.dtype), jnp.asarray(weights, x.dtype), reset, num_steps, primal
    )


def _all_finite(tree) -> bool:
    return all(bool(jnp.all(jnp.isfinite(a))) for a in jax.tree.leaves(tree))


def _non_finite_leaves(grads) -> list[str]:
    return [
        jax.tree_util.keystr(path)
        for path, g in jax.tree_util.tree_leaves_with_path(grads)
        if not bool(jnp.all(jnp.isfinite(g)))
    ]


@pytest.mark.slow  # ~1 min: a few gradient compiles per setup
@pytest.mark.parametrize("primal", [False, True], ids=["dual", "primal"])
@pytest.mark.parametrize(("name", "variant", "num_steps", "with_reset"), SETUPS)
@pytest.mark.parametrize("bad_lam", [np.inf, 1e30], ids=["lam_inf", "lam_1e30"])
def test_one_bad_sequence_skips_its_updates_and_adds_a_no_update_gradient(
    name, variant, num_steps, with_reset, bad_lam, primal
):
    layer = make_layer(CLASSES[name], CFG.replace(variant=variant))
    x, reset = _x(2), _reset(2, with_reset)
    y, skipped, (grads, grad_gate) = run(
        layer, x, [1.0, bad_lam], [1.0, 1.0], reset, num_steps=num_steps, primal=primal
    )
    assert _all_finite(y)
    assert not _non_finite_leaves(grads), _non_finite_leaves(grads)
    assert _all_finite(grad_gate) and float(grad_gate[1]) == 0.0  # a skipped update passes no gradient to its λ
    # λ = 1e30 overflows TTT-MLP's and LoRA-TTT's updates (products of two updated matrices); TTT-Linear's LayerNorm
    # keeps its huge update finite, so it is kept.
    bad = name != "linear" or bad_lam == np.inf
    if not primal:
        assert skipped.tolist() == [0, 3 if bad else 0]
    if not bad:
        return
    # The bad sequence contributes what a sequence without update contributes ...
    y_ref, skipped_ref, (grads_ref, _) = run(
        layer, x, [1.0, 0.0], [1.0, 1.0], reset, num_steps=num_steps, primal=primal
    )
    assert skipped_ref.tolist() == [0, 0]
    assert max_abs(y, y_ref) == 0.0  # its outputs are the no-update outputs, bit for bit
    assert_close(grads, grads_ref, "gradients with the bad sequence vs with λ = 0 there", GRAD_TOL)
    # ... and the good sequence what it contributes alone.
    _, _, (grads_good, _) = run(layer, x, [1.0, bad_lam], [1.0, 0.0], reset, num_steps=num_steps, primal=primal)
    _, _, (grads_alone, _) = run(
        layer, x[:1], [1.0], [1.0], None if reset is None else reset[:1], num_steps=num_steps, primal=primal
    )
    assert_close(grads_good, grads_alone, "the good sequence's gradient in the batch vs alone", GRAD_TOL)


@pytest.mark.parametrize("primal", [False, True], ids=["dual", "primal"])
@pytest.mark.parametrize(("name", "variant", "num_steps", "with_reset"), SETUPS[::2])
def test_infinite_base_lr_skips_every_update_and_adds_the_no_update_gradient(
    name, variant, num_steps, with_reset, primal
):
    cls = CLASSES[name]
    x, reset = _x(2), _reset(2, with_reset)
    layer = make_layer(cls, CFG.replace(variant=variant, base_lr=float("inf")))
    y, skipped, (grads, grad_gate) = run(layer, x, [1.0, 0.5], [1.0, 1.0], reset, num_steps=num_steps, primal=primal)
    assert _all_finite(y)
    assert not _non_finite_leaves(grads), _non_finite_leaves(grads)
    assert grad_gate.tolist() == [0.0, 0.0]
    if not primal:
        assert skipped.tolist() == [3, 3]
    # the same layer with a finite base_lr and λ = 0: no update anywhere
    reference = make_layer(cls, CFG.replace(variant=variant))
    y_ref, _, (grads_ref, _) = run(reference, x, [0.0, 0.0], [1.0, 1.0], reset, num_steps=num_steps, primal=primal)
    assert max_abs(y, y_ref) == 0.0
    assert_close(grads, grads_ref, "gradients with base_lr = inf vs λ = 0", GRAD_TOL)


@pytest.mark.parametrize(("name", "variant", "num_steps", "with_reset"), SETUPS[::2])
def test_zero_gate_everywhere_is_the_no_update_forward_with_its_gradient(name, variant, num_steps, with_reset):
    layer = make_layer(CLASSES[name], CFG.replace(variant=variant))
    x, reset = _x(2), _reset(2, with_reset)
    y, skipped, (grads, grad_gate) = run(layer, x, [0.0, 0.0], [1.0, 1.0], reset, num_steps=num_steps)
    y_probe, stats_probe = dual(layer, x, None, reset, num_steps=0)
    assert skipped.tolist() == [0, 0]
    assert max_abs(y, y_probe) == 0.0  # the outputs of λ = 0 are the no-update outputs, bit for bit
    y0, stats0 = dual(layer, x, jnp.zeros(2), reset, num_steps=num_steps)
    assert max_abs(y0, y) == 0.0
    assert np.array_equal(np.asarray(stats0.loss_step0), np.asarray(stats_probe.loss_step0))
    # λ = 0 is not a skip: the gate keeps a gradient, so a continuous gate can learn to open
    assert _all_finite(grads) and float(jnp.min(jnp.abs(grad_gate))) > 0.0


@pytest.mark.parametrize(("name", "bad_lam"), [("linear", np.inf), ("mlp", 1e300), ("lora", 1e300)])
def test_float64_gradient_of_the_good_sequence_is_its_gradient_alone(name, bad_lam):
    """In float64 the good sequence's gradient in a batch with a bad one equals its gradient alone to rounding of
    float64 (1e300 overflows TTT-MLP's and LoRA-TTT's float64 updates as 1e30 does in float32)."""
    layer32 = make_layer(CLASSES[name], CFG)
    with jax.enable_x64(True):
        graphdef, state = nnx.split(layer32)
        layer = nnx.merge(graphdef, jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), state))
        x = _x(2, jnp.float64)
        y, skipped, (grads, _) = run(layer, x, [1.0, bad_lam], [1.0, 0.0])
        _, _, (grads_alone, _) = run(layer, x[:1], [1.0], [1.0])
        assert y.dtype == jnp.float64 and _all_finite(y)
        assert skipped.tolist() == [0, 3]
        assert_close(grads, grads_alone, "float64 gradient of the good sequence", 1e-12)


def test_decoding_counts_the_skipped_updates_of_an_infinite_gate():
    layer = make_layer(LoRATTT, CFG)
    dstate = layer.init_decode_state(2)
    x = _x(2)
    for t in range(8):  # two mini-batches
        y, dstate = decode(layer, x[:, t : t + 1], dstate, jnp.array([1.0, np.inf]), num_steps=1)
        assert _all_finite(y)
    assert dstate["skipped"].tolist() == [0, 2]
    for init, after in zip(jax.tree.leaves(layer.init_state(2)), jax.tree.leaves(dstate["fast"]), strict=True):
        assert np.array_equal(np.asarray(init[1]), np.asarray(after[1]))  # the bad sequence kept its weights
        assert not np.array_equal(np.asarray(init[0]), np.asarray(after[0]))


def test_rematerialised_scan_gives_the_same_finite_gradient():
    plain = make_layer(TTTMLP, CFG)
    remat = make_layer(TTTMLP, CFG.replace(remat_group=2))  # the same parameters (same seed)
    x, gate = _x(2), [1.0, 1e30]
    y, skipped, grads = run(plain, x, gate, [1.0, 1.0], num_steps=2)
    y_remat, skipped_remat, grads_remat = run(remat, x, gate, [1.0, 1.0], num_steps=2)
    assert skipped.tolist() == skipped_remat.tolist() == [0, 3]
    assert max_abs(y, y_remat) == 0.0 and _all_finite(grads_remat)
    assert_close(grads_remat, grads, "gradients with and without remat", GRAD_TOL)
