"""Verdicts that follow the statistics: "A beats B" only when the paired CI of the difference excludes 0.

``verdict(comparison)`` reads a paired comparison record (``report.comparison_record`` / ``stats.compare_paired``)
and says which side is better only when the bootstrap CI of mean(a − b) lies entirely on one side of 0 (and at
least two items were paired); otherwise "no significant difference". The sentence always carries the
difference, its CI, the paired test's p-value and n, and a warning when fewer than ``MIN_PAIRED`` items were
paired (the CI is then unreliable).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

MIN_PAIRED = 30


def _name(side: Mapping[str, Any]) -> str:
    budget = side.get("budget")
    return side["method"] if budget is None else f"{side['method']} at {100 * budget:g}%"


def verdict(comparison: Mapping[str, Any], *, unit: str = "") -> dict[str, Any]:
    """{"text", "head" (the sentence's verdict part), "significant", "winner" ("a", "b" or None), "warning"
    (None or why the CI is unreliable)}.

    comparison: a paired record with "a"/"b" ({method, budget, protocol}), "metric", "n", "difference" ({value,
    ci}), "paired_t" / "wilcoxon" ({pvalue}) and "higher_is_better". unit: appended to the difference (e.g.
    "nats"). The winner is the side whose metric is better by the CI (lower unless higher_is_better).
    """
    diff = comparison["difference"]
    low, high = diff["ci"]
    a, b = _name(comparison["a"]), _name(comparison["b"])
    test = comparison.get("paired_t") or comparison.get("wilcoxon") or {}
    p = test.get("pvalue")
    n = int(comparison["n"])
    higher = bool(comparison.get("higher_is_better", False))
    # one item has no spread: its bootstrap "CI" is a point, so nothing can be concluded from it
    significant = n >= 2 and low is not None and high is not None and (low > 0 or high < 0)
    winner = None
    if significant:
        a_larger = low > 0
        winner = "a" if a_larger == higher else "b"
    suffix = f" {unit}" if unit else ""
    detail = (f"Δ {comparison.get('metric', 'score')} (A − B) {diff['value']:+.4f}{suffix} "
              f"[{low:+.4f}, {high:+.4f}], p = {'—' if p is None else f'{p:.3g}'}, n = {n}")
    if winner == "a":
        head = f"{a} beats {b}"
    elif winner == "b":
        head = f"{b} beats {a}"
    else:
        head = f"{a} vs {b}: no significant difference"
    warning = None
    if n < MIN_PAIRED:
        warning = f"only {n} paired items (< {MIN_PAIRED}): the CI and p-value are unreliable"
    text = f"{head}: {detail}" + (f" (warning: {warning})" if warning else "")
    return {"text": text, "head": head, "significant": significant, "winner": winner, "warning": warning}
