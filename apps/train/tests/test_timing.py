"""The wall-clock cost table's timed work (`ponderttt.train.timing`), checked structurally, never by timing: the SKIP
row is the bare forward (no feature extraction, no probe), SKIP without an inner step is exactly λ = 0, every row
is timed once per round in rotated order, and the rows reach the cost table."""

import collections

import jax
import jax.extend
import numpy as np
import pytest

from ponderttt.train.config import AdapterConfig, CompareConfig, ConfigError, DataConfig

DATA = DataConfig(vocab_size=300, seq_len=32, chunk_size=8, mini_batch_size=4, batch_size=2)
ADAPTER = AdapterConfig(num_heads=2, base_lr=3.0)


@pytest.fixture(scope="module")
def tiny():
    """(model, mesh, raw batch): a 2-layer GPT-2 (32 wide) with a TTT-Linear head adapter, output scale 1."""
    import jax.numpy as jnp

    from ponderttt.models import GPT2Config
    from ponderttt.train import adapter, distributed
    from ponderttt.train.backbone import build_gpt2
    from ponderttt.train.config import MeshConfig, PlatformConfig

    mesh = distributed.make_mesh(MeshConfig())
    config = GPT2Config(vocab_size=DATA.vocab_size, n_positions=DATA.seq_len, n_embd=32, n_layer=2, n_head=2)
    model = adapter.attach(build_gpt2(config, PlatformConfig(), mesh, seed=0), DATA, ADAPTER, mesh, seed=0)
    site = model.site("head")
    site.out_scale[...] = jnp.ones_like(site.out_scale[...])
    rng = np.random.default_rng(0)
    ids = rng.integers(0, DATA.vocab_size, (DATA.batch_size, DATA.seq_len + 1))
    doc_start = np.zeros((DATA.batch_size, DATA.seq_len), bool)
    doc_start[:, [0, 12]] = True
    batch = {"input_ids": ids[:, :-1], "targets": ids[:, 1:], "doc_start": doc_start,
             "loss_mask": np.ones((DATA.batch_size, DATA.seq_len), bool)}
    return model, mesh, batch


def primitives(fn, *args) -> list[str]:
    """Every primitive of `fn`'s jaxpr, nested calls (jit, scan, cond) expanded, in order."""
    out = []

    def walk(jaxpr):
        for eqn in jaxpr.eqns:
            out.append(eqn.primitive.name)
            for sub in jax.extend.core.jaxprs_in_params(eqn.params):
                walk(sub)

    walk(jax.make_jaxpr(fn)(*args).jaxpr)
    return out


def test_the_timed_skip_is_the_bare_forward(tiny):
    import jax.numpy as jnp
    from flax import nnx

    from ponderttt.models import TTTControl
    from ponderttt.train import heldout, timing
    from ponderttt.train.adapter import chunk_losses

    model, _, raw = tiny
    graphdef, state = nnx.split(model)
    batch = {k: jnp.asarray(v) for k, v in raw.items()}

    def bare_forward(state, batch):  # the adapted model with the unchanged fast weights, and its chunk losses
        control = TTTControl(scale=0.0, reset_mask=batch["doc_start"], num_steps=0, protocol="reset",
                             chunk_size=DATA.chunk_size)
        logits = nnx.merge(graphdef, state)(batch["input_ids"], ttt=control).logits
        return chunk_losses(logits, batch["targets"], batch["loss_mask"], DATA.chunk_size)[0]

    timed = primitives(timing.action_pass(graphdef, DATA.chunk_size, 0.0, 0), state, batch)
    assert timed[0] == "jit" and timed[1:] == primitives(bare_forward, state, batch)
    # the untimed data pass is that forward plus the gates' inputs, which the features row times on their own
    data_pass = collections.Counter(primitives(heldout._skip_pass(graphdef, DATA.chunk_size), state, batch))
    logits, stats = timing.skip_pass(graphdef, DATA.chunk_size, "gate_inputs")(state, batch)
    features = collections.Counter(primitives(timing.features_pass(DATA.chunk_size), logits, stats,
                                              batch["loss_mask"], batch["doc_start"]))
    extra = data_pass - collections.Counter(timed)
    assert sum(features.values()) > 50 and not features - extra - collections.Counter(jit=2)
    assert "dot_general" not in features  # no model work is timed as a feature
    # each update row runs its inner steps: more work than SKIP, and k steps more than one
    update = [primitives(timing.action_pass(graphdef, DATA.chunk_size, 1.0, k), state, batch) for k in (1, 2, 4)]
    assert len(timed) < len(update[0]) < len(update[1]) < len(update[2])


def test_skip_without_an_inner_step_is_lambda_zero(tiny):
    import jax.numpy as jnp

    from ponderttt.train import heldout
    from ponderttt.train.adapter import forward

    model, _, raw = tiny
    batch = {k: jnp.asarray(v) for k, v in raw.items()}
    assert heldout.ACTION_PASSES[0] == (0.0, 0)
    skip = heldout.skip_forward(model, batch, DATA.chunk_size)
    scaled = forward(model, batch, chunk_size=DATA.chunk_size, num_steps=1, gating_scale=0.0, protocol="reset")
    np.testing.assert_array_equal(np.asarray(skip.logits), np.asarray(scaled.logits))
    np.testing.assert_array_equal(np.asarray(skip.ttt_stats["head"].chunk_loss_step0),
                                  np.asarray(scaled.ttt_stats["head"].chunk_loss_step0))


def test_rows_are_interleaved_and_reach_the_cost_table(tiny, monkeypatch):
    from ponderttt.eval.protocol import ACTION_NAMES
    from ponderttt.train import heldout, timing

    rounds = timing.interleaved_rounds(["a", "b", "c"], 5)
    assert rounds == [["a", "b", "c"], ["b", "c", "a"], ["c", "a", "b"], ["a", "b", "c"], ["b", "c", "a"]]
    model, mesh, batch = tiny
    calls = []
    real = timing._seconds
    monkeypatch.setattr(timing, "_seconds", lambda fn, *args: calls.append(fn) or real(fn, *args))
    timings = timing.measure_wall_clock(model, batch, data=DATA, mesh=mesh, repeats=6)
    rows = len(ACTION_NAMES) + 2  # the actions, the SKIP forward with the probe, the features
    assert len(calls) == 6 * rows and all(len(set(calls[r * rows:(r + 1) * rows])) == rows for r in range(6))
    assert calls[0] is not calls[rows]  # the second round starts with another row
    assert list(timings.actions) == list(ACTION_NAMES) and set(timings.overheads) == {"recon_probe", "gate_features"}
    assert all(len(v) == 6 and all(np.isfinite(v)) and min(v) > 0 for v in timings.actions.values())
    table = heldout.cost_table(model.config, DATA, ADAPTER, timings)
    assert table.has_wall_clock and all(a.wall_clock_repeats == 6 for a in table.actions.values())
    assert table["skip"].wall_clock_s == pytest.approx(np.median(timings.actions["skip"]))
    assert table.overheads["gate_features"].repeats == 6
    with pytest.raises(ValueError, match="at least 5 timed rounds"):
        timing.measure_wall_clock(model, batch, data=DATA, mesh=mesh, repeats=4)
    with pytest.raises(ConfigError, match="--compare.timing-repeats=3 must be at least 5"):
        CompareConfig(timing_repeats=3)
