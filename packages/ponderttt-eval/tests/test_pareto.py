import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ponderttt.eval.pareto import frontier_auc, frontier_loss, lower_hull, pareto_frontier


def test_frontier_of_known_points():
    costs = [1.0, 2.0, 2.0, 3.0, 4.0, 1.0]
    losses = [5.0, 4.0, 4.5, 4.2, 3.0, 5.0]
    assert pareto_frontier(costs, losses).tolist() == [0, 1, 4]  # 2 and 3 dominated, 5 duplicates 0


def test_step_auc_by_hand():
    costs, losses = [1.0, 2.0, 4.0], [5.0, 4.0, 3.0]
    auc = frontier_auc(costs, losses, reference_loss=5.0)
    # 5 on [1, 2), 4 on [2, 4]: area 5 + 8 = 13 over width 3
    assert auc["area"] == pytest.approx(13.0)
    assert auc["mean_loss"] == pytest.approx(13.0 / 3.0)
    assert auc["improvement"] == pytest.approx(5.0 - 13.0 / 3.0)
    tail = frontier_auc(costs, losses, cost_range=(3.0, 6.0))  # 4 on [3, 4), 3 on [4, 6]
    assert tail["area"] == pytest.approx(4.0 + 6.0)


def test_hull_auc_by_hand_and_not_above_step():
    costs, losses = [1.0, 2.0, 3.0], [4.0, 3.9, 2.0]  # (2, 3.9) lies above the chord 1 -> 3
    assert lower_hull(costs, losses).tolist() == [0, 2]
    hull = frontier_auc(costs, losses, kind="hull")
    assert hull["area"] == pytest.approx(0.5 * (4.0 + 2.0) * 2.0)
    step = frontier_auc(costs, losses, kind="step")
    assert hull["mean_loss"] <= step["mean_loss"]


def test_undefined_range_is_an_error():
    with pytest.raises(ValueError, match="below the cheapest point"):
        frontier_auc([2.0, 3.0], [1.0, 0.5], cost_range=(1.0, 3.0))
    with pytest.raises(ValueError, match="must be finite"):
        pareto_frontier([1.0, np.nan], [1.0, 2.0])
    assert np.isnan(frontier_loss([2.0], [1.0], 1.0))


points = st.lists(st.tuples(st.floats(0, 100), st.floats(0, 100)), min_size=1, max_size=25)


@settings(max_examples=60, deadline=None)
@given(pts=points)
def test_frontier_invariants(pts):
    c = np.array([p[0] for p in pts])
    l = np.array([p[1] for p in pts])
    front = pareto_frontier(c, l)
    assert np.all(np.diff(c[front]) > 0) and np.all(np.diff(l[front]) < 0)
    for i in range(len(pts)):  # every point is matched or dominated by a frontier point
        assert np.any((c[front] <= c[i]) & (l[front] <= l[i]))
    for j in front:  # no frontier point is strictly dominated
        assert not np.any((c <= c[j]) & (l <= l[j]) & ((c < c[j]) | (l < l[j])))
    grid = np.linspace(c.min(), c.max() + 1, 17)
    step = frontier_loss(c, l, grid, kind="step")
    hull = frontier_loss(c, l, grid, kind="hull")
    assert np.all(hull <= step + 1e-9) and np.all(np.diff(step) <= 0)
    auc = frontier_auc(c, l)
    cheapest = float(frontier_loss(c, l, c.min()))  # the best loss at the lowest cost
    assert l.min() - 1e-9 <= auc["mean_loss"] <= cheapest + 1e-9


def test_resolution_merges_steps_narrower_than_the_spread():
    costs, losses = [1.0, 1.05, 2.0], [5.0, 4.0, 3.0]
    assert pareto_frontier(costs, losses).tolist() == [0, 1, 2]
    # 1.05 is within 0.1 of 1.0 and loses less: the cheaper point is not told apart from it
    assert pareto_frontier(costs, losses, resolution=0.1).tolist() == [1, 2]
    assert pareto_frontier(costs, losses, resolution=1.5).tolist() == [2]
    with pytest.raises(ValueError, match="resolution"):
        pareto_frontier(costs, losses, resolution=-1.0)


@settings(max_examples=60, deadline=None)
@given(pts=points, resolution=st.floats(0, 20))
def test_frontier_steps_are_wider_than_the_resolution(pts, resolution):
    c = np.array([p[0] for p in pts])
    l = np.array([p[1] for p in pts])
    front = pareto_frontier(c, l, resolution=resolution)
    assert front.size >= 1 and np.all(np.diff(l[front]) < 0)
    assert np.all(np.diff(c[front]) > resolution)
    assert l[front].min() == l.min()  # the best loss is always on the frontier
    if resolution == 0.0:
        assert front.tolist() == pareto_frontier(c, l).tolist()


@settings(max_examples=60, deadline=None)
@given(pts=st.lists(st.tuples(st.floats(0, 100), st.floats(0, 100), st.floats(0, 10)), min_size=1, max_size=25))
def test_per_point_resolutions_keep_every_step_wider_than_its_ends(pts):
    c, l, r = (np.array([p[k] for p in pts]) for k in range(3))
    front = pareto_frontier(c, l, resolution=r)
    assert front.size >= 1 and np.all(np.diff(l[front]) < 0) and l[front].min() == l.min()
    for a, b in zip(front, front[1:], strict=False):
        assert c[b] - c[a] > max(r[a], r[b])
    wide = pareto_frontier(c, l, resolution=np.full(c.size, r.max()))
    assert len(wide) <= len(front)  # one resolution for all at the largest spread merges at least as much
