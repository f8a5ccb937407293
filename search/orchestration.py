"""One orchestration of a search's stages, for the in-process run and the job runner alike.

:func:`run_search` takes a live :class:`~search.pipeline.Search` through its stages: for each
method, a sensitivity table (read from the table store when one was stored for this space, else
computed and stored at once) turned into candidate maps by the planning core, or the candidates
a proposer method (DNAS, NSGA-II) finds itself; the uniform reference maps; the evaluation of
every distinct map; the result (Pareto front, recommendation); and, when the options ask for it,
the refinement of chosen points. What a job swaps is injected through :class:`SearchHooks`:

* ``tables`` (:class:`TableStore`): where sensitivity tables are read and stored (a job's store);
* ``evaluator`` (:class:`Evaluator`): how a list of maps is evaluated (a Ray pool); without one,
  maps are evaluated one after another in this process;
* ``scorer`` (:class:`Scorer`): where a sensitivity table is scored (parts of the calibration
  batches on several Ray workers, combined exactly); without one, or when it declines, in this
  process;
* ``on_progress`` / ``should_stop``: progress as a fraction of the whole search (0 to 1) and
  cancellation, checked between probes, maps and steps;
* ``on_event``: the search's log (a table reused or stored, a method's candidates, the
  evaluation, each refined point);
* ``method_settings``: per-method process settings that are not user options (where NSGA-II
  keeps its study);
* ``refine_dir`` and ``on_refined``: where refinement checkpoints go (a re-run resumes them), and
  what happens to a refined point's weights, which exist nowhere else (a job exports them).

Stages report progress in fixed shares: the methods up to :data:`P_METHODS`, the evaluation up to
:data:`P_EVALUATED` (the end without refinement), refinement the rest.
"""

from __future__ import annotations

import inspect
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Protocol

from search import loop, methods
from search.errors import CanceledError
from search.loop import Proxy
from search.pipeline import Search
from search.plan import Candidate, proxy_of
from search.result import ParetoPoint, SearchResult, SensitivityTable
from search.sensitivity import ProgressFn, StopFn
from search.space import PrecisionMap

#: progress at the end of the methods, and of the evaluation when refinement follows
P_METHODS, P_EVALUATED = 0.6, 0.8

Metrics = dict[str, float]
EventFn = Callable[..., None]


class TableStore(Protocol):
    """Where a search reads and stores its sensitivity tables (one per method, for its space)."""

    def load(self, method: str) -> SensitivityTable | None:
        """The table stored for ``method`` in this space, or None."""

    def save(self, table: SensitivityTable) -> None:
        """Store ``table`` (called as soon as it exists)."""


class Scorer(Protocol):
    """Scores a method's sensitivity table elsewhere (on several workers), or declines."""

    def score(self, method: str, *, on_progress: ProgressFn | None = None) -> SensitivityTable | None:
        """The table of ``method`` (what :meth:`Search.sensitivity` gives), or None to have it
        computed in this process."""


class Evaluator(Protocol):
    """Evaluates candidate maps on the search's evaluation batches."""

    def evaluate_many(
        self, maps: list[PrecisionMap], *, on_result: Callable[[int, int], None] | None = None
    ) -> list[Metrics]:
        """The metrics of every map, in order; ``on_result(done, total)`` after each."""


class LocalEvaluator:
    """:class:`Evaluator` in this process: one map after another, checking ``should_stop``."""

    def __init__(self, search: Search, should_stop: StopFn | None = None) -> None:
        self.search = search
        self.should_stop = should_stop

    def evaluate_many(
        self, maps: list[PrecisionMap], *, on_result: Callable[[int, int], None] | None = None
    ) -> list[Metrics]:
        out = []
        for m in maps:
            if self.should_stop is not None and self.should_stop():
                raise CanceledError("search canceled")
            out.append(self.search.evaluate(m, should_stop=self.should_stop))
            if on_result is not None:
                on_result(len(out), len(maps))
        return out


@dataclass
class SearchHooks:
    """What the caller of :func:`run_search` provides (see the module docstring); every part is
    optional."""

    tables: TableStore | None = None
    evaluator: Evaluator | None = None
    scorer: Scorer | None = None
    on_progress: ProgressFn | None = None
    should_stop: StopFn | None = None
    on_event: EventFn | None = None
    method_settings: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    refine_dir: Path | None = None
    on_refined: Callable[[int, Any, ParetoPoint], None] | None = None

    def progress(self, stage: str, fraction: float, message: str) -> None:
        if self.on_progress is not None:
            self.on_progress(stage, min(max(float(fraction), 0.0), 1.0), message)

    def span(self, lo: float, hi: float) -> ProgressFn:
        """A progress function mapping a stage's own 0..1 into ``[lo, hi]`` of the search."""
        return lambda stage, f, msg: self.progress(stage, lo + (hi - lo) * min(max(float(f), 0.0), 1.0), msg)

    def stop_requested(self) -> bool:
        return self.should_stop is not None and bool(self.should_stop())

    def check_stop(self) -> None:
        if self.stop_requested():
            raise CanceledError("search canceled")

    def event(self, kind: str, message: str, *, stage: str | None = None, data: dict[str, Any] | None = None) -> None:
        if self.on_event is not None:
            self.on_event(kind, message, stage=stage, data=data)


def run_search(search: Search, hooks: SearchHooks | None = None) -> SearchResult:
    """Every stage of ``search`` (see the module docstring); returns the result, refined points
    included."""
    h = hooks or SearchHooks()
    t0 = time.perf_counter()
    refine = search.options.refine
    eval_end = P_EVALUATED if refine is not None else 1.0
    tables: list[SensitivityTable] = []
    cands: list[Candidate] = []
    names = list(search.options.methods)
    share = P_METHODS / max(1, len(names))
    lp = search.options.loop
    # the calibration proxy: the loop's measurements, NSGA-II's objective and the recommendation
    measure = Proxy(lambda maps: search.calibration_proxy(maps, should_stop=h.should_stop),
                    units_per_map=len(search.calibration))
    proxy = measure if lp.enabled else None
    floor = loop.noise_floor(lp, search.task)
    uniform = search.uniform_candidates()
    loop_info: dict[str, Any] = {}
    for i, name in enumerate(names):
        h.check_stop()
        lo, hi = i * share, (i + 1) * share
        mid = lo + (hi - lo) * (0.7 if proxy is not None else 1.0)
        span = h.span(lo, mid)
        if methods.is_sensitivity(name):
            table = _table(search, name, h, span)
            tables.append(table)
            first = search.candidates(table)
            score_table: SensitivityTable | None = table
        else:
            first = _propose(search, name, h, span, measure)
            score_table = getattr(search, f"{name}_start_table", None)
        if proxy is None or score_table is None:
            cands.extend(replace(c, provenance=loop.provenance_of(c, name)) for c in first)
            continue
        if not methods.is_sensitivity(name):  # a proposer's own maps join as they are; its start's scores loop
            cands.extend(replace(c, provenance=loop.provenance_of(c, name)) for c in first)
            first = search.candidates(score_table)
        cands.extend(_close_loop(search, name, score_table, first, uniform, proxy, floor, h, h.span(mid, hi), loop_info))
    if proxy is not None:
        refs, left_out = loop.uniform_references(uniform, proxy, floor, lambda m: search.cost_model.cost(m).size_bytes)
        loop_info = {"enabled": True, "options": lp.model_dump(), "noise_floor": floor, "methods": loop_info,
                     "proxy_evaluations": proxy.measured, "forward_units": proxy.forward_units,
                     "uniform_left_out": left_out}
    else:
        refs = uniform
        loop_info = {"enabled": False}
    cands.extend(replace(c, provenance=loop.provenance_of(c, None)) for c in refs)
    points = _with_proxy(search, _evaluate(search, cands, h, P_METHODS, eval_end), measure)
    result = search.assemble(points, tables)
    result.info["loop"] = loop_info
    result.info["proxy"] = {"measured": measure.measured, "forward_units": measure.forward_units,
                            "weight_cache": _cache_info(search)}
    if refine is not None:
        refined = refine_points(search, result, h, eval_end, 1.0)
        if refined:
            points = points + refined
            result = search.assemble(points, tables)  # the front and the recommendation, refined included
            result.info["loop"] = loop_info
            result.info["proxy"] = {"measured": measure.measured, "forward_units": measure.forward_units,
                                    "weight_cache": _cache_info(search)}
        result.info["refine"] = {**result.info.get("refine", {}), "refined": len(refined)}
    search.timings["total"] = time.perf_counter() - t0
    return replace(result, timings=dict(search.timings))


def _close_loop(search: Search, name: str, table: SensitivityTable, first: list[Candidate], uniform: list[Candidate],
                proxy: Proxy, floor: float | None, h: SearchHooks, span: ProgressFn, info: dict[str, Any]
                ) -> list[Candidate]:
    """The closed loop (:func:`search.loop.close_loop`) of one score; its info goes into ``info[name]``."""
    t0 = time.perf_counter()
    score = name if methods.is_sensitivity(name) else f"{name} start"
    res = loop.close_loop(
        search.space, search.cost_model, table, search.options.budget, first, uniform, proxy, search.options.loop,
        method=name, score=score, floor=floor, on_progress=span, should_stop=h.should_stop,
    )
    seconds = time.perf_counter() - t0
    search.timings[f"loop:{name}"] = seconds
    info[name] = {**res.info, "seconds": seconds}
    r = res.info
    h.event(
        "loop",
        f"{name}: closed loop in {seconds:.1f} s, {r['proxy_evaluations']} maps measured on the calibration proxy "
        f"({len(r['rounds'])} correction rounds, {r['local']['improved']} local improvements, "
        f"{len(r['guard'])} uniform guards); {r['proposed']} maps proposed; {r['sweep']['stopped']}",
        stage=f"loop:{name}",
        data={"method": name, "proxy_evaluations": r["proxy_evaluations"], "forward_units": r["forward_units"],
              "proposed": r["proposed"], "seconds": seconds},
    )
    return res.candidates


def _table(search: Search, method: str, h: SearchHooks, span: ProgressFn) -> SensitivityTable:
    stored = h.tables.load(method) if h.tables is not None else None
    if stored is not None:
        h.event("sensitivity_reused", f"{method} sensitivity table reused from an earlier attempt (not recomputed)",
                stage=f"sensitivity:{method}", data={"method": method})
        return stored
    t0 = time.perf_counter()
    table = h.scorer.score(method, on_progress=span) if h.scorer is not None else None
    if table is None:
        table = search.sensitivity(method, on_progress=span, should_stop=h.should_stop)
    seconds = time.perf_counter() - t0
    if h.tables is not None:
        h.tables.save(table)
    h.event("sensitivity_stored", f"{method} sensitivity computed in {seconds:.1f} s and stored",
            stage=f"sensitivity:{method}", data={"method": method, "seconds": seconds, "samples": table.samples})
    return table


def _with_proxy(search: Search, points: list[ParetoPoint], proxy: Proxy) -> list[ParetoPoint]:
    """``points`` with the calibration discrepancy (``provenance["proxy"]``) of every point that
    meets the budget, measured where not yet (what :func:`search.plan.recommended_index` and
    :func:`refine_choice` choose on; the evaluation rows only report)."""
    budget = search.options.budget
    todo = [p.precision_map for p in points if budget.is_feasible(p.cost) and proxy_of(p) is None]
    if todo:
        proxy(todo)
    return [p if proxy_of(p) is not None or p.precision_map not in proxy.values
            else replace(p, provenance={**(p.provenance or {}), "proxy": proxy.values[p.precision_map]})
            for p in points]


def _cache_info(search: Search) -> dict[str, Any]:
    c = search.weight_cache
    return {"blocks": len(c.blocks), "bytes": c.bytes, "hits": c.hits, "misses": c.misses}


def _propose(search: Search, method: str, h: SearchHooks, span: ProgressFn, proxy: Proxy) -> list[Candidate]:
    fn = methods.get(method).load()
    kwargs: dict[str, Any] = {"on_progress": span, "should_stop": h.should_stop, **h.method_settings.get(method, {})}
    params = inspect.signature(fn).parameters
    if "measure_many" in params:  # a proposer that chooses on the calibration proxy (NSGA-II)
        kwargs["measure_many"] = proxy
    t0 = time.perf_counter()
    out = list(fn(search, **kwargs))
    info = getattr(search, f"{method}_info", None) or {}
    h.event(
        "method",
        f"{method}: {len(out)} candidate maps in {time.perf_counter() - t0:.1f} s"
        + (f" ({info.get('evaluated')} maps measured on the calibration proxy, {info.get('resumed', 0)} reused)"
           if info else ""),
        stage=method,
        data={"method": method, **{k: v for k, v in info.items() if isinstance(v, int | float | str)}},
    )
    return out


def _evaluate(search: Search, cands: Sequence[Candidate], h: SearchHooks, lo: float, hi: float) -> list[ParetoPoint]:
    """Every distinct map of ``cands`` evaluated once (candidates that carry metrics are not
    evaluated again); one point per distinct (map, method)."""
    unique: dict[tuple[PrecisionMap, str], Candidate] = {}
    for c in cands:
        unique.setdefault((c.precision_map, c.method), c)
    known: dict[PrecisionMap, Metrics] = {}
    for c in unique.values():
        if c.metrics is not None:
            known.setdefault(c.precision_map, dict(c.metrics))
    todo = list(dict.fromkeys(c.precision_map for c in unique.values() if c.precision_map not in known))
    h.progress("evaluate", lo, f"evaluating {len(todo)} maps")
    t0 = time.perf_counter()
    search.baseline()
    if todo:
        h.check_stop()
        evaluator = h.evaluator or LocalEvaluator(search, h.should_stop)

        def on_result(done: int, total: int) -> None:
            h.progress("evaluate", lo + (hi - lo) * done / max(1, total), f"evaluated {done}/{total} maps")

        for pmap, metrics in zip(todo, evaluator.evaluate_many(todo, on_result=on_result), strict=True):
            known[pmap] = metrics
    search.timings["evaluation"] = time.perf_counter() - t0
    summary = getattr(h.evaluator, "summary", None)
    data = summary() if callable(summary) else {}
    where = f" on {len(data['processes'])} process(es)" if "processes" in data else ""
    h.event("evaluated", f"{len(todo)} maps evaluated in {search.timings['evaluation']:.1f} s{where}",
            stage="evaluate", data=data or None)
    return [
        ParetoPoint(
            precision_map=c.precision_map,
            cost=search.cost_model.cost(c.precision_map),
            metrics=known[c.precision_map],
            method=c.method,
            label=c.label,
            predicted=c.predicted,
            budget=c.budget,
            provenance=c.provenance,
        )
        for c in unique.values()
    ]


# ------------------------------------------------------------------------------------ refinement


def split_validation(batches: Sequence[Any]) -> tuple[list[Any], list[Any]]:
    """Calibration batches split for refinement: training batches and the last quarter (at least one
    batch) held back for early stopping; with a single batch it serves both."""
    batches = list(batches)
    if len(batches) < 2:
        return batches, batches
    k = max(1, len(batches) // 4)
    return batches[:-k], batches[-k:]


def refine_choice(search: Search, result: SearchResult, h: SearchHooks) -> list[int]:
    """The indices (in ``result.points``) of the points to refine: the recommended one, or the ``k``
    points that meet the budget with the lowest calibration discrepancy (``provenance["proxy"]``:
    chosen on calibration rows, never on the evaluation rows; refining a point far over the budget,
    already close to full precision, buys nothing); one per map, uniform reference maps never."""
    refine = search.options.refine
    if refine is None:
        return []
    points = result.points
    if refine.points == "recommended":
        rec = result.info.get("recommended")
        if isinstance(rec, int):
            return [rec]
        h.event("note", "no point meets the budget: nothing to refine", stage="refine")
        return []
    budget = search.options.budget
    ranked = sorted(
        (i for i, p in enumerate(points)
         if p.method != "uniform" and not p.refined and proxy_of(p) is not None
         and (budget.empty or budget.is_feasible(p.cost))),
        key=lambda i: (proxy_of(points[i]), points[i].cost.size_bytes, i),
    )
    seen: set[PrecisionMap] = set()
    chosen = []
    for i in ranked:
        if points[i].precision_map not in seen:
            seen.add(points[i].precision_map)
            chosen.append(i)
    if not chosen:
        h.event("note", "no point that meets the budget was measured on the calibration rows: nothing to refine",
                stage="refine")
    return chosen[: int(refine.points)]


def refine_points(search: Search, result: SearchResult, h: SearchHooks, lo: float, hi: float) -> list[ParetoPoint]:
    """Fine-tune the chosen points (:func:`refine_choice`) with :func:`search.refine.refine`; each
    refined point is a new point with ``refined=True`` and ``refined_from`` its origin's index.
    Early stopping selects on held-back calibration batches (:func:`split_validation`), never on
    the evaluation rows the refined metrics are reported on."""
    from search.refine import RefineConfig, refine

    spec = search.options.refine
    chosen = refine_choice(search, result, h)
    if spec is None or not chosen:
        return []
    train, validation = split_validation(search.calibration)
    step = (hi - lo) / max(1, len(chosen))
    out: list[ParetoPoint] = []
    m = result.metric
    for k, i in enumerate(chosen):
        h.check_stop()
        origin = result.points[i]
        t0 = time.perf_counter()
        res = refine(
            search,
            origin.precision_map,
            config=RefineConfig(steps=spec.steps, seed=search.options.seed),
            train_batches=train,
            validation_batches=validation,
            on_progress=h.span(lo + k * step, lo + (k + 1) * step),
            should_stop=h.should_stop,
            checkpoint_dir=None if h.refine_dir is None else h.refine_dir / f"point-{i}",
        )
        seconds = time.perf_counter() - t0
        refined = replace(res.point(origin), refined_from=i)
        exported = True
        if h.on_refined is not None:
            exported = h.on_refined(i, res, refined) is not False
        out.append(refined)
        h.event(
            "refined",
            f"point {i} refined in {seconds:.1f} s ({res.steps} steps): {m} "
            f"{origin.metrics.get(m, float('nan')):.4g} -> {res.metrics.get(m, float('nan')):.4g}",
            stage="refine",
            data={"point": i, "steps": res.steps, "best_step": res.best_step, "resumed_from": res.resumed_from,
                  "seconds": seconds, "metrics": dict(res.metrics), "initial_metrics": dict(res.initial_metrics),
                  "exported": exported},
        )
    return out


__all__ = [
    "P_EVALUATED",
    "P_METHODS",
    "Evaluator",
    "LocalEvaluator",
    "Scorer",
    "SearchHooks",
    "TableStore",
    "refine_choice",
    "refine_points",
    "run_search",
    "split_validation",
]
