"""Verdicts follow the paired CI: significant either way, not significant, and a warning below 30 pairs."""

import numpy as np

from ponderttt.eval import comparison_record
from ponderttt.eval.verdicts import MIN_PAIRED, verdict


def record(delta, n, noise=0.01, seed=0):
    rng = np.random.default_rng(seed)
    b = rng.normal(2.0, 0.2, n)
    a = b + delta + rng.normal(0.0, noise, n)
    return comparison_record(("update_1", None, "reset"), ("skip", None, "reset"), a, b, n_resamples=2000, seed=0)


def test_a_clearly_lower_loss_beats_b():
    v = verdict(record(-0.05, 40), unit="nats")
    assert v["significant"] and v["winner"] == "a" and v["warning"] is None
    assert v["text"].startswith("update_1 beats skip: Δ document_loss (A − B) -0.0")
    assert "nats [" in v["text"] and "p = " in v["text"] and "n = 40" in v["text"]


def test_a_clearly_higher_loss_loses_and_higher_is_better_flips_it():
    rec = record(+0.05, 40)
    assert verdict(rec)["winner"] == "b" and verdict(rec)["text"].startswith("skip beats update_1")
    assert verdict(dict(rec, higher_is_better=True))["winner"] == "a"


def test_a_ci_across_zero_is_no_significant_difference_whatever_the_means():
    rec = record(0.0, 40, noise=0.05)
    low, high = rec["difference"]["ci"]
    assert low < 0 < high and rec["difference"]["value"] != 0
    v = verdict(rec)
    assert not v["significant"] and v["winner"] is None
    assert v["text"].startswith("update_1 vs skip: no significant difference: Δ")


def test_few_pairs_warn_and_budgets_are_named():
    rec = record(-0.05, MIN_PAIRED - 1)
    v = verdict(rec)
    assert v["warning"] == f"only {MIN_PAIRED - 1} paired items (< 30): the CI and p-value are unreliable"
    assert v["text"].endswith(f"(warning: {v['warning']})")
    gates = comparison_record(("gumbel", 0.5, "reset"), ("random", 0.5, "reset"), [1.0, 2.0], [1.5, 2.5], seed=0)
    assert verdict(gates)["text"].startswith("gumbel at 50% beats random at 50%")


def test_one_pair_is_never_significant():
    rec = comparison_record(("update_1", None, "reset"), ("skip", None, "reset"), [5.0], [5.1], seed=0)
    assert rec["difference"]["ci"][1] < 0  # the bootstrap of one item is a point
    v = verdict(rec)
    assert not v["significant"] and "no significant difference" in v["text"] and "only 1 paired" in v["warning"]
