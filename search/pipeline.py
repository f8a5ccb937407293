"""The search pipeline: groups → space → sensitivity → allocation over a budget sweep → evaluation →
Pareto front → :class:`~search.result.SearchResult`.

:class:`Search` is a *live* search over one loaded model. Its stages can be called one by one (the
workers store each sensitivity table as soon as it exists and evaluate candidate maps in parallel), or
all at once with :meth:`Search.run`. Everything that can be checked without running the model
(options, space, budget feasibility) is checked in the constructor, before any long computation.

:func:`resolve` answers a new budget from a stored space and stored sensitivity tables, without a model.
"""

from __future__ import annotations

import math
import platform
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from search import allocate as alloc
from search.adapter import ModelAdapter
from search.cost import CostModel, get_profile
from search.data import TokenizedBatch
from search.errors import CanceledError, InfeasibleBudgetError, InvalidInputError
from search.pareto import front as pareto_front
from search.result import Budget, ParetoPoint, SearchResult, SensitivityTable
from search.sensitivity import ProgressFn, SensitivityContext, StopFn, get_method
from search.space import (
    BitOption,
    Granularity,
    PrecisionMap,
    PruneLimits,
    SearchSpace,
    space_from_dict,
    space_to_dict,
)
from search.tasks import (
    Reference,
    Task,
    check_metric,
    check_task,
    evaluate,
    higher_is_better,
    reference_outputs,
)

#: methods whose candidates come from a sensitivity table + the allocator
SENSITIVITY_METHODS = ("kl", "hessian", "fisher")
#: the order in which a budget's limits pick the metric the front is swept over
SWEEP_ORDER = ("size_bytes", "avg_bits", "bops", "latency_ms")
UNIFORM_BASELINES: tuple[int, ...] = (8, 6, 4, 3, 2)


@dataclass(frozen=True)
class SearchOptions:
    """What to search: methods, space, budget, metric, and how (see ``search --help``).

    ``method_options`` passes keyword options to a method (e.g. ``{"hessian": {"tolerance": 0.05}}``).
    ``seq_len`` is the sequence length BOPs and latency are costed at (default: the data's max length).
    """

    methods: tuple[str, ...] = ("kl",)
    granularity: Granularity = "layer"
    bits: tuple[int | str, ...] = (2, 3, 4, 8)
    symmetric: bool = True
    ffn_block_size: int = 64
    prune_limits: PruneLimits | None = None
    include: tuple[str, ...] | None = None
    exclude: tuple[str, ...] | None = None
    include_head: bool = False
    include_embeddings: bool = False
    budget: Budget = field(default_factory=Budget)
    front_points: int = 16
    metric: str | None = None
    seed: int = 0
    seq_len: int = 128
    act_bits: int = 8
    device_profile: str | Mapping[str, Any] = "a100"
    uniform_baselines: tuple[int, ...] = UNIFORM_BASELINES
    clip: str = "mse"
    method_options: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.methods:
            raise InvalidInputError("at least one method is required", field="methods")
        if len(set(self.methods)) != len(self.methods):
            raise InvalidInputError("methods must not repeat", field="methods")
        if isinstance(self.front_points, bool) or not isinstance(self.front_points, int) or not 2 <= self.front_points <= 64:
            raise InvalidInputError("front_points must be an integer between 2 and 64", field="front_points")
        if self.clip not in ("mse", "minmax"):
            raise InvalidInputError("clip must be 'mse' or 'minmax'", field="clip")


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


def sweep_metric(budget: Budget) -> str:
    limits = budget.limits()
    return next((m for m in SWEEP_ORDER if m in limits), "size_bytes")


def _prune_constraints(space: SearchSpace) -> tuple[dict[str, list[np.ndarray]], dict[str, float]]:
    """Structural pruning limits as extra linear budgets: per block, the count of pruned heads / FFN groups."""
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


def build_problem(space: SearchSpace, cost_model: CostModel, table: SensitivityTable | None) -> tuple[alloc.Problem, dict[str, float]]:
    """The allocation problem of ``space`` (values from ``table``; zeros when None) and the fixed
    structural limits it must always respect."""
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
    return alloc.Problem(values=values, weights=weights, offsets=offsets, names=[g.name for g in space.groups]), plimits


def _budget_limits(budget: Budget) -> dict[str, float]:
    return budget.limits()


def check_budget(space: SearchSpace, cost_model: CostModel, budget: Budget) -> None:
    """Raise :class:`InfeasibleBudgetError` (with the smallest achievable value) if no map meets ``budget``."""
    limits = _budget_limits(budget)
    if not limits:
        return
    problem, plimits = build_problem(space, cost_model, None)
    try:
        alloc.allocate(problem, {**limits, **plimits})
    except InfeasibleBudgetError as exc:
        raise _in_budget_units(exc) from None


def _in_budget_units(exc: InfeasibleBudgetError) -> InfeasibleBudgetError:
    field_map = {"size_bytes": "max_size_mb", "avg_bits": "max_avg_bits", "bops": "max_bops", "latency_ms": "max_latency_ms"}
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
    limits = _budget_limits(budget)
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
            raise _in_budget_units(exc) from None
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
    for opts in space.options:
        ints = [k for k, o in enumerate(opts) if o.is_integer]
        any_int = any_int or bool(ints)
        idx.append(min(ints, key=lambda k, opts=opts: opts[k].bits) if ints else
                   min(range(len(opts)), key=lambda k, opts=opts: opts[k].bits))
    if not any_int:
        return None
    return float(problem.cost_of(np.array(idx, dtype=np.int64))[metric])


class Search:
    """A live search over one loaded model (see the module docstring).

    ``calibration`` and ``evaluation`` are tokenized batches; they must be disjoint (the caller's
    :func:`search.data.split_data` makes them so). ``device`` is where the model and batches run.
    """

    def __init__(
        self,
        model: nn.Module,
        task: str,
        calibration: Sequence[TokenizedBatch],
        evaluation: Sequence[TokenizedBatch],
        options: SearchOptions,
        *,
        device: str | torch.device = "cpu",
    ) -> None:
        self.task: Task = check_task(task)
        if not calibration:
            raise InvalidInputError("no calibration data", field="calibration_size")
        if not evaluation:
            raise InvalidInputError("no evaluation data", field="evaluation_size")
        self.options = options
        for m in options.methods:
            if m not in SENSITIVITY_METHODS and m not in EXTRA_METHODS:
                load_method(m)
            if m not in SENSITIVITY_METHODS and m not in EXTRA_METHODS:
                known = ", ".join(sorted(set(SENSITIVITY_METHODS) | set(EXTRA_METHODS)))
                raise InvalidInputError(f"unknown method {m!r}; known: {known}", field="methods")
        has_labels = all(b.labels is not None for b in evaluation)
        self.metric = check_metric(options.metric, self.task, has_labels=has_labels)
        self.higher_is_better = higher_is_better(self.metric)
        self.device = torch.device(device)
        self.model = model.to(self.device).eval()
        self.calibration = [b.to(self.device) for b in calibration]
        self.evaluation = [b.to(self.device) for b in evaluation]
        self.adapter = ModelAdapter(
            model,
            include=options.include,
            exclude=options.exclude,
            include_head=options.include_head,
            include_embeddings=options.include_embeddings,
        )
        self.space = self.adapter.build_space(
            granularity=options.granularity,
            bits=options.bits,
            symmetric=options.symmetric,
            ffn_block_size=options.ffn_block_size,
            prune_limits=options.prune_limits,
        )
        self.cost_model = CostModel(
            self.space, seq_len=options.seq_len, act_bits=options.act_bits, profile=get_profile(options.device_profile)
        )
        check_budget(self.space, self.cost_model, options.budget)
        self.timings: dict[str, float] = {}
        #: where the model was loaded from and the data's label names (set by :func:`search.local.prepare`)
        self.model_path: str | None = None
        self.label_names: list[str] | None = None
        self._reference: Reference | None = None
        self.baseline_metrics: dict[str, float] | None = None

    # -- stages -----------------------------------------------------------------------------
    def space_dict(self) -> dict[str, Any]:
        """The space and its cost model, serialised (what :func:`resolve` needs)."""
        return {
            "space": space_to_dict(self.space),
            "cost_model": {
                "seq_len": self.cost_model.seq_len,
                "act_bits": self.cost_model.act_bits,
                "batch": self.cost_model.batch,
                "profile": self.cost_model.profile.to_dict(),
            },
        }

    def reference(self) -> Reference:
        if self._reference is None:
            self._reference = reference_outputs(self.model, self.evaluation, self.task)
        return self._reference

    def sensitivity(
        self, method: str, *, on_progress: ProgressFn | None = None, should_stop: StopFn | None = None
    ) -> SensitivityTable:
        t0 = time.perf_counter()
        ctx = SensitivityContext(
            self.model, self.adapter, self.space, self.task, self.calibration, self.device, self.options.seed, self.options.clip
        )
        table = get_method(method, **dict(self.options.method_options.get(method, {}))).compute(
            ctx, on_progress=on_progress, should_stop=should_stop
        )
        self.timings[f"sensitivity:{method}"] = time.perf_counter() - t0
        return table

    def candidates(self, table: SensitivityTable) -> list[Candidate]:
        t0 = time.perf_counter()
        out = candidates_from_table(
            self.space, self.cost_model, table, self.options.budget, n_points=self.options.front_points
        )
        self.timings[f"allocation:{table.method}"] = time.perf_counter() - t0
        return out

    def uniform_candidates(self) -> list[Candidate]:
        out = []
        for b in self.options.uniform_baselines:
            opt = BitOption(b, self.options.symmetric)
            pmap = self.space.uniform(opt)
            if all(p == opt or p.bits == 32 for p in pmap.values()):
                out.append(Candidate(pmap, "uniform", None, {}, f"uniform {b}-bit"))
        return out

    def evaluate(self, pmap: PrecisionMap, *, should_stop: StopFn | None = None) -> dict[str, float]:
        """Every metric of the model fake-quantized under ``pmap`` on the evaluation batches."""
        reference = self.reference()  # full-precision outputs: computed before the weights change
        with self.adapter.quantized(pmap, self.space, clip=self.options.clip):
            return evaluate(self.model, self.evaluation, self.task, reference=reference, should_stop=should_stop)

    def evaluate_candidate(self, c: Candidate, *, should_stop: StopFn | None = None) -> ParetoPoint:
        return ParetoPoint(
            precision_map=c.precision_map,
            cost=self.cost_model.cost(c.precision_map),
            metrics=self.evaluate(c.precision_map, should_stop=should_stop),
            method=c.method,
            label=c.label,
            predicted=c.predicted,
            budget=c.budget,
        )

    def baseline(self) -> dict[str, float]:
        if self.baseline_metrics is None:
            self.baseline_metrics = evaluate(self.model, self.evaluation, self.task, reference=self.reference())
        return self.baseline_metrics

    def assemble(self, points: Sequence[ParetoPoint], tables: Sequence[SensitivityTable]) -> SearchResult:
        """The result: the front (non-dominated in quality vs size over every method's points, uniform
        baselines included as reference points) and everything evaluated."""
        scored = [p for p in points if self.metric in p.metrics]
        front = pareto_front(scored, metric=self.metric, higher_is_better=self.higher_is_better, cost="size_bytes")
        return SearchResult(
            front=list(front),
            points=list(points),
            sensitivities=list(tables),
            metric=self.metric,
            higher_is_better=self.higher_is_better,
            baseline_metrics=self.baseline(),
            space=self.space_dict(),
            timings=dict(self.timings),
            versions=versions(),
            info={
                "task": self.task,
                "budget": self.options.budget.to_dict(),
                "methods": list(self.options.methods),
                "groups": len(self.space.groups),
                "granularity": self.space.granularity,
                "recommended": recommended_index(points, self.options.budget, self.metric, self.higher_is_better),
                "seed": self.options.seed,
            },
        )

    def run(self, *, on_progress: ProgressFn | None = None, should_stop: StopFn | None = None) -> SearchResult:
        """Every stage in-process: sensitivities, allocation, evaluation of every distinct map."""
        t0 = time.perf_counter()
        report = on_progress or (lambda stage, frac, msg: None)
        tables: list[SensitivityTable] = []
        cands: list[Candidate] = []
        n_methods = len(self.options.methods)
        for i, method in enumerate(self.options.methods):
            if method in SENSITIVITY_METHODS:
                table = self.sensitivity(
                    method,
                    on_progress=lambda s, f, m, i=i: report(s, (i + f) / n_methods * 0.6, m),
                    should_stop=should_stop,
                )
                tables.append(table)
                cands.extend(self.candidates(table))
            else:
                cands.extend(
                    EXTRA_METHODS[method](
                        self, on_progress=lambda s, f, m, i=i: report(s, (i + f) / n_methods * 0.6, m), should_stop=should_stop
                    )
                )
        cands.extend(self.uniform_candidates())
        t1 = time.perf_counter()
        self.baseline()
        points: list[ParetoPoint] = []
        unique: dict[tuple[PrecisionMap, str], Candidate] = {}
        for c in cands:
            unique.setdefault((c.precision_map, c.method), c)
        evaluated: dict[PrecisionMap, dict[str, float]] = {}
        for k, c in enumerate(unique.values()):
            if should_stop is not None and should_stop():
                raise CanceledError("search canceled")
            if c.precision_map not in evaluated:
                if c.metrics is not None:
                    evaluated[c.precision_map] = dict(c.metrics)
                else:
                    evaluated[c.precision_map] = self.evaluate(c.precision_map, should_stop=should_stop)
            points.append(
                ParetoPoint(
                    precision_map=c.precision_map,
                    cost=self.cost_model.cost(c.precision_map),
                    metrics=evaluated[c.precision_map],
                    method=c.method,
                    label=c.label,
                    predicted=c.predicted,
                    budget=c.budget,
                )
            )
            report("evaluate", 0.6 + 0.4 * (k + 1) / len(unique), f"evaluated {k + 1}/{len(unique)} maps")
        self.timings["evaluation"] = time.perf_counter() - t1
        self.timings["total"] = time.perf_counter() - t0
        return self.assemble(points, tables)


#: methods that propose candidates themselves (DNAS, NSGA-II): name -> fn(search, on_progress=, should_stop=) -> candidates
EXTRA_METHODS: dict[str, Callable[..., list[Candidate]]] = {}
#: the modules that register the built-in extra methods (imported when a search first asks for one)
METHOD_MODULES: dict[str, str] = {"nsga2": "search.nsga2", "dnas": "search.dnas"}


def load_method(name: str) -> None:
    """Import the module that registers the built-in method ``name`` in :data:`EXTRA_METHODS`
    (nothing for unknown names; the caller reports those)."""
    module = METHOD_MODULES.get(name)
    if module is not None and name not in EXTRA_METHODS:
        import importlib

        importlib.import_module(module)


def recommended_index(
    points: Sequence[ParetoPoint], budget: Budget, metric: str, hib: bool
) -> int | None:
    """Index of the best point (by ``metric``) that meets ``budget``; None when none does."""
    best: tuple[float, float, int] | None = None
    for i, p in enumerate(points):
        if metric not in p.metrics or not budget.is_feasible(p.cost):
            continue
        q = p.metrics[metric] if hib else -p.metrics[metric]
        key = (q, -p.cost.size_bytes, -i)
        if best is None or key > best:
            best = key
    return None if best is None else -best[2]


def versions() -> dict[str, str]:
    import numpy
    import scipy
    import transformers

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "numpy": numpy.__version__,
        "scipy": scipy.__version__,
    }


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
    )
    problem, plimits = build_problem(space, cost_model, table)
    try:
        a = alloc.allocate(problem, {**budget.limits(), **plimits})
    except InfeasibleBudgetError as exc:
        raise _in_budget_units(exc) from None
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
    "Candidate",
    "Search",
    "SearchOptions",
    "build_problem",
    "candidates_from_table",
    "check_budget",
    "recommended_index",
    "resolve",
    "sweep_metric",
]

