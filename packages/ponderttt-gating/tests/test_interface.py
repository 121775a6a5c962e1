"""Every registered gate follows the one interface: jit, vmap over independent streams, explicit keys."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from ponderttt.gating import SKIP, UPDATE_4, Gate, GateInput, GateOutput, available_gates, make_gate

F, B, R = 6, 5, 3  # features, sequences per stream, independent streams


def _gates():
    return {
        "fixed:update_4": make_gate("fixed:update_4"),
        "random": make_gate("random", rate=0.4),
        "random:exact": make_gate("random:exact", rate=0.4),
        "oracle:batch": make_gate("oracle:batch", rate=0.4),
        "recon": make_gate("recon", tau=0.0, spread=1.0, signal_index=2),
        "recon:inverted": make_gate("recon:inverted", tau=0.0, signal_index=2),
        "gumbel": make_gate("gumbel", num_features=F, hidden=(8,), anneal_steps=100, rngs=nnx.Rngs(0)),
        "gumbel:steps": make_gate("gumbel:steps", num_features=F, hidden=(8,), anneal_steps=100, rngs=nnx.Rngs(1)),
        "continuous": make_gate("continuous", num_features=F, hidden=(8,), rngs=nnx.Rngs(2)),
        "ppo": make_gate("ppo", num_features=F, hidden=(8,), rngs=nnx.Rngs(3)),
    }


def test_every_registered_gate_is_covered_here():
    assert {spec.partition(":")[0] for spec in _gates()} == set(available_gates())


def _as_pure(gate, train):
    """(params, inputs, state, key) -> GateOutput; NNX gates are split so their parameters are explicit inputs."""
    if isinstance(gate, nnx.Module):
        graphdef, params = nnx.split(gate)
        return params, lambda p, i, s, k: nnx.merge(graphdef, p)(i, s, k, train=train)
    return (), lambda p, i, s, k: gate(i, s, k, train=train)


@pytest.mark.parametrize("train", [False, True])
def test_gates_jit_and_vmap_over_independent_streams(train):
    feats = jax.random.normal(jax.random.key(0), (R, B, F))
    adv = jax.random.normal(jax.random.key(1), (R, B))
    step = jnp.full((R,), 7, jnp.int32)
    keys = jax.random.split(jax.random.key(2), R)
    for spec, gate in _gates().items():
        assert isinstance(gate, Gate), spec
        params, fn = _as_pure(gate, train)
        states = jax.tree.map(lambda x: jnp.stack([x] * R), gate.init_state(B))
        inputs = GateInput(feats, advantage=adv, step=step)
        batched = jax.jit(jax.vmap(fn, in_axes=(None, 0, 0, 0)))(params, inputs, states, keys)
        assert isinstance(batched, GateOutput)
        assert batched.scale.shape == (R, B) and batched.scale.dtype == jnp.float32, spec
        if gate.kind == "discrete":
            assert batched.action.shape == (R, B) and batched.action.dtype == jnp.int32, spec
            assert int(batched.action.min()) >= SKIP and int(batched.action.max()) <= UPDATE_4, spec
        else:
            assert batched.action is None
        for r in range(R):  # each stream alone, unjitted, gives the same decision and state
            one = fn(params, GateInput(feats[r], advantage=adv[r], step=step[r]), gate.init_state(B), keys[r])
            np.testing.assert_allclose(batched.scale[r], one.scale, rtol=1e-5, atol=1e-6, err_msg=spec)
            if one.action is not None:
                np.testing.assert_array_equal(batched.action[r], one.action, err_msg=spec)
            for a, b in zip(jax.tree.leaves(one.state), jax.tree.leaves(batched.state), strict=True):
                np.testing.assert_allclose(b[r], a, rtol=1e-5, atol=1e-6, err_msg=spec)


def test_per_sequence_gates_vmap_over_sequences():
    """Gates without batch coupling decide each sequence on its own: vmap over B single rows == the batched call."""
    feats = jax.random.normal(jax.random.key(3), (B, F))
    gates = _gates()
    for spec in ["fixed:update_4", "gumbel", "gumbel:steps", "continuous", "ppo"]:
        gate = gates[spec]
        params, fn = _as_pure(gate, False)
        whole = fn(params, GateInput(feats), gate.init_state(B), None)
        one_row = lambda f, fn=fn, params=params, gate=gate: fn(params, GateInput(f[None]), gate.init_state(1), None)
        rows = jax.vmap(lambda f, one_row=one_row: one_row(f).scale[0])(feats)
        np.testing.assert_allclose(rows, whole.scale, rtol=1e-5, atol=1e-6, err_msg=spec)


def test_causal_labels_and_kinds():
    gates = _gates()
    assert [spec for spec, g in gates.items() if not g.causal] == ["oracle:batch"]
    assert [spec for spec, g in gates.items() if g.kind == "continuous"] == ["continuous"]


@pytest.mark.parametrize("spec", ["recon", "random", "gumbel", "continuous"])
def test_roll_gate_equals_deciding_chunk_by_chunk(spec):
    """roll_gate's scan equals a Python loop over the chunks (state carried, one key per chunk), and λ of a learned
    gate stays differentiable through it."""
    from ponderttt.gating import roll_gate

    b, n, f = 3, 5, 6
    features = jax.random.normal(jax.random.key(0), (b, n, f))
    signal = jax.random.uniform(jax.random.key(1), (b, n))
    keys = jax.random.split(jax.random.key(2), n)
    options = {"recon": dict(target_rate=0.4, calibration_signal=np.linspace(0.0, 1.0, 11)),
               "random": dict(rate=0.4)}.get(spec, dict(num_features=f, rngs=nnx.Rngs(0)))
    gate = make_gate(spec, **options)
    train = spec in ("gumbel", "continuous")
    step = jnp.asarray(7, jnp.int32)  # the training step (Gumbel temperature annealing)
    out, final = roll_gate(gate, features, keys, signal=signal, step=step, train=train)
    state, scales = gate.init_state(b), []
    for j in range(n):
        step_out = gate(GateInput(features=features[:, j], signal=signal[:, j], step=step), state, keys[j],
                        train=train)
        state = step_out.state
        scales.append(step_out.scale)
    np.testing.assert_allclose(out.scale, jnp.stack(scales, axis=1), rtol=1e-6, atol=1e-6)
    assert out.scale.shape == (b, n) and (out.action is None) == (gate.kind == "continuous")
    for got, want in zip(jax.tree.leaves(final), jax.tree.leaves(state), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
    if train:
        graphdef, params = nnx.split(gate, nnx.Param)
        total = lambda p: roll_gate(nnx.merge(graphdef, p), features, keys, signal=signal, step=step,
                                    train=True)[0].scale.sum()
        grads = jax.grad(total)(params)
        assert any(float(jnp.abs(g).sum()) > 0 for g in jax.tree.leaves(grads))
