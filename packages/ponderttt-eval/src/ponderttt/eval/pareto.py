"""Quality-vs-compute Pareto frontier (lower cost and lower loss are better) and the area under it.

``frontier_loss(c)`` is the best loss reachable with mean cost at most ``c``:

- ``kind="step"``: from a single configuration: min {loss_i : cost_i <= c} (a step function);
- ``kind="hull"``: also mixing two configurations chunk by chunk at random, which makes cost and loss
  convex combinations, so the reachable set is bounded by the lower convex hull of the points.

``frontier_auc`` integrates ``frontier_loss`` exactly over a cost range and divides by its width: the mean
loss a budget drawn uniformly from the range buys. Lower is better; ``improvement`` = reference − mean loss.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy.integrate import trapezoid

FRONTIER_KINDS = ("step", "hull")


def _points(costs, losses) -> tuple[np.ndarray, np.ndarray]:
    c = np.asarray(costs, dtype=np.float64).ravel()
    l = np.asarray(losses, dtype=np.float64).ravel()
    if c.shape != l.shape:
        raise ValueError(f"costs ({c.size}) and losses ({l.size}) must have one entry per point")
    if c.size == 0:
        raise ValueError("a Pareto frontier needs at least one point")
    if not (np.all(np.isfinite(c)) and np.all(np.isfinite(l))):
        raise ValueError(f"costs and losses must be finite, got costs={c.tolist()} losses={l.tolist()}")
    return c, l


def pareto_frontier(
    costs: Sequence[float] | np.ndarray,
    losses: Sequence[float] | np.ndarray,
    *,
    resolution: float | Sequence[float] | np.ndarray = 0.0,
) -> np.ndarray:
    """Indices of the non-dominated points, by increasing cost (and strictly decreasing loss).

    A point is dominated when another costs no more and loses no more, and is better in one of them;
    of several identical points only the first is kept. ``resolution`` (one value, or one per point: a measured
    cost's spread): two costs closer than the larger resolution of the two points count as equal, so a point is
    also dominated by a lower-loss point that costs at most that much more, and every step of the frontier is wider
    than the resolution of its two ends.
    """
    c, l = _points(costs, losses)
    r = np.broadcast_to(np.asarray(resolution, dtype=np.float64), c.shape)
    if not (np.all(np.isfinite(r)) and np.all(r >= 0)):
        raise ValueError(f"resolution must be finite and >= 0, got {np.asarray(resolution).tolist()}")
    order = np.lexsort((np.arange(c.size), l, c))  # by cost, then loss, then index
    if not np.any(r):
        keep, best = [], np.inf
        for i in order:
            if l[i] < best:
                keep.append(int(i))
                best = l[i]
        return np.asarray(keep, dtype=np.int64)
    index = np.arange(c.size)
    keep = []
    for i in order:
        near = c <= c[i] + np.maximum(r, r[i])
        better = (l < l[i]) | ((l == l[i]) & ((c < c[i]) | ((c == c[i]) & (index < i))))
        if not np.any(near & better):
            keep.append(int(i))
    return np.asarray(keep, dtype=np.int64)


def lower_hull(costs: Sequence[float] | np.ndarray, losses: Sequence[float] | np.ndarray) -> np.ndarray:
    """Indices of the frontier points on the lower convex hull (the mixing frontier), by increasing cost."""
    c, l = _points(costs, losses)
    hull: list[int] = []
    for i in pareto_frontier(c, l):  # monotone chain over the frontier: keep only convex turns
        while len(hull) >= 2:
            a, b = hull[-2], hull[-1]
            cross = (c[b] - c[a]) * (l[i] - l[a]) - (l[b] - l[a]) * (c[i] - c[a])
            if cross <= 0:  # b lies on or above the segment a -> i
                hull.pop()
            else:
                break
        hull.append(int(i))
    return np.asarray(hull, dtype=np.int64)


def frontier_loss(
    costs: Sequence[float] | np.ndarray,
    losses: Sequence[float] | np.ndarray,
    at_cost: float | np.ndarray,
    *,
    kind: str = "step",
) -> np.ndarray:
    """Best reachable loss at each budget in ``at_cost`` (same shape); NaN below the cheapest point.

    ``kind``: "step" or "hull" (see the module docstring); raises ValueError for another kind or bad points."""
    if kind not in FRONTIER_KINDS:
        raise ValueError(f"unknown frontier kind {kind!r}; expected one of {FRONTIER_KINDS}")
    c, l = _points(costs, losses)
    idx = pareto_frontier(c, l) if kind == "step" else lower_hull(c, l)
    fc, fl = c[idx], l[idx]
    x = np.asarray(at_cost, dtype=np.float64)
    if kind == "step":
        pos = np.searchsorted(fc, x, side="right") - 1
        out = np.where(pos >= 0, fl[np.clip(pos, 0, None)], np.nan)
    else:
        out = np.interp(x, fc, fl, left=np.nan, right=fl[-1])
    return out


def frontier_auc(
    costs: Sequence[float] | np.ndarray,
    losses: Sequence[float] | np.ndarray,
    *,
    cost_range: tuple[float, float] | None = None,
    kind: str = "step",
    reference_loss: float | None = None,
) -> dict[str, float | list[float] | None]:
    """Area under the frontier over ``cost_range`` (default: cheapest to dearest point), exactly integrated.

    Returns area, mean_loss = area / width, cost_range, and improvement = reference_loss − mean_loss
    (None without a reference). Raises when the range starts below the cheapest point, where no budget
    reaches any configuration.
    """
    c, l = _points(costs, losses)
    lo, hi = (float(c.min()), float(c.max())) if cost_range is None else map(float, cost_range)
    if lo < c.min() - 1e-12 * max(1.0, abs(c.min())):
        raise ValueError(
            f"cost range starts at {lo}, below the cheapest point ({c.min()}): the frontier is undefined there; "
            "start the range at or above the cheapest configuration"
        )
    if hi < lo:
        raise ValueError(f"cost range ({lo}, {hi}) is empty: hi must be >= lo")
    if hi == lo:
        value = float(frontier_loss(c, l, lo, kind=kind))
        area, mean = 0.0, value
    else:
        idx = pareto_frontier(c, l) if kind == "step" else lower_hull(c, l)
        inner = c[idx][(c[idx] > lo) & (c[idx] < hi)]
        xs = np.concatenate([[lo], inner, [hi]])
        if kind == "step":  # constant on [xs[j], xs[j+1]) at its left end's value
            area = float(np.sum(frontier_loss(c, l, xs[:-1], kind="step") * np.diff(xs)))
        else:
            area = float(trapezoid(frontier_loss(c, l, xs, kind="hull"), xs))
        mean = area / (hi - lo)
    return {
        "area": area,
        "mean_loss": mean,
        "cost_range": [lo, hi],
        "improvement": None if reference_loss is None else float(reference_loss) - mean,
    }
