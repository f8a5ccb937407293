"""Pareto filtering and hypervolume.

``pareto_mask`` and ``hypervolume_2d`` work on plain arrays; ``front`` and ``hypervolume`` on
:class:`~search.result.ParetoPoint` lists, trading a cost (``size_bytes`` by default, any
``Cost`` metric) against a quality metric.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from bitscout import rules
from search.errors import InvalidInputError
from search.result import COST_METRICS, ParetoPoint

__all__ = ["front", "hypervolume", "hypervolume_2d", "pareto_mask"]

_BLOCK = 1024


def _as_minimised(objectives: np.ndarray, minimize: Sequence[bool], what: str) -> np.ndarray:
    try:
        obj = np.array(objectives, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise InvalidInputError(f"{what} must be numeric: {exc}", field=what) from exc
    if obj.ndim != 2:
        raise InvalidInputError(f"{what} must be an N x M array, got shape {obj.shape}", field=what)
    if len(minimize) != obj.shape[1]:
        raise InvalidInputError(
            f"minimize has {len(minimize)} entries for {obj.shape[1]} objectives", field="minimize"
        )
    if np.isnan(obj).any():
        raise InvalidInputError(f"{what} contains NaN", field=what)
    sign = np.array([1.0 if m else -1.0 for m in minimize])
    return obj * sign


def pareto_mask(objectives: np.ndarray, minimize: Sequence[bool]) -> np.ndarray:
    """Boolean mask of the non-dominated rows of ``objectives`` (N x M).

    ``minimize[j]`` says whether column ``j`` is minimised (else maximised). A row is dominated
    when another is no worse in every column and better in one. Of identical rows only the
    first is kept. O(N log N) for two columns, O(N^2 M) otherwise.
    """
    obj = _as_minimised(objectives, minimize, "objectives")
    n, m = obj.shape
    keep = np.zeros(n, dtype=bool)
    if n == 0:
        return keep
    if m == 1:
        keep[int(np.argmin(obj[:, 0]))] = True
        return keep
    if m == 2:
        # By first column, then second, then index: a row survives when its second column beats
        # every row before it (equal rows: only the first in index order survives).
        order = np.lexsort((np.arange(n), obj[:, 1], obj[:, 0]))
        second = obj[order, 1]
        survives = np.ones(n, dtype=bool)
        survives[1:] = second[1:] < np.minimum.accumulate(second)[:-1]
        keep[order[survives]] = True
        return keep
    for start in range(0, n, _BLOCK):
        block = obj[start : start + _BLOCK]
        le = (obj[None, :, :] <= block[:, None, :]).all(axis=2)  # [i, j]: row j no worse than row i
        lt = (obj[None, :, :] < block[:, None, :]).any(axis=2)
        eq = le & ~lt
        idx = np.arange(start, start + len(block))
        earlier_equal = eq & (np.arange(n)[None, :] < idx[:, None])
        keep[idx] = ~((le & lt) | earlier_equal).any(axis=1)
    return keep


def hypervolume_2d(points: np.ndarray, reference: tuple[float, float],
                   minimize: Sequence[bool] = (True, True)) -> float:
    """Area dominated by ``points`` (N x 2) and bounded by ``reference``.

    With both columns minimised it is the area of the union of the boxes
    ``[p0, r0] x [p1, r1]``; a maximised column flips its direction. Points not strictly better
    than the reference in both columns add nothing.
    """
    pts = _as_minimised(np.asarray(points, dtype=np.float64).reshape(-1, 2), minimize, "points")
    if len(reference) != 2 or not all(isinstance(r, int | float | np.number) and math.isfinite(r)
                                       for r in reference):
        raise InvalidInputError(f"reference must be two finite numbers, got {reference!r}", field="reference")
    if not np.isfinite(pts).all():
        raise InvalidInputError("points must be finite", field="points")
    ref = np.array(reference, dtype=np.float64) * np.array([1.0 if m else -1.0 for m in minimize])
    pts = pts[(pts[:, 0] < ref[0]) & (pts[:, 1] < ref[1])]
    if len(pts) == 0:
        return 0.0
    pts = pts[pareto_mask(pts, (True, True))]
    pts = pts[np.argsort(pts[:, 0])]  # second column then strictly decreasing
    right = np.append(pts[1:, 0], ref[0])
    return float(np.sum((right - pts[:, 0]) * (ref[1] - pts[:, 1])))


def _coords(points: Sequence[ParetoPoint], metric: str, cost: str) -> tuple[list[int], np.ndarray]:
    if cost not in COST_METRICS and cost != "size_mb":
        raise InvalidInputError(f"unknown cost metric {cost!r}; known: {', '.join(COST_METRICS)}, size_mb",
                                field="cost")
    idx: list[int] = []
    rows: list[tuple[float, float]] = []
    for i, p in enumerate(points):
        value = p.metrics.get(metric)
        if value is None or not math.isfinite(value):
            continue
        idx.append(i)
        rows.append((p.cost.get(cost), float(value)))
    if points and not idx:
        raise InvalidInputError(f"no point has a finite value of metric {metric!r}", field="metric")
    return idx, np.array(rows, dtype=np.float64).reshape(-1, 2)


def front(points: Sequence[ParetoPoint], *, metric: str, higher_is_better: bool,
          cost: str = "size_bytes") -> list[ParetoPoint]:
    """The points no other point beats on both ``cost`` (lower is better) and ``metric``,
    sorted by cost ascending (:func:`bitscout.rules.pareto_front`). Points without a finite
    ``metric`` are left out; of points equal in both, the first is kept."""
    idx, xy = _coords(points, metric, cost)
    kept = rules.pareto_front([(float(c), float(q)) for c, q in xy], higher_is_better=higher_is_better)
    return [points[idx[i]] for i in kept]


def hypervolume(points: Sequence[ParetoPoint], *, metric: str, higher_is_better: bool,
                cost: str = "size_bytes", reference: tuple[float, float]) -> float:
    """Hypervolume of ``points`` in the (``cost``, ``metric``) plane against
    ``reference = (cost, metric)``: a larger cost and a worse metric than any point of interest."""
    idx, xy = _coords(points, metric, cost)
    if not idx:
        return 0.0
    return hypervolume_2d(xy, reference, (True, not higher_is_better))
