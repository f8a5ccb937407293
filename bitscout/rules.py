"""The domain rules that the search library, the service and the SDK all apply, written once.

A dependency-free leaf (standard library only): ``search`` imports it (import-linter allows this
module and :mod:`bitscout.errors` / :mod:`bitscout.methods`, nothing else of ``bitscout``), the
service stores what it decides, the SDK answers ``Front.best`` with it.

* **Budget feasibility** — :data:`BUDGET_FIELDS` names every limit and the cost it bounds;
  :func:`cost_limits` turns a budget into limits on costs (sizes in bytes); :func:`meets` says
  whether a cost is within them, with a relative tolerance of :data:`RTOL` so that a map
  allocated exactly at a limit meets it despite rounding.
* **The recommended point** — :func:`recommended`: the best metric among the points that meet the
  budget; ties go to the smaller size, then to the earlier point.
* **The 2-D Pareto front** — :func:`pareto_front`: the points no other point beats on both a cost
  (lower is better) and a quality metric; of identical points the first is kept.

Example::

    >>> cost_limits({"max_size_mb": 20, "max_avg_bits": None})
    {'size_bytes': 20000000.0}
    >>> meets({"size_bytes": 2e7, "avg_bits": 4.0}, {"size_bytes": 2e7})
    True
    >>> recommended([(0, 0.9, 10.0, True), (1, 0.95, 12.0, True), (2, 0.99, 30.0, False)], True)
    1
    >>> pareto_front([(10.0, 0.9), (12.0, 0.95), (11.0, 0.8)], higher_is_better=True)
    [0, 1]
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence

__all__ = ["BUDGET_FIELDS", "RTOL", "budget_field_of", "cost_limits", "meets", "pareto_front", "recommended"]

#: Budget field -> (the cost it limits, the factor from the budget's unit to the cost's unit).
BUDGET_FIELDS: dict[str, tuple[str, float]] = {
    "max_size_mb": ("size_bytes", 1e6),
    "max_avg_bits": ("avg_bits", 1.0),
    "max_bops": ("bops", 1.0),
    "max_latency_ms": ("latency_ms", 1.0),
}

#: Relative tolerance of :func:`meets`.
RTOL = 1e-9


def cost_limits(budget: Mapping[str, float | None]) -> dict[str, float]:
    """The limits a budget (``{max_size_mb: ..., ...}``; None or absent: no limit) sets on costs,
    keyed by cost (``size_bytes``, ``avg_bits``, ``bops``, ``latency_ms``), in the costs' units.
    Keys other than the budget fields are ignored."""
    out: dict[str, float] = {}
    for name, (cost, scale) in BUDGET_FIELDS.items():
        value = budget.get(name)
        if value is not None:
            out[cost] = float(value) * scale
    return out


def budget_field_of(cost: str) -> str:
    """The budget field that limits ``cost`` (``size_bytes`` -> ``max_size_mb``)."""
    for name, (c, _) in BUDGET_FIELDS.items():
        if c == cost:
            return name
    raise KeyError(cost)


def meets(cost: Mapping[str, float], limits: Mapping[str, float], *, rtol: float = RTOL) -> bool:
    """True when every limit (from :func:`cost_limits`) holds for ``cost`` (a mapping with the
    limited costs; a missing or non-finite cost fails its limit)."""
    for name, limit in limits.items():
        value = cost.get(name)
        if value is None or not math.isfinite(value) or value > limit * (1 + rtol):
            return False
    return True


def recommended(points: Iterable[tuple[int, float | None, float, bool]], higher_is_better: bool) -> int | None:
    """The id of the recommended point among ``(id, metric value, size in bytes, meets the budget)``:
    the best value among the points that meet the budget and have a finite value; ties go to the
    smaller size, then the smaller id. None when no point qualifies."""
    best: tuple[float, float, int] | None = None
    for pid, value, size, ok in points:
        if not ok or value is None or not math.isfinite(value):
            continue
        key = (-value if higher_is_better else value, size, pid)
        if best is None or key < best:
            best = key
    return None if best is None else best[2]


def pareto_front(points: Sequence[tuple[float, float]], *, higher_is_better: bool) -> list[int]:
    """Indices of the non-dominated ``(cost, quality)`` pairs, by cost ascending.

    A pair is dominated when another has no higher cost and no worse quality, and is better in
    one. Of identical pairs only the first is kept. Pairs with a non-finite entry are left out.
    O(N log N).
    """
    sign = -1.0 if higher_is_better else 1.0
    rows = [
        (float(c), sign * float(q), i)
        for i, (c, q) in enumerate(points)
        if math.isfinite(c) and math.isfinite(q)
    ]
    rows.sort()
    out: list[int] = []
    best = math.inf
    for _, q, i in rows:
        if q < best:
            out.append(i)
            best = q
    return out
