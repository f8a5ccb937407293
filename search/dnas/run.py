"""The DNAS front: targets of the swept metric, the steps plan, :func:`run_dnas` and the method's
registration (``dnas``) with the pipeline (see :mod:`search.dnas`)."""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, cast

import numpy as np

from search import allocate as alloc
from search.dnas.options import DNASOptions
from search.dnas.supernet import DNAS, TargetRun
from search.errors import InfeasibleBudgetError
from search.methods import parse_options
from search.result import Budget, SensitivityTable
from search.sensitivity import ProgressFn, SensitivityContext, StopFn, calibrate_scores
from search.space import PrecisionMap, SearchSpace

if TYPE_CHECKING:  # pragma: no cover
    from search.pipeline import Search
    from search.plan import Candidate

__all__ = ["DNASResult", "default_targets", "dnas_candidates", "run_dnas"]

#: allocation values are capped here (a probability of e^-50 is as good as impossible)
_MAX_VALUE = 50.0


@dataclass
class DNASResult:
    """Every target's run, the candidate maps (deduplicated), the swept metric and the time taken."""

    metric: str
    runs: list[TargetRun]
    candidates: list[Candidate]
    seconds: float
    steps: int
    micro_batches: int
    info: dict[str, Any] = field(default_factory=dict)
    #: the start's scores as a sensitivity table (``init="sensitivity"``), for the closed loop
    start_table: SensitivityTable | None = None



# ------------------------------------------------------------------------------------------------
# The front


def _values(probs: list[np.ndarray], space: SearchSpace, mode: str = "cdf",
            corrected: list[np.ndarray] | None = None) -> list[np.ndarray]:
    """Allocation values: ``cdf``: ``-log P_g(bits <= b_k)``, minus the log of the probability mass at
    or below each option's precision (options in order of bits, as the space sorts them);
    ``probability``: ``-log p_gk``; ``corrected``: the given values (see :func:`run_dnas`)."""
    if mode == "corrected" and corrected is not None:
        return [np.clip(v - v.min(), 0.0, None) for v in corrected]
    if mode == "probability":
        return [np.minimum(-np.log(np.clip(p, 1e-300, 1.0)), _MAX_VALUE).clip(min=0.0) for p in probs]
    out = []
    for p, opts in zip(probs, space.decision_options, strict=True):
        order = np.argsort([o.bits for o in opts], kind="stable")
        cdf = np.empty(len(p))
        cdf[order] = np.cumsum(p[order])
        out.append(np.minimum(-np.log(np.clip(cdf, 1e-300, 1.0)), _MAX_VALUE).clip(min=0.0))
    return out


def default_targets(problem: alloc.Problem, space: SearchSpace, metric: str, fractions: Sequence[float]) -> list[float]:
    """Targets of ``metric`` at ``fractions`` of the quantization range, largest first: from every
    group at its narrowest integer option (the 2-bit end; pruning then trades against bits inside
    the range) to every group at its widest integer option (groups without an integer option: at
    their cheapest and dearest options)."""

    def at(pick: Any) -> float:
        idx = []
        for opts in space.decision_options:
            ints = [k for k, o in enumerate(opts) if o.is_integer] or list(range(len(opts)))
            idx.append(pick(ints, key=lambda k, opts=opts: opts[k].bits))
        return problem.cost_of(np.array(idx, dtype=np.int64))[metric]

    lo = max(at(min), problem.smallest(metric))
    hi = at(max)
    if hi <= lo:
        hi = problem.cost_of(np.array([len(o) - 1 for o in space.decision_options], dtype=np.int64))[metric]
    ts = sorted({lo + (hi - lo) * f for f in fractions}, reverse=True)
    return [t for t in ts if t > lo] or [hi]


def _steps_plan(o: DNASOptions, n_targets: int, n_batches: int) -> list[int]:
    total = o.epochs * n_batches
    share = total / (n_targets + 1)  # the first target counts twice
    first = o.steps if o.steps is not None else max(o.min_steps, round(2 * share))
    nxt = o.steps_next if o.steps_next is not None else max(o.min_steps, round(share))
    if o.steps is not None and o.steps_next is None:
        nxt = max(1, o.steps // 2)
    return [first] + [nxt] * (n_targets - 1)


def run_dnas(
    search: Search,
    *,
    options: DNASOptions | None = None,
    on_progress: ProgressFn | None = None,
    should_stop: StopFn | None = None,
) -> DNASResult:
    """The DNAS front of a live :class:`~search.pipeline.Search` (see :mod:`search.dnas`)."""
    from search.plan import Candidate, build_problem, in_budget_units, sweep_metric

    t0 = time.perf_counter()
    o = options or cast(DNASOptions, parse_options("dnas", search.options.method_options.get("dnas")))
    report = on_progress or (lambda stage, frac, msg: None)
    budget: Budget = search.options.budget
    metric = sweep_metric(budget)
    limits = budget.limits()
    problem0, plimits = build_problem(search.space, search.cost_model, None)
    extra = {k: v for k, v in limits.items() if k != metric}
    extra.update(plimits)
    targets = list(o.targets) if o.targets is not None else default_targets(
        problem0, search.space, metric, o.target_fractions
    )
    targets = sorted(targets, reverse=True)
    report("dnas", 0.0, f"dnas: {len(targets)} targets of {metric}")
    dn = DNAS(
        search.model, search.adapter, search.space, search.cost_model, search.task, search.calibration,
        metric=metric, options=o, seed=search.options.seed, clip=search.options.clip, device=search.device,
        act_static=search.act_static,
    )
    runs: list[TargetRun] = []
    t_scores = 0.0
    calibration: dict[str, Any] = {"applied": False}
    start_tables: list[tuple[str, list[np.ndarray]]] = []
    start_table: SensitivityTable | None = None
    try:
        if o.init == "budget":
            dn.init_at(targets[0])
        elif o.init == "sensitivity":
            report("dnas", 0.0, "dnas: sensitivity scores")
            scores = dn.sensitivity_scores(o.sensitivity_draws, should_stop=should_stop)
            if o.calibrate or o.start_candidates:
                calibrated, calibration = _calibrate(search, scores, should_stop, o.calibration_sequences)
                if o.start_candidates:
                    start_tables = [("start", scores), ("start, calibrated", calibrated)]
                if o.calibrate:
                    scores = calibrated
            start_table = _as_table(search.space, scores)
            dn.init_from_scores(scores, targets[0], o.sensitivity_temperature)
            t_scores = time.perf_counter() - t0
        plan = _steps_plan(o, len(targets), len(dn.batches))
        total = sum(plan)
        done = 0
        for ti, (target, steps) in enumerate(zip(targets, plan, strict=True)):
            def on_step(s: int, n: int, loss: float, ti: int = ti, base: int = done) -> None:
                report("dnas", (base + s) / total,
                       f"dnas target {ti + 1}/{len(targets)} ({metric} {targets[ti]:.4g}): step {s}/{n}, loss {loss:.4g}")

            runs.append(dn.run_target(target, steps, on_step=on_step, should_stop=should_stop))
            done += steps
    finally:
        dn.close()

    cands: list[Candidate] = []
    seen: set[PrecisionMap] = set()

    def derive(run: TargetRun | list[np.ndarray], lims: dict[str, float], label: str) -> alloc.Allocation | None:
        values = run if isinstance(run, list) else _values(run.probabilities, search.space, o.values, run.corrected)
        problem = alloc.Problem(values=values, weights=problem0.weights, offsets=problem0.offsets, names=problem0.names)
        try:
            a = alloc.allocate(problem, {**lims, **plimits})
        except InfeasibleBudgetError:
            return None
        pmap = search.space.from_choices(a.choices)
        if pmap not in seen:
            seen.add(pmap)
            cands.append(Candidate(pmap, "dnas", float(a.objective), dict(a.limits), label, bool(a.exact), float(a.gap)))
        return a

    if metric in limits and runs:
        nearest = min(runs, key=lambda r: abs(math.log(r.target / limits[metric])))
        try:
            if derive(nearest, limits, "budget") is None:
                alloc.allocate(problem0, {**limits, **plimits})
        except InfeasibleBudgetError as exc:
            raise in_budget_units(exc) from None
    for r in runs:
        a = derive(r, {**extra, metric: r.target}, f"target {r.target:.4g}")
        if a is not None:
            r.allocation = a
            r.precision_map = search.space.from_choices(a.choices)
    for name, table in start_tables:
        # the maps the steps started from: the allocations of the start's scores at the same targets
        for r in runs:
            derive(table, {**extra, metric: r.target}, f"{name}, target {r.target:.4g}")
        if metric in limits:
            derive(table, limits, f"{name}, budget")
    if o.sweep and len(runs) > 1:
        # more maps at no search cost: budgets between the targets, from the nearest run's probabilities
        lo_t, hi_t = min(targets), max(targets)
        for lim in np.linspace(lo_t, hi_t, search.options.front_points):
            nearest = min(runs, key=lambda r, lim=lim: abs(math.log(r.target / lim)))
            derive(nearest, {**extra, metric: float(lim)}, "sweep")
    if o.sweep and runs:
        # ... and below the smallest target, down to the smallest achievable cost (geometric, as the
        # sensitivity fronts), from the probabilities of the run with the smallest target
        low = min(runs, key=lambda r: r.target)
        problem = alloc.Problem(values=_values(low.probabilities, search.space, o.values, low.corrected),
                                weights=problem0.weights, offsets=problem0.offsets, names=problem0.names)
        try:
            below = alloc.allocate_front(problem, metric, max(2, search.options.front_points // 2),
                                         extra_limits={**extra, **plimits}, spacing="geometric")
        except InfeasibleBudgetError:
            below = []
        for a in below:
            size = problem0.cost_of(a.choices)[metric]
            if size < low.target:
                pmap = search.space.from_choices(a.choices)
                if pmap not in seen:
                    seen.add(pmap)
                    cands.append(Candidate(pmap, "dnas", float(a.objective), dict(a.limits), "sweep", bool(a.exact),
                                           float(a.gap)))
                # below the smallest target the learned probabilities know least: the start's scores too
                for name, table in start_tables:
                    derive(table, {**extra, metric: size}, f"{name}, sweep")
        # ... and above the largest target, up to every group at its dearest option (full precision
        # where the space has it), from the run with the largest target and the start's scores: the
        # targets stop at half the quantization range, and without these the front has nothing near
        # full precision, where the maps that lose least lie
        high = max(runs, key=lambda r: r.target)
        dearest = np.array([int(np.argmax(w)) for w in problem0.weights[metric]], dtype=np.int64)
        top = float(problem0.cost_of(dearest)[metric])
        if top > high.target:
            for lim in np.geomspace(high.target, top, max(2, search.options.front_points // 2) + 1)[1:]:
                derive(high, {**extra, metric: float(lim)}, "sweep above")
                for name, table in start_tables:
                    derive(table, {**extra, metric: float(lim)}, f"{name}, sweep above")
    seconds = time.perf_counter() - t0
    search.timings["search:dnas"] = seconds
    return DNASResult(
        metric=metric, runs=runs, candidates=cands, seconds=seconds, steps=sum(r.steps for r in runs),
        micro_batches=len(dn.batches), info={"loss": dn.loss_kind, "targets": targets, "sensitivity_seconds": t_scores,
              "calibration": calibration},
        start_table=start_table,
    )


def _as_table(space: SearchSpace, scores: list[np.ndarray]) -> SensitivityTable:
    """Per-decision scores as a table: a tied set's score stands on its first group, the others 0."""
    table = {g.name: {o.key(): 0.0 for o in opts} for g, opts in zip(space.groups, space.options, strict=True)}
    for members, opts, row in zip(space.decisions, space.decision_options, scores, strict=True):
        table[space.groups[members[0]].name] = {o.key(): max(0.0, float(v)) for o, v in zip(opts, row, strict=True)}
    return SensitivityTable(method="dnas", scores=table, extra={"source": "the DNAS start's Fisher scores"})


def _calibrate(search: Search, scores: list[np.ndarray], should_stop: StopFn | None, sequences: int | None = None
               ) -> tuple[list[np.ndarray], dict[str, Any]]:
    """The start's Fisher scores rescaled like the Hessian's (:func:`search.sensitivity.calibrate_scores`):
    the narrow grids by how much more their uniform maps measurably hurt than the additive scores say.
    ``scores`` are per decision: a tied set's score stands on its first group (the others score 0) while
    it is calibrated, which the factors, one per width, leave additive."""
    space = search.space
    table = {g.name: {o.key(): 0.0 for o in opts} for g, opts in zip(space.groups, space.options, strict=True)}
    for members, opts, row in zip(space.decisions, space.decision_options, scores, strict=True):
        table[space.groups[members[0]].name] = {o.key(): float(v) for o, v in zip(opts, row, strict=True)}
    batches = list(search.calibration)
    if sequences is not None:  # the first whole batches holding at least ``sequences`` sequences
        kept, n = [], 0
        for b in batches:
            if n >= sequences:
                break
            kept.append(b)
            n += len(b)
        batches = kept
    ctx = SensitivityContext(search.model, search.adapter, space, search.task, batches, search.device,
                             search.options.seed, search.options.clip)
    new, info = calibrate_scores(ctx, table, should_stop=should_stop)
    return [np.array([new[space.groups[members[0]].name][o.key()] for o in opts])
            for members, opts in zip(space.decisions, space.decision_options, strict=True)], info


def dnas_candidates(
    search: Search, *, on_progress: ProgressFn | None = None, should_stop: StopFn | None = None
) -> list[Candidate]:
    """The ``dnas`` proposer (:data:`search.methods.REGISTRY`): the DNAS front's maps, for the
    orchestration to evaluate."""
    res = run_dnas(search, on_progress=on_progress, should_stop=should_stop)
    search.dnas_start_table = res.start_table  # type: ignore[attr-defined]  # the closed loop's scores (search.orchestration)
    return res.candidates
