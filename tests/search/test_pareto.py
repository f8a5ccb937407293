"""Pareto filtering and hypervolume against brute force."""

from __future__ import annotations

import math

import numpy as np
import pytest

from search.errors import InvalidInputError
from search.pareto import front, hypervolume, hypervolume_2d, pareto_mask
from search.result import Cost, ParetoPoint
from search.space import PrecisionMap


def brute_mask(obj: np.ndarray, minimize) -> np.ndarray:
    """O(N^2): dominated rows out; of equal rows the first stays."""
    sign = np.array([1 if m else -1 for m in minimize])
    o = obj * sign
    n = len(o)
    keep = np.ones(n, dtype=bool)
    for i in range(n):
        for j in range(n):
            if i == j:
                continue
            if np.all(o[j] <= o[i]) and np.any(o[j] < o[i]):
                keep[i] = False
            if np.all(o[j] == o[i]) and j < i:
                keep[i] = False
    return keep


@pytest.mark.parametrize("m", [1, 2, 3, 4])
def test_pareto_mask_equals_brute_force(m):
    rng = np.random.default_rng(m)
    for _ in range(150):
        n = int(rng.integers(0, 40))
        obj = rng.integers(0, 6, (n, m)).astype(float)  # a small grid: many ties and duplicates
        if n and rng.random() < 0.5:
            obj = np.concatenate([obj, obj[rng.integers(0, n, 5)]])
        if rng.random() < 0.3:
            obj = obj + rng.random(obj.shape)
        minimize = [bool(x) for x in rng.integers(0, 2, m)]
        got = pareto_mask(obj, minimize)
        assert got.dtype == bool and got.shape == (len(obj),)
        np.testing.assert_array_equal(got, brute_mask(obj, minimize))


def test_pareto_mask_keeps_the_first_duplicate_and_handles_infinities():
    obj = np.array([[1.0, 2.0], [1.0, 2.0], [0.0, np.inf], [2.0, 1.0], [2.0, 1.0]])
    assert pareto_mask(obj, (True, True)).tolist() == [True, False, True, True, False]
    with pytest.raises(InvalidInputError) as info:
        pareto_mask(np.array([[np.nan, 1.0]]), (True, True))
    assert info.value.field == "objectives"
    with pytest.raises(InvalidInputError) as info:
        pareto_mask(np.zeros((3, 2)), (True,))
    assert info.value.field == "minimize"


def grid_area(points: np.ndarray, ref: tuple[float, float], minimize) -> float:
    """Count unit cells dominated by an integer point set (exact for integer coordinates)."""
    sign = np.array([1 if m else -1 for m in minimize])
    p = points * sign
    r = np.array(ref) * sign
    lo = np.minimum(p.min(axis=0), r) if len(p) else r
    area = 0
    for x in range(int(lo[0]), int(r[0])):
        for y in range(int(lo[1]), int(r[1])):
            # cell [x, x+1] x [y, y+1] is dominated when some point is at or below its corner
            if len(p) and np.any((p[:, 0] <= x) & (p[:, 1] <= y)):
                area += 1
    return float(area)


@pytest.mark.parametrize("minimize", [(True, True), (True, False), (False, False)])
def test_hypervolume_2d_equals_grid_count(minimize):
    rng = np.random.default_rng(0)
    for _ in range(100):
        n = int(rng.integers(0, 15))
        pts = rng.integers(-5, 10, (n, 2)).astype(float)
        ref = tuple(float(x) for x in rng.integers(-2, 12, 2))
        ref = tuple(-r if not mz else r for r, mz in zip(ref, minimize, strict=True))
        assert hypervolume_2d(pts, ref, minimize) == pytest.approx(grid_area(pts, ref, minimize))


def test_hypervolume_2d_of_one_point_and_bad_reference():
    assert hypervolume_2d(np.array([[1.0, 2.0]]), (3.0, 5.0)) == pytest.approx(6.0)
    assert hypervolume_2d(np.array([[1.0, 0.9]]), (3.0, 0.5), (True, False)) == pytest.approx(0.8)
    assert hypervolume_2d(np.zeros((0, 2)), (1.0, 1.0)) == 0.0
    with pytest.raises(InvalidInputError) as info:
        hypervolume_2d(np.array([[1.0, 2.0]]), (math.inf, 1.0))
    assert info.value.field == "reference"


def point(size: float, acc: float | None, label: str = "") -> ParetoPoint:
    metrics = {} if acc is None else {"accuracy": acc}
    return ParetoPoint(PrecisionMap({}), Cost(size, 4.0, 1.0, 1.0), metrics, "kl", label=label)


def test_front_of_pareto_points_sorted_by_cost():
    pts = [
        point(30, 0.90, "a"),
        point(10, 0.80, "b"),
        point(20, 0.80, "c"),  # dominated by b
        point(40, 0.95, "d"),
        point(10, 0.80, "e"),  # duplicate of b: the first stays
        point(50, 0.94, "f"),  # dominated by d
        point(5, None, "g"),  # no accuracy: left out
        point(25, 0.85, "h"),
    ]
    got = front(pts, metric="accuracy", higher_is_better=True)
    assert [p.label for p in got] == ["b", "h", "a", "d"]
    # Lower is better: only the cheapest of the lowest.
    assert [p.label for p in front(pts, metric="accuracy", higher_is_better=False)] == ["b"]
    # Another cost metric (all avg_bits equal): the best accuracy alone.
    assert [p.label for p in front(pts, metric="accuracy", higher_is_better=True, cost="avg_bits")] == ["d"]
    hv = hypervolume(pts, metric="accuracy", higher_is_better=True, reference=(60.0, 0.5))
    xy = np.array([[p.cost.size_bytes, p.metrics["accuracy"]] for p in got])
    assert hv == pytest.approx(hypervolume_2d(xy, (60.0, 0.5), (True, False)))
    assert front([], metric="accuracy", higher_is_better=True) == []
    with pytest.raises(InvalidInputError) as info:
        front(pts, metric="f1", higher_is_better=True)
    assert info.value.field == "metric"
    with pytest.raises(InvalidInputError) as info:
        front(pts, metric="accuracy", higher_is_better=True, cost="flops")
    assert info.value.field == "cost"
