"""Orbax checkpoints: round trip of a dict of pytrees (NNX adapter + optimizer, RNG, controller), keep-N, atomicity."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from ponderttt.train.checkpoint import Checkpointer, data_to_key, key_to_data, nnx_load, nnx_tree


def make(seed):
    model = nnx.Linear(3, 2, rngs=nnx.Rngs(seed))
    return model, nnx.Optimizer(model, optax.adam(1e-2), wrt=nnx.Param)


def train_one_step(model, optimizer):
    grads = nnx.grad(lambda m: jnp.sum(m(jnp.ones((4, 3))) ** 2))(model)
    optimizer.update(model, grads)


def full_state(model, optimizer, key, integral):
    return {"adapter": nnx_tree(model), "optimizer": nnx_tree(optimizer), "step": jnp.asarray(7, jnp.int32),
            "rng": key_to_data(key), "controller": {"integral": jnp.asarray(integral, jnp.float32)}}


def test_round_trip_restores_every_part(tmp_path):
    model, optimizer = make(0)
    train_one_step(model, optimizer)
    key = jax.random.key(42)
    saved = full_state(model, optimizer, key, 0.25)
    with Checkpointer(tmp_path / "ckpt", keep=2) as ckpt:
        ckpt.save(7, saved, {"data": {"index": 7, "seed": 1}, "step": 7})
    fresh_model, fresh_optimizer = make(1)  # different weights, zero optimizer state
    template = full_state(fresh_model, fresh_optimizer, jax.random.key(0), 0.0)
    with Checkpointer(tmp_path / "ckpt", keep=2) as ckpt:
        assert ckpt.latest_step() == 7
        state, meta = ckpt.restore(template)
    assert meta == {"data": {"index": 7, "seed": 1}, "step": 7}
    same = jax.tree.map(lambda a, b: bool(np.array_equal(np.asarray(a), np.asarray(b))), state, saved)
    assert all(jax.tree.leaves(same))
    nnx_load(fresh_model, state["adapter"])
    nnx_load(fresh_optimizer, state["optimizer"])
    np.testing.assert_array_equal(fresh_model.kernel[...], model.kernel[...])
    assert int(fresh_optimizer.step[...]) == 1
    assert jax.random.uniform(data_to_key(state["rng"])) == jax.random.uniform(key)
    # training continues identically from the restored optimizer
    train_one_step(model, optimizer)
    train_one_step(fresh_model, fresh_optimizer)
    np.testing.assert_array_equal(fresh_model.kernel[...], model.kernel[...])


def test_keeps_the_newest_n_and_ignores_unfinished_steps(tmp_path):
    state = {"x": jnp.arange(3.0)}
    with Checkpointer(tmp_path / "ckpt", keep=2) as ckpt:
        for step in range(1, 6):
            ckpt.save(step, {"x": state["x"] * step}, {"step": step})
        ckpt.wait()
        assert ckpt.all_steps() == [4, 5]
    # A save killed mid-write leaves only a temporary directory, which is never a step.
    (tmp_path / "ckpt" / "6.orbax-checkpoint-tmp-123").mkdir()
    with Checkpointer(tmp_path / "ckpt", keep=2) as ckpt:
        assert ckpt.latest_step() == 5
        restored, meta = ckpt.restore(state)
    np.testing.assert_array_equal(restored["x"], np.arange(3.0) * 5)
    assert meta["step"] == 5


def test_an_unreadable_newest_step_falls_back_to_the_previous_one(tmp_path, caplog):
    import pytest

    from ponderttt.train.config import ConfigError

    template = {"w": jnp.zeros(1000), "b": jnp.zeros((50, 50))}
    with Checkpointer(tmp_path / "ck", keep=3, async_save=False) as ckpt:
        for step in (1, 2):
            ckpt.save(step, {"w": jnp.arange(1000.0) * step, "b": jnp.full((50, 50), float(step))}, {"step": step})
    files = [p for p in (tmp_path / "ck" / "2" / "state").rglob("*") if p.is_file()]
    biggest = max(files, key=lambda p: p.stat().st_size)
    biggest.write_bytes(biggest.read_bytes()[: biggest.stat().st_size // 2])  # a truncated committed step
    with Checkpointer(tmp_path / "ck", keep=3, async_save=False) as ckpt:
        with caplog.at_level("WARNING", logger="ponderttt.train"):
            state, meta, step = ckpt.restore_newest_readable(template)
        assert step == 1 and meta == {"step": 1} and float(state["b"][0, 0]) == 1.0
        assert ckpt.all_steps() == [1] and (tmp_path / "ck" / "2.unreadable").is_dir()
        assert "checkpoint step 2 in" in caplog.text and "is unreadable" in caplog.text
        ckpt.save(2, {"w": jnp.zeros(1000), "b": jnp.zeros((50, 50))}, {"step": 2})  # the step can be written again
        assert ckpt.all_steps() == [1, 2]
    with Checkpointer(tmp_path / "one", keep=3, async_save=False) as ckpt:  # its only step truncated: no fallback
        ckpt.save(1, {"w": jnp.arange(1000.0), "b": jnp.full((50, 50), 3.0)}, {"step": 1})
    files = [p for p in (tmp_path / "one" / "1" / "state").rglob("*") if p.is_file()]
    biggest = max(files, key=lambda p: p.stat().st_size)
    biggest.write_bytes(biggest.read_bytes()[: biggest.stat().st_size // 2])
    with Checkpointer(tmp_path / "one", keep=3, async_save=False) as ckpt:
        with pytest.raises(ConfigError, match=r"no readable checkpoint in .*one \(steps \[1\] could not be read\)"):
            ckpt.restore_newest_readable(template)
