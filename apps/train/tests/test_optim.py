"""The trainers' optimisers from flags (`ponderttt.train.optim`): the defaults are the optimisers the trainers
always used (the same updates, bit for bit), the schedule's warm-up and end, the other rules, and bad values."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from ponderttt.train.config import AdapterConfig, BackboneConfig, ConfigError, GateConfig, OptimizerConfig
from ponderttt.train.optim import make_optimizer, warmup_steps


def updates(tx, steps=12):
    """The parameters after `steps` updates of a toy quadratic, from a fixed start."""
    params = {"w": jnp.linspace(-1.0, 1.0, 6), "b": jnp.ones((2, 3))}
    state = tx.init(params)
    for i in range(steps):
        grads = jax.tree.map(lambda p, scale=3.0 + i: scale * p - 0.1, params)
        step, state = tx.update(grads, state, params)
        params = optax.apply_updates(params, step)
    return params


@pytest.mark.parametrize(("section", "lr", "steps", "previous"), [
    ("backbone", 3e-3, 40, lambda lr, n: optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(
        optax.warmup_cosine_decay_schedule(0.0, lr, max(1, n // 10), n, end_value=lr * 0.1), b2=0.95,
        weight_decay=0.1))),
    ("adapter", 1e-3, 200, lambda lr, n: optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(
        optax.warmup_cosine_decay_schedule(0.0, lr, max(1, n // 10), n, end_value=lr * 0.1), weight_decay=0.0))),
    ("gate", 3e-4, 100, lambda lr, n: optax.chain(optax.clip_by_global_norm(1.0), optax.adam(lr))),
    ("ppo", 3e-4, 1600, lambda lr, n: optax.chain(optax.clip_by_global_norm(0.5), optax.adam(lr))),
])
def test_the_defaults_are_the_optimisers_the_trainers_used(section, lr, steps, previous):
    config = {"backbone": BackboneConfig().optimizer, "adapter": AdapterConfig().optimizer,
              "gate": GateConfig().optimizer, "ppo": GateConfig().ppo_optimizer}[section]
    tx, _ = make_optimizer(config, lr, steps)
    got, want = updates(tx), updates(previous(lr, steps))
    for name in want:
        np.testing.assert_array_equal(np.asarray(got[name]), np.asarray(want[name]), err_msg=name)


def test_schedules_and_rules():
    assert [warmup_steps(OptimizerConfig(), n) for n in (1, 9, 10, 30, 70, 200, 999)] == [1, 1, 1, 3, 7, 20, 99]
    _, lr = make_optimizer(OptimizerConfig(warmup_fraction=0.25, end_fraction=0.5), 2.0, 100)
    assert lr(0) == 0.0 and lr(25) == pytest.approx(2.0) and lr(100) == pytest.approx(1.0)
    _, constant = make_optimizer(OptimizerConfig(schedule="constant"), 0.3, 100)
    assert constant(0) == constant(99) == 0.3
    sgd, _ = make_optimizer(OptimizerConfig(name="sgd", b1=0.0, schedule="constant", clip_norm=None), 0.1, 10)
    params = {"w": jnp.asarray([1.0, -2.0])}
    step, _ = sgd.update({"w": jnp.asarray([0.5, 0.5])}, sgd.init(params), params)
    np.testing.assert_allclose(step["w"], [-0.05, -0.05])  # plain SGD: −lr · g


@pytest.mark.parametrize(("make", "message"), [
    (lambda: AdapterConfig(optimizer=OptimizerConfig(b2=1.5)), r"--adapter.optimizer.b2=1.5 must lie in \[0, 1\)"),
    (lambda: GateConfig(optimizer=OptimizerConfig(name="adam", weight_decay=0.1)),
     r"--gate.optimizer.weight-decay=0.1: adam has no weight decay"),
    (lambda: GateConfig(ppo_optimizer=OptimizerConfig(clip_norm=0.0)), r"--gate.ppo-optimizer.clip-norm=0.0 must be"),
    (lambda: BackboneConfig(optimizer=OptimizerConfig(warmup_fraction=1.0)),
     r"--backbone.optimizer.warmup-fraction=1.0 must lie in \[0, 1\)"),
    (lambda: AdapterConfig(lr=float("inf")), r"--adapter.lr=inf must be positive and finite"),
])
def test_bad_optimiser_values_name_the_flag(make, message):
    with pytest.raises(ConfigError, match=message):
        make()
