"""Statistics for comparing methods, from SciPy and rliable (not re-derived here), seeded and reproducible.

- Bootstrap confidence intervals: ``scipy.stats.bootstrap`` (BCa by default; percentile when BCa is
  undefined, e.g. for a constant sample), paired resampling for paired data, clusters (documents) as the
  resampling unit when the caller aggregates per cluster first.
- IQM with stratified-bootstrap CIs and the probability of improvement: ``rliable``. rliable draws its
  resampling indices from NumPy's global generator; ``iqm_ci`` and ``probability_of_improvement`` seed it
  for the call and restore the caller's global state afterwards (so they are not thread-safe).
- Tests and effect sizes: ``scipy.stats.wilcoxon``, ``ttest_rel``, ``ttest_ind`` and ``mannwhitneyu``.
  Cohen's d is read off the t statistic (paired: d_z = t / √n, the mean difference over the standard
  deviation of the differences; independent: d = t·√(1/n₁ + 1/n₂) with the pooled deviation), and Cliff's
  delta off the Mann–Whitney U (δ = 2U / (n₁n₂) − 1 = P(a > b) − P(a < b)).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import scipy.stats
from numpy.typing import ArrayLike

DEFAULT_RESAMPLES = 2000
DEFAULT_CONFIDENCE = 0.95


@dataclasses.dataclass(frozen=True)
class Estimate:
    """A point estimate with its confidence interval."""

    value: float
    low: float
    high: float
    confidence: float
    method: str

    def to_dict(self) -> dict:
        """``{"value", "ci": [low, high], "confidence", "method"}``, JSON-ready."""
        return {"value": self.value, "ci": [self.low, self.high], "confidence": self.confidence, "method": self.method}


def _as_1d(x, name: str) -> np.ndarray:
    arr = np.asarray(x, dtype=np.float64).ravel()
    if arr.size == 0:
        raise ValueError(f"{name} is empty; statistics need at least one value")
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{name} contains NaN or infinite values; drop or fix them first")
    return arr


def bootstrap_ci(
    data: Sequence[np.ndarray],
    statistic: Callable[..., np.ndarray],
    *,
    paired: bool = True,
    n_resamples: int = DEFAULT_RESAMPLES,
    confidence: float = DEFAULT_CONFIDENCE,
    method: str = "BCa",
    seed: int = 0,
) -> Estimate:
    """Bootstrap CI of ``statistic(*data, axis=-1)`` (it must accept ``axis``), via ``scipy.stats.bootstrap``.

    With ``paired=True`` the arrays are resampled together (same indices), as for two methods scored on
    the same chunks. Falls back from BCa to the percentile method when BCa is undefined (constant data).
    """
    arrays = tuple(_as_1d(d, f"data[{i}]") for i, d in enumerate(data))
    if paired and len({a.size for a in arrays}) != 1:
        raise ValueError(f"paired data must have equal lengths, got {[a.size for a in arrays]}")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must lie in (0, 1), got {confidence}")
    point = float(statistic(*arrays, axis=-1))
    if arrays[0].size < 2 or all(np.ptp(a) == 0 for a in arrays):
        return Estimate(point, point, point, confidence, "degenerate")
    batch = max(1, min(n_resamples, 4_000_000 // arrays[0].size))  # bounds the [batch, n] resample matrices

    def interval(how: str) -> tuple[float, float]:
        res = scipy.stats.bootstrap(
            arrays,
            statistic,
            n_resamples=n_resamples,
            vectorized=True,
            paired=paired,
            batch=batch,
            confidence_level=confidence,
            method=how,
            rng=np.random.default_rng(seed),
        )
        return float(res.confidence_interval.low), float(res.confidence_interval.high)

    used = method
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", scipy.stats.DegenerateDataWarning)
        low, high = interval(method)
        if not (math.isfinite(low) and math.isfinite(high)) and method != "percentile":
            used = "percentile"
            low, high = interval(used)
    return Estimate(point, low, high, confidence, used)


def mean_ci(x: Sequence[float] | np.ndarray, **kwargs: Any) -> Estimate:
    """Mean with a bootstrap CI; keyword arguments go to :func:`bootstrap_ci`."""
    return bootstrap_ci((x,), lambda a, axis: np.mean(a, axis=axis), paired=False, **kwargs)


def paired_difference_ci(a: Sequence[float] | np.ndarray, b: Sequence[float] | np.ndarray, **kwargs: Any) -> Estimate:
    """Mean of a − b with a paired bootstrap CI (a, b scored on the same items)."""
    return bootstrap_ci((a, b), lambda x, y, axis: np.mean(x - y, axis=axis), paired=True, **kwargs)


def ratio_ci(
    numerator: Sequence[float] | np.ndarray, denominator: Sequence[float] | np.ndarray, **kwargs: Any
) -> Estimate:
    """Σ numerator / Σ denominator with a paired bootstrap CI over items.

    The token-weighted loss of a set of documents is Σ NLL / Σ tokens: pass per-document sums to resample
    documents (a cluster bootstrap) rather than chunks or tokens, which are correlated within a document.
    """
    return bootstrap_ci(
        (numerator, denominator), lambda n, d, axis: np.sum(n, axis=axis) / np.sum(d, axis=axis), paired=True, **kwargs
    )


# ---------------------------------------------------------------- rliable


@contextlib.contextmanager
def _seeded_global_numpy(seed: int) -> Iterator[None]:
    state = np.random.get_state()  # noqa: NPY002 (rliable samples from the global generator)
    np.random.seed(seed)  # noqa: NPY002
    try:
        yield
    finally:
        np.random.set_state(state)  # noqa: NPY002


def _score_matrix(x, name: str) -> np.ndarray:
    arr = np.asarray(x, dtype=np.float64)
    if arr.ndim == 1:
        arr = arr[:, None]
    if arr.ndim != 2 or arr.size == 0:
        raise ValueError(f"{name} must be a [runs, tasks] score matrix (or [runs]), got shape {np.shape(x)}")
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{name} contains NaN or infinite values")
    return arr


def iqm(scores: ArrayLike) -> float:
    """Interquartile mean (25% trimmed mean) over all runs and tasks (``rliable.metrics.aggregate_iqm``)."""
    from rliable import metrics

    return float(metrics.aggregate_iqm(_score_matrix(scores, "scores")))


def iqm_ci(
    score_dict: Mapping[str, np.ndarray],
    *,
    reps: int = DEFAULT_RESAMPLES,
    confidence: float = DEFAULT_CONFIDENCE,
    seed: int = 0,
) -> dict[str, Estimate]:
    """IQM per method with stratified-bootstrap CIs (``rliable.library.get_interval_estimates``).

    ``score_dict``: method -> [runs, tasks] scores (e.g. seeds x languages); runs are resampled within tasks.
    """
    from rliable import library, metrics

    scores = {k: _score_matrix(v, f"score_dict[{k!r}]") for k, v in score_dict.items()}
    with _seeded_global_numpy(seed):
        points, intervals = library.get_interval_estimates(
            scores,
            lambda s: np.array([metrics.aggregate_iqm(s)]),
            reps=reps,
            confidence_interval_size=confidence,
            method="percentile",
        )
    return {
        k: Estimate(
            float(points[k][0]),
            float(intervals[k][0, 0]),
            float(intervals[k][1, 0]),
            confidence,
            "stratified-bootstrap",
        )
        for k in scores
    }


def probability_of_improvement(
    scores_x: ArrayLike,
    scores_y: ArrayLike,
    *,
    higher_is_better: bool = True,
    reps: int = DEFAULT_RESAMPLES,
    confidence: float = DEFAULT_CONFIDENCE,
    seed: int = 0,
) -> Estimate:
    """P(X > Y) averaged over tasks (``rliable.metrics.probability_of_improvement``), with a stratified CI.

    ``scores_x``, ``scores_y``: [runs, tasks] (runs may differ). For losses pass ``higher_is_better=False``.
    """
    from rliable import library, metrics

    x = _score_matrix(scores_x, "scores_x")
    y = _score_matrix(scores_y, "scores_y")
    if x.shape[1] != y.shape[1]:
        raise ValueError(f"scores_x has {x.shape[1]} tasks and scores_y {y.shape[1]}; they must share tasks")
    if not higher_is_better:
        x, y = -x, -y
    with _seeded_global_numpy(seed):
        points, intervals = library.get_interval_estimates(
            {"pair": [x, y]},
            lambda a, b: np.array([metrics.probability_of_improvement(a, b)]),
            reps=reps,
            confidence_interval_size=confidence,
            method="percentile",
        )
    return Estimate(
        float(points["pair"][0]),
        float(intervals["pair"][0, 0]),
        float(intervals["pair"][1, 0]),
        confidence,
        "stratified-bootstrap",
    )


# ---------------------------------------------------------------- tests and effect sizes


def wilcoxon(a: Sequence[float] | np.ndarray, b: Sequence[float] | np.ndarray) -> dict[str, float]:
    """Wilcoxon signed-rank test of a − b (``scipy.stats.wilcoxon``); p = 1 when every difference is zero."""
    x, y = _as_1d(a, "a"), _as_1d(b, "b")
    if x.size != y.size:
        raise ValueError(f"paired samples need equal lengths, got {x.size} and {y.size}")
    if np.all(x == y):
        return {"statistic": 0.0, "pvalue": 1.0}
    res = scipy.stats.wilcoxon(x, y)
    return {"statistic": float(res.statistic), "pvalue": float(res.pvalue)}


def paired_t_test(a: Sequence[float] | np.ndarray, b: Sequence[float] | np.ndarray) -> dict[str, float]:
    """Paired t-test of a − b (``scipy.stats.ttest_rel``)."""
    x, y = _as_1d(a, "a"), _as_1d(b, "b")
    if x.size != y.size or x.size < 2:
        raise ValueError(f"a paired t-test needs two equal-length samples of >= 2 values, got {x.size} and {y.size}")
    res = scipy.stats.ttest_rel(x, y)
    return {"statistic": float(res.statistic), "pvalue": float(res.pvalue), "df": float(x.size - 1)}


def cohens_d(a: Sequence[float] | np.ndarray, b: Sequence[float] | np.ndarray, *, paired: bool = True) -> float:
    """Cohen's d from SciPy's t statistic: paired d_z = t/√n; independent d = t·√(1/n₁ + 1/n₂) (pooled SD).

    NaN when the deviation it divides by is zero.
    """
    x, y = _as_1d(a, "a"), _as_1d(b, "b")
    with np.errstate(invalid="ignore", divide="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        if paired:
            if x.size != y.size:
                raise ValueError(f"paired samples need equal lengths, got {x.size} and {y.size}")
            t = scipy.stats.ttest_rel(x, y).statistic
            return float(t / math.sqrt(x.size))
        t = scipy.stats.ttest_ind(x, y, equal_var=True).statistic
        return float(t * math.sqrt(1.0 / x.size + 1.0 / y.size))


def cliffs_delta(a: Sequence[float] | np.ndarray, b: Sequence[float] | np.ndarray) -> float:
    """Cliff's delta P(a > b) − P(a < b) over all pairs, from the Mann–Whitney U (``scipy.stats.mannwhitneyu``)."""
    x, y = _as_1d(a, "a"), _as_1d(b, "b")
    u = scipy.stats.mannwhitneyu(x, y, alternative="two-sided", method="asymptotic").statistic
    return float(2.0 * u / (x.size * y.size) - 1.0)


def compare_paired(
    a: Sequence[float] | np.ndarray,
    b: Sequence[float] | np.ndarray,
    *,
    higher_is_better: bool = False,
    n_resamples: int = DEFAULT_RESAMPLES,
    confidence: float = DEFAULT_CONFIDENCE,
    seed: int = 0,
) -> dict:
    """Everything for "is A better than B" on paired scores (e.g. per-document losses of two methods).

    difference = mean(a − b) with a paired bootstrap CI; Wilcoxon and paired-t p-values; Cohen's d_z and
    Cliff's delta of a vs b; probability_of_improvement = P(A better than B), one task, items as runs.
    """
    x, y = _as_1d(a, "a"), _as_1d(b, "b")
    if x.size != y.size:
        raise ValueError(f"paired samples need equal lengths, got {x.size} and {y.size}")
    out = {
        "n": int(x.size),
        "mean_a": float(x.mean()),
        "mean_b": float(y.mean()),
        "difference": paired_difference_ci(x, y, n_resamples=n_resamples, confidence=confidence, seed=seed).to_dict(),
        "wilcoxon": wilcoxon(x, y),
        "paired_t": paired_t_test(x, y) if x.size >= 2 else None,
        "cohens_d": cohens_d(x, y, paired=True),
        "cliffs_delta": cliffs_delta(x, y),
        "probability_of_improvement": probability_of_improvement(
            x, y, higher_is_better=higher_is_better, reps=n_resamples, confidence=confidence, seed=seed
        ).to_dict(),
        "higher_is_better": higher_is_better,
    }
    return out
