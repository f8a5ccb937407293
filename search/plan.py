"""The planning core: everything between a sensitivity table and the maps a search evaluates,
without torch or a model.

* :class:`Candidate`: a map a method proposes, before evaluation.
* :func:`build_problem`: a search space, its cost model and a table as an allocation problem,
  with the structural pruning limits; :func:`check_budget` refuses a budget no map meets, naming
  the smallest achievable value in the budget's own unit (:func:`in_budget_units`).
* :func:`candidates_from_table`: the allocations over a sweep of the budget's main metric
  (:func:`sweep_metric`) plus the allocation at the budget; :func:`uniform_candidates`: the
  uniform reference maps.
* :func:`recommended_index`: the recommended point, chosen on the calibration proxy
  (:func:`bitscout.rules.recommended` over each point's ``provenance["proxy"]``).
* :func:`resolve`: a new budget answered from a stored space and table.

The service's process answers ``POST /jobs/{id}/resolve`` with this module, so it (and what it
imports: allocation, costs, space, results, Pareto) never imports torch or transformers; an
import-linter contract keeps it so.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from bitscout import rules
from search import allocate as alloc
from search.cost import CostModel, get_profile
from search.errors import InfeasibleBudgetError, InvalidInputError
from search.result import Budget, ParetoPoint, SensitivityTable
from search.space import BitOption, PrecisionMap, SearchSpace, space_from_dict

#: the order in which a budget's limits pick the metric the front is swept over
SWEEP_ORDER = ("size_bytes", "avg_bits", "bops", "latency_ms")
#: the bit-widths of the uniform reference maps every search evaluates
UNIFORM_BASELINES: tuple[int, ...] = (8, 6, 4, 3, 2)


@dataclass(frozen=True)
class Candidate:
    """A map proposed by a method, before evaluation."""

    precision_map: PrecisionMap
    method: str
    predicted: float | None = None
    budget: dict[str, float] = field(default_factory=dict)
    label: str = ""
    exact: bool = True
    gap: float = 0.0
    #: metrics measured already (methods that evaluate maps themselves, e.g. NSGA-II); such a
    #: candidate is not evaluated again
    metrics: dict[str, float] | None = None
    #: how the map was found (``ParetoPoint.provenance``); None: the open loop's first allocation
    provenance: dict[str, Any] | None = None


def sweep_metric(budget: Budget) -> str:
    """The cost the front is swept over: the first of :data:`SWEEP_ORDER` the budget limits
    (``size_bytes`` when it limits none)."""
    limits = budget.limits()
    return next((m for m in SWEEP_ORDER if m in limits), "size_bytes")


def _prune_constraints(space: SearchSpace) -> tuple[dict[str, list[np.ndarray]], dict[str, float]]:
    """Structural pruning limits as extra linear budgets: per block, the count of pruned heads / FFN
    groups (per group: ``1`` at the pruned option; :func:`build_problem` sums them per decision)."""
    pl = space.prune_limits
    weights: dict[str, list[np.ndarray]] = {}
    limits: dict[str, float] = {}
    per_block: dict[tuple[str, int], int] = {}
    for g, opts in zip(space.groups, space.options, strict=True):
        if g.kind in ("head", "ffn") and any(o.pruned for o in opts):
            per_block[(g.kind, g.block)] = per_block.get((g.kind, g.block), 0) + 1
    for (kind, block), n in per_block.items():
        cap: float | None = None
        frac = pl.max_head_fraction if kind == "head" else pl.max_ffn_fraction
        if frac is not None:
            cap = math.floor(frac * n + 1e-9)
        if kind == "head" and pl.keep_one_head:
            cap = min(cap if cap is not None else n - 1, n - 1)
        if cap is None or cap >= n:
            continue
        key = f"pruned_{kind}@{block}"
        weights[key] = [
            np.array([1.0 if (o.pruned and g.kind == kind and g.block == block) else 0.0 for o in opts])
            for g, opts in zip(space.groups, space.options, strict=True)
        ]
        limits[key] = float(cap)
    return weights, limits


def per_decision(space: SearchSpace, rows: Sequence[np.ndarray]) -> list[np.ndarray]:
    """Per-group rows (one entry per option of the group) summed over every decision's groups (a tied
    set's groups allow the same options, so their rows add entry by entry)."""
    return [np.sum([np.asarray(rows[i], dtype=np.float64) for i in members], axis=0) for members in space.decisions]


def build_problem(space: SearchSpace, cost_model: CostModel, table: SensitivityTable | None) -> tuple[alloc.Problem, dict[str, float]]:
    """The allocation problem of ``space`` (values from ``table``; zeros when None) and the fixed
    structural limits it must always respect.

    One variable per decision (:attr:`SearchSpace.decisions`): a tied set's values and costs are the
    sums of its groups' (each group counted once), so an allocation's choices are one option index per
    decision, which :meth:`SearchSpace.from_choices` expands to the groups."""
    values = []
    for g, opts in zip(space.groups, space.options, strict=True):
        row = table.scores.get(g.name, {}) if table is not None else {}
        if table is not None:
            missing = [o.key() for o in opts if o.key() not in row]
            if missing:
                raise InvalidInputError(
                    f"sensitivity table has no score for group {g.name} at {', '.join(missing)}", field="sensitivity"
                )
        values.append(np.array([max(0.0, float(row.get(o.key(), 0.0))) for o in opts], dtype=np.float64))
    weights = dict(cost_model.group_costs())
    pw, plimits = _prune_constraints(space)
    weights.update(pw)
    offsets = cost_model.offsets()
    offsets.update(dict.fromkeys(pw, 0.0))
    if space.ties:
        values = per_decision(space, values)
        weights = {m: per_decision(space, w) for m, w in weights.items()}
    names = space.decision_names()
    return alloc.Problem(values=values, weights=weights, offsets=offsets, names=names), plimits


def check_budget(space: SearchSpace, cost_model: CostModel, budget: Budget) -> None:
    """Raise :class:`InfeasibleBudgetError` (with the smallest achievable value) if no map meets ``budget``."""
    limits = budget.limits()
    if not limits:
        return
    problem, plimits = build_problem(space, cost_model, None)
    try:
        alloc.allocate(problem, {**limits, **plimits})
    except InfeasibleBudgetError as exc:
        raise in_budget_units(exc) from None


def in_budget_units(exc: InfeasibleBudgetError) -> InfeasibleBudgetError:
    """The allocator's infeasibility (a cost and its smallest value in cost units) restated in the
    budget's own field and unit (``max_size_mb`` in megabytes)."""
    field_map = {cost: rules.budget_field_of(cost) for cost in SWEEP_ORDER}
    metric = exc.field or ""
    smallest = exc.smallest
    if metric == "size_bytes" and smallest is not None:
        smallest = smallest / 1e6
        msg = f"no precision map fits max_size_mb: the smallest achievable size is {smallest:.4f} MB"
    elif metric in field_map and smallest is not None:
        msg = f"no precision map meets {field_map[metric]}: the smallest achievable value is {smallest:.6g}"
    else:
        msg = exc.message
    return InfeasibleBudgetError(msg, field=field_map.get(metric, metric or "budget"), smallest=smallest)


def candidates_from_table(
    space: SearchSpace,
    cost_model: CostModel,
    table: SensitivityTable,
    budget: Budget,
    *,
    n_points: int,
) -> list[Candidate]:
    """Allocations over a sweep of the budget's main metric (smallest to largest feasible), plus the
    allocation at the budget itself. Duplicate maps are dropped."""
    problem, plimits = build_problem(space, cost_model, table)
    limits = budget.limits()
    metric = sweep_metric(budget)
    extra = {k: v for k, v in limits.items() if k != metric}
    extra.update(plimits)
    out: list[Candidate] = []
    seen: set[PrecisionMap] = set()

    def add(a: alloc.Allocation, label: str) -> None:
        pmap = space.from_choices(a.choices)
        if pmap in seen:
            return
        seen.add(pmap)
        out.append(
            Candidate(pmap, table.method, float(a.objective), dict(a.limits), label, bool(a.exact), float(a.gap))
        )

    if limits:
        try:
            add(alloc.allocate(problem, {**limits, **plimits}), "budget")
        except InfeasibleBudgetError as exc:
            raise in_budget_units(exc) from None
    narrow = _narrowest_cost(space, problem, metric)
    lo, hi = alloc.cost_range(problem, metric)
    if narrow is not None and lo < narrow < hi and n_points >= 6:
        # pruning reaches below the narrowest integer grid: a few points down there (where maps lose
        # most of the model), the rest geometric from the narrowest grid up, where the choices matter
        k = max(2, n_points // 4)
        sweep = alloc.allocate_front(problem, metric, k, extra_limits=extra or None, spacing="linear",
                                     bounds=(None, narrow))
        sweep += alloc.allocate_front(problem, metric, n_points - k + 1, extra_limits=extra or None,
                                      spacing="geometric", bounds=(narrow, None))
    else:
        sweep = alloc.allocate_front(problem, metric, n_points, extra_limits=extra or None, spacing="geometric")
    for a in sweep:
        add(a, "sweep")
    return out


def _narrowest_cost(space: SearchSpace, problem: alloc.Problem, metric: str) -> float | None:
    """Total ``metric`` of every group at its narrowest integer option (groups without one: their
    cheapest option); None when no group has an integer option."""
    idx = []
    any_int = False
    for opts in space.decision_options:
        ints = [k for k, o in enumerate(opts) if o.is_integer]
        any_int = any_int or bool(ints)
        idx.append(min(ints, key=lambda k, opts=opts: opts[k].bits) if ints else
                   min(range(len(opts)), key=lambda k, opts=opts: opts[k].bits))
    if not any_int:
        return None
    return float(problem.cost_of(np.array(idx, dtype=np.int64))[metric])


def uniform_candidates(space: SearchSpace, baselines: Sequence[int], symmetric: bool = True) -> list[Candidate]:
    """The uniform reference maps: every searched group at one option, for each width of ``baselines``
    and each option of that width (and grid) the space offers (per row, group-wise, with activation
    widths), when every group of ``space`` allows it (groups kept at full precision aside)."""
    out = []
    offered = sorted({o for opts in space.options for o in opts})
    for b in baselines:
        at_width = [
            o for o in offered if o.bits == b and not o.is_tt and (o.symmetric == symmetric or not o.is_integer)
        ]
        for opt in at_width or [BitOption(b, symmetric)]:
            pmap = space.uniform(opt)
            if all(p == opt or p.unchanged for p in pmap.values()):
                label = f"uniform {b}-bit" if opt.per_row and opt.act_bits is None else f"uniform {opt.key()}"
                out.append(Candidate(pmap, "uniform", None, {}, label))
    return out


def recommended_index(points: Sequence[ParetoPoint], budget: Budget) -> int | None:
    """Index of the point that meets ``budget`` with the lowest measured calibration discrepancy
    (``provenance["proxy"]``, :meth:`search.pipeline.Search.calibration_proxy`); ties go to the
    smaller size (:func:`bitscout.rules.recommended`). The evaluation metrics choose nothing: they
    are only reported. A refined point takes its origin's place when its origin is the choice (its
    early stopping chose its weights on held-back calibration batches). None when no point that
    meets the budget has a measured discrepancy."""
    rec = rules.recommended(
        ((i, proxy_of(p), p.cost.size_bytes, budget.is_feasible(p.cost))
         for i, p in enumerate(points) if not p.refined),
        False,
    )
    if rec is not None:
        rec = next((i for i, p in enumerate(points) if p.refined and p.refined_from == rec), rec)
    return rec


def proxy_of(point: ParetoPoint | Candidate) -> float | None:
    """The point's measured calibration discrepancy (``provenance["proxy"]``), or None."""
    v = (point.provenance or {}).get("proxy")
    return float(v) if isinstance(v, int | float) and not isinstance(v, bool) else None


def resolve(
    space_data: Mapping[str, Any],
    table: SensitivityTable | Mapping[str, Any],
    budget: Budget | Mapping[str, Any],
) -> dict[str, Any]:
    """Answer a new budget from a stored space (``Search.space_dict()``) and a stored sensitivity table,
    without the model: the optimal map under ``budget`` for the table's scores, its cost, the summed
    sensitivity it minimises, and the allocator's certificate (``exact``, ``gap``)."""
    if not isinstance(table, SensitivityTable):
        table = SensitivityTable.from_dict(table)
    if not isinstance(budget, Budget):
        budget = Budget.from_dict(budget)
    if budget.empty:
        raise InvalidInputError("the budget sets no limit", field="budget")
    space = space_from_dict(space_data["space"])
    cm = dict(space_data.get("cost_model") or {})
    cost_model = CostModel(
        space,
        seq_len=int(cm.get("seq_len", 128)),
        act_bits=int(cm.get("act_bits", 8)),
        batch=int(cm.get("batch", 1)),
        profile=get_profile(cm.get("profile")),
        latency_table=cm.get("latency_table"),
    )
    problem, plimits = build_problem(space, cost_model, table)
    try:
        a = alloc.allocate(problem, {**budget.limits(), **plimits})
    except InfeasibleBudgetError as exc:
        raise in_budget_units(exc) from None
    pmap = space.from_choices(a.choices)
    return {
        "precision_map": pmap.to_dict(),
        "cost": cost_model.cost(pmap).to_dict(),
        "predicted": float(a.objective),
        "exact": bool(a.exact),
        "gap": float(a.gap),
        "method": table.method,
        "budget": budget.to_dict(),
    }


__all__ = [
    "SWEEP_ORDER",
    "per_decision",
    "UNIFORM_BASELINES",
    "Candidate",
    "build_problem",
    "candidates_from_table",
    "check_budget",
    "in_budget_units",
    "proxy_of",
    "recommended_index",
    "resolve",
    "sweep_metric",
    "uniform_candidates",
]
