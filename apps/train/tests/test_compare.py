"""The reset-protocol comparison on a synthetic held-out table: every method, budgets, the oracle bound."""

import numpy as np
import pytest

from ponderttt.train.compare import (
    HeldOut,
    TopKBudget,
    compare_reset,
    make_method_gate,
    method_budgets,
    roll_out,
    update_score,
)


def synthetic(b=32, n=8, seed=0) -> HeldOut:
    rng = np.random.default_rng(seed)
    signal = rng.gamma(2.0, 1.0, (b, n))
    skip = 4.0 + rng.normal(0, 0.3, (b, n))
    gain = 0.2 * signal + rng.normal(0, 0.1, (b, n))  # updating helps more where the probe loss is high
    loss = np.stack([skip, skip - gain, skip - 1.3 * gain, skip - 1.5 * gain], -1)
    return HeldOut(loss=loss, tokens=np.full((b, n), 64.0), signal=signal, features=signal[..., None],
                   documents=np.repeat(np.arange(b // 2), 2)[:, None] * np.ones((1, n), int),
                   languages=np.full((b, n), "python"))


@pytest.mark.slow
def test_every_method_and_budget_on_the_same_chunks():
    held = synthetic()
    calibration = synthetic(seed=1).signal
    methods = ("skip", "update_1", "random", "oracle", "recon")
    records = compare_reset(held, methods, (0.25, 0.5), calibration_signal=calibration, n_resamples=100)
    keys = [(r["method"], r["budget"]) for r in records]
    assert keys == method_budgets(methods, (0.25, 0.5))
    by = {(r["method"], r["budget"]): r for r in records}
    assert by[("skip", None)]["update_rate"] == 0.0 and by[("update_1", None)]["update_rate"] == 1.0
    np.testing.assert_allclose(by[("skip", None)]["loss"], held.loss[..., 0].mean(), rtol=1e-9)
    for budget in (0.25, 0.5):
        for method in ("random", "oracle"):
            assert by[(method, budget)]["update_rate"] == pytest.approx(budget, abs=1e-9)
        assert by[("recon", budget)]["update_rate"] == pytest.approx(budget, abs=1e-9)  # top-k per chunk: exact
        # the budget-matched oracle (same number of updates) is at or below every causal method
        for method in ("random", "recon"):
            record = by[(method, budget)]
            assert record["loss_oracle"] <= record["loss"] + 1e-12
        # the oracle method updates exactly the top round(budget * B * N) chunks by advantage
        top = np.sort(held.advantage.ravel())[::-1][: round(budget * held.advantage.size)]
        expected = (held.loss[..., 0].sum() - top.sum()) / held.advantage.size
        assert by[("oracle", budget)]["loss"] == pytest.approx(expected, rel=1e-12)
        assert by[("oracle", budget)]["loss"] <= by[("random", budget)]["loss"]
        # recon reads a signal that predicts the gain: it beats random at the same budget
        assert by[("recon", budget)]["loss"] < by[("random", budget)]["loss"]
        assert 0 < by[("recon", budget)]["recovery"] <= 1


def test_roll_out_of_fixed_gates():
    held = synthetic(b=4, n=3)
    actions, scales = roll_out(make_method_gate("update_2", None, None, {}), held, seed=0)
    assert actions.tolist() == [[2] * 3] * 4 and scales.shape == (4, 3)


def test_report_from_the_records(tmp_path):
    from ponderttt.eval import write_report

    held = synthetic()
    records = compare_reset(held, ("skip", "update_1", "oracle"), (0.5,), calibration_signal=held.signal,
                            n_resamples=100)
    out = write_report(tmp_path, records, run={"test": True}, plots=False)
    text = out["report"].read_text()
    assert "update_1" in text and "oracle" in text


def test_held_out_shapes_are_checked():
    held = synthetic(b=4, n=3)
    with pytest.raises(ValueError, match="HeldOut.tokens has shape"):
        HeldOut(loss=held.loss, tokens=held.tokens[:, :2], signal=held.signal, features=held.features,
                documents=held.documents, languages=held.languages)


def test_top_k_budget_updates_exactly_the_highest_scores_of_every_chunk():
    held = synthetic(b=16, n=5)
    for budget in (0.25, 0.5, 0.75):
        gate = make_method_gate("recon", budget, synthetic(seed=3).signal, {})
        assert isinstance(gate, TopKBudget)
        actions, scales = roll_out(gate, held, seed=0)
        assert (actions.sum(axis=0) == round(budget * 16)).all()  # every chunk column, exactly
        for j in range(5):  # the chosen sequences are those with the largest step-0 reconstruction loss
            chosen = set(np.flatnonzero(actions[:, j]).tolist())
            assert chosen == set(np.argsort(-held.signal[:, j])[: round(budget * 16)].tolist())
        np.testing.assert_array_equal(scales, actions.astype(np.float32))


def test_learned_gates_are_recorded_natively_and_at_every_budget():
    import jax
    from flax import nnx

    from ponderttt.gating import GateInput, make_gate

    assert method_budgets(("skip", "gumbel"), (0.25, 0.5)) == [("skip", None), ("gumbel", None), ("gumbel", 0.25),
                                                               ("gumbel", 0.5)]
    held = synthetic(b=8, n=4)
    gumbel = make_gate("gumbel", num_features=1, rngs=nnx.Rngs(0))
    ppo = make_gate("ppo", num_features=1, rngs=nnx.Rngs(1))
    for gate in (gumbel, ppo):
        out = gate(GateInput(features=held.features[:, 0].astype(np.float32)), (), jax.random.key(0))
        logits = np.asarray(out.aux["logits"])
        expected = np.log(np.exp(logits[:, 1:]).sum(-1)) - logits[:, 0]  # log P(update) - log P(skip)
        np.testing.assert_allclose(update_score(gate, None, out), expected, rtol=1e-5, atol=1e-6)
    continuous = make_gate("continuous", num_features=1, rngs=nnx.Rngs(2))
    trained = {"gumbel": gumbel, "continuous": continuous}

    def loss_at_scale(lam):  # a synthetic loss surface: the gain grows with λ up to λ = 1
        return held.loss[..., 0] - held.advantage * np.minimum(lam, 1.0)

    records = compare_reset(held, ("gumbel", "continuous"), (0.25,), calibration_signal=held.signal, trained=trained,
                            loss_at_scale=loss_at_scale, n_resamples=50)
    by = {(r["method"], r["budget"]): r for r in records}
    assert set(by) == {("gumbel", None), ("gumbel", 0.25), ("continuous", None), ("continuous", 0.25)}
    assert by[("gumbel", 0.25)]["update_rate"] == 0.25 and by[("continuous", 0.25)]["update_rate"] == 0.25
    assert by[("continuous", None)]["update_rate"] == 1.0  # λ > 0 everywhere: every chunk runs an inner pass
    _, scales = roll_out(TopKBudget(continuous, 0.25), held, seed=0)
    _, native = roll_out(continuous, held, seed=0)
    kept = scales > 0
    assert (kept.sum(0) == 2).all()
    np.testing.assert_allclose(scales[kept], native[kept], rtol=1e-6)  # the gate's own λ where it updates
