"""The closed loop: a score's first allocation checked against measurements on the calibration
proxy, corrected, searched locally, guarded against uniform maps, and swept where the front bends.

Torch-free: the loop sees the model only through a *proxy*, a function that measures precision maps
on the calibration batches (:meth:`search.pipeline.Search.calibration_proxy`: forward passes only,
the mean per-row discrepancy the sensitivity methods score, :func:`search.tasks.discrepancy`).
:class:`Proxy` caches its measurements, so a map is measured once per search whichever score or
stage asks for it, and counts them. The evaluation rows are never read here: every choice below is
made on the calibration proxy, and the maps it keeps are evaluated once, afterwards.

:func:`close_loop`, for one score (a sensitivity table: ``kl``, ``hessian``, ``fisher``, or the
DNAS start's scores), given its first allocation (the sweep and the budget point of
:func:`search.plan.candidates_from_table`):

1. **Measure** the first allocation's maps and the uniform maps.
2. **Correct and re-allocate** (at most ``rounds`` times): the additive model predicts a map's
   discrepancy as the sum of its groups' scores; the correction multiplies every score by
   ``exp(a_w + b_k)``, one factor per weight grid ``w`` (its bit-width with its scale layout and
   activation width: ``3`` and ``3g128`` compound differently and get a factor each; ``0``: pruned)
   and one per block ``k``, fitted by least squares on ``log measured - log predicted`` over every measured map (a small ridge
   penalty keeps unidentified factors at 1). The exact allocator re-allocates the same budgets on
   the corrected scores; a round that improves no budget's best measured map, or repeats measured
   maps only, ends the rounds.
3. **Sweep where the front bends** (``extra_points``): the largest jump of the measured front's log
   discrepancy between two neighbouring budgets gets a map at their geometric middle, repeatedly.
4. **Local search** (``local_steps`` proxy evaluations): from the maps allocated at the budget,
   the uniform maps and the measured front's maps (in that order), moves that change one
   decision, or raise one and lower another, at equal or lower cost (every limit), ranked by the
   corrected model's predicted change (moves that keep the swept cost before those that lower it:
   a move that frees cost leaves budget unspent), are measured :data:`MOVES_PER_STEP` at a time; the best
   that lowers the measured discrepancy is taken and the search goes on from it; a start ends after
   :data:`PATIENCE` batches in a row without an improvement (or after half the evaluations), until
   the evaluations are spent.
5. **Guard**: at the cost of every uniform map, and at the budget, the best kept map must measure
   no worse than the uniform map; where none does, the uniform map itself becomes this score's
   candidate there (``guard``). Maps that a measured map dominates (cost and discrepancy, uniform
   maps included) are dropped.
6. **Stop at the noise floor**: of the kept maps by cost, at most one beyond the first whose
   discrepancy is at or below ``noise_floor`` (:data:`NOISE_FLOORS`) is evaluated.

Every candidate carries its provenance (``Candidate.provenance``): the score, the round, whether the
local search found it, whether the guard put it there, how (``sweep``, ``budget``, ``dense``,
``local from uniform 4-bit``) and its measured proxy discrepancy. Cost: every measured map is one
forward pass per calibration batch (``forward_units`` in the loop's info).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from bitscout import rules
from bitscout.methods import LoopOptions
from search import allocate as alloc
from search.cost import CostModel
from search.errors import CanceledError, InfeasibleBudgetError
from search.plan import Candidate, build_problem, sweep_metric
from search.result import Budget, SensitivityTable
from search.space import BitOption, PrecisionMap, SearchSpace

#: The default noise floor of each task's proxy discrepancy (``LoopOptions.noise_floor``): output
#: KL (nats per row or per scored token) below 1e-4, or ``1 - cosine`` below 1e-5, is a change no
#: evaluation of a few hundred rows resolves. Regression's squared error has the outputs' units, so
#: it has none (the sweep does not stop early).
NOISE_FLOORS: dict[str, float | None] = {
    "sequence_classification": 1e-4,
    "token_classification": 1e-4,
    "causal_lm": 1e-4,
    "embeddings": 1e-5,
    "regression": None,
}
#: ridge weight of the log-factors' fit
RIDGE = 0.5
#: moves measured per step of the local search before it re-ranks
MOVES_PER_STEP = 4
#: batches in a row without an improvement that end a start of the local search
PATIENCE = 2

MeasureFn = Callable[[list[PrecisionMap]], list[float]]
ProgressFn = Callable[[str, float, str], None]
StopFn = Callable[[], bool]


def noise_floor(options: LoopOptions, task: str) -> float | None:
    """The proxy discrepancy at or below which a map counts as full precision (None: no floor)."""
    return options.noise_floor if options.noise_floor is not None else NOISE_FLOORS.get(task)


class Proxy:
    """The calibration proxy with a cache: ``proxy(maps)`` measures the maps not measured yet (in one
    call of ``measure``) and answers every map's discrepancy; ``measured`` counts the maps measured."""

    def __init__(self, measure: MeasureFn, *, units_per_map: float = 1.0) -> None:
        self._measure = measure
        self.values: dict[PrecisionMap, float] = {}
        self.measured = 0
        self.units_per_map = float(units_per_map)

    def __call__(self, maps: Sequence[PrecisionMap]) -> list[float]:
        todo = list(dict.fromkeys(m for m in maps if m not in self.values))
        if todo:
            for m, v in zip(todo, self._measure(todo), strict=True):
                self.values[m] = float(v)
            self.measured += len(todo)
        return [self.values[m] for m in maps]

    def one(self, pmap: PrecisionMap) -> float:
        return self([pmap])[0]

    @property
    def forward_units(self) -> float:
        return self.measured * self.units_per_map


@dataclass
class LoopResult:
    """What :func:`close_loop` proposes: the candidates to evaluate (with provenance) and what it did."""

    candidates: list[Candidate]
    info: dict[str, Any] = field(default_factory=dict)


def provenance_of(c: Candidate, score: str | None) -> dict[str, Any]:
    """A candidate's provenance: its own, or that of the open loop (round 0, no local search)."""
    if c.provenance is not None:
        return dict(c.provenance)
    if c.method == "uniform":
        return {"reference": True, "score": None}
    return {"score": score, "round": 0, "local_search": False, "guard": False, "how": c.label}


class _Model:
    """The additive score model of one table with per-grid and per-block log-factors (a grid: an
    integer or pruned option's :meth:`BitOption.key`, so per-row and group-wise scales of one width,
    and its activation widths, are corrected apart)."""

    def __init__(self, space: SearchSpace, table: SensitivityTable) -> None:
        self.space = space
        self.table = table
        self.widths = sorted({o.key() for opts in space.options for o in opts if o.is_integer or o.pruned},
                             key=lambda k: (BitOption.parse(k).bits, k))
        self.blocks = sorted({g.block for g in space.groups})
        self._w = {b: i for i, b in enumerate(self.widths)}
        self._k = {b: i for i, b in enumerate(self.blocks)}
        self.theta = np.zeros(len(self.widths) + len(self.blocks))

    def features(self, pmap: PrecisionMap) -> np.ndarray:
        """The raw scores of ``pmap`` summed per (width, block)."""
        f = np.zeros((len(self.widths), len(self.blocks)))
        for g in self.space.groups:
            o = pmap[g.name]
            if o.key() in self._w and (o.is_integer or o.pruned):
                f[self._w[o.key()], self._k[g.block]] += max(0.0, float(self.table.scores.get(g.name, {}).get(o.key(), 0.0)))
        return f

    def _factors(self, theta: np.ndarray) -> np.ndarray:
        a, b = theta[: len(self.widths)], theta[len(self.widths):]
        return np.exp(a[:, None] + b[None, :])

    def fit(self, maps: Sequence[PrecisionMap], measured: Sequence[float]) -> bool:
        """Fit the log-factors to ``measured`` (least squares in log space, ridge :data:`RIDGE`);
        False (factors left as they were) with fewer than two usable measurements."""
        from scipy.optimize import least_squares

        feats, logs = [], []
        for m, v in zip(maps, measured, strict=True):
            f = self.features(m)
            if v > 0 and f.sum() > 0 and math.isfinite(v):
                feats.append(f)
                logs.append(math.log(v))
        if len(feats) < 2:
            return False
        F = np.stack(feats)
        y = np.array(logs)

        def resid(theta: np.ndarray) -> np.ndarray:
            pred = (F * self._factors(theta)[None]).sum(axis=(1, 2))
            return np.concatenate([np.log(np.maximum(pred, 1e-300)) - y, math.sqrt(RIDGE) * theta])

        sol = least_squares(resid, np.zeros_like(self.theta), bounds=(-8.0, 8.0), method="trf")
        self.theta = np.asarray(sol.x, dtype=np.float64)
        return True

    def factors(self) -> dict[str, dict[str, float]]:
        a, b = self.theta[: len(self.widths)], self.theta[len(self.widths):]
        return {"bits": {str(w): float(math.exp(v)) for w, v in zip(self.widths, a, strict=True)},
                "blocks": {str(k): float(math.exp(v)) for k, v in zip(self.blocks, b, strict=True)}}

    def corrected(self) -> SensitivityTable:
        fac = self._factors(self.theta)
        scores: dict[str, dict[str, float]] = {}
        for g, opts in zip(self.space.groups, self.space.options, strict=True):
            row = self.table.scores.get(g.name, {})
            new = {}
            for o in opts:
                v = max(0.0, float(row.get(o.key(), 0.0)))
                if o.key() in self._w and (o.is_integer or o.pruned):
                    v *= float(fac[self._w[o.key()], self._k[g.block]])
                new[o.key()] = v
            scores[g.name] = new
        return replace(self.table, scores=scores)


def _dominates(c1: float, q1: float, c2: float, q2: float) -> bool:
    return c1 <= c2 and q1 <= q2 and (c1 < c2 or q1 < q2)


def close_loop(
    space: SearchSpace,
    cost_model: CostModel,
    table: SensitivityTable,
    budget: Budget,
    first: Sequence[Candidate],
    uniform: Sequence[Candidate],
    proxy: Proxy,
    options: LoopOptions,
    *,
    method: str | None = None,
    score: str | None = None,
    floor: float | None = None,
    on_progress: ProgressFn | None = None,
    should_stop: StopFn | None = None,
) -> LoopResult:
    """The closed loop of one score (see the module docstring): ``first`` is the score's first
    allocation, ``uniform`` the uniform reference maps; the candidates returned are tagged
    ``method`` (default: the table's) and their provenance names ``score`` (default: ``method``)."""
    method = method or table.method
    score = score or method
    report = on_progress or (lambda stage, f, msg: None)
    stage = f"loop:{method}"

    def check_stop() -> None:
        if should_stop is not None and should_stop():
            raise CanceledError("search canceled")

    problem, plimits = build_problem(space, cost_model, table)
    metric = sweep_metric(budget)
    limits = budget.limits()
    extra = {k: v for k, v in limits.items() if k != metric}
    extra.update(plimits)
    start_units = proxy.measured
    costs: dict[PrecisionMap, dict[str, float]] = {}

    def cost(pmap: PrecisionMap) -> dict[str, float]:
        if pmap not in costs:
            costs[pmap] = problem.cost_of(np.array(space.decision_choices(pmap), dtype=np.int64))
        return costs[pmap]

    def meets(pmap: PrecisionMap, lims: Mapping[str, float]) -> bool:
        return rules.meets(cost(pmap), dict(lims))

    pool: dict[PrecisionMap, Candidate] = {}

    def add(c: Candidate, prov: dict[str, Any]) -> bool:
        if c.precision_map in pool:
            return False
        pool[c.precision_map] = replace(c, method=method, provenance=prov)
        return True

    for c in first:
        add(c, {"score": score, "round": 0, "local_search": False, "guard": False, "how": c.label})
    refs = []
    for u in uniform:
        try:
            cost(u.precision_map)
        except Exception:  # noqa: BLE001 - a uniform map the decisions cannot express is no reference here
            continue
        refs.append(u)
    report(stage, 0.0, f"{method}: measuring {len(pool) + len(refs)} maps on the calibration proxy")
    proxy([*pool, *(u.precision_map for u in refs)])

    model = _Model(space, table)
    budgets = [dict(c.budget) for c in first if c.budget]

    def best_at(lims: Mapping[str, float]) -> float | None:
        vals = [proxy.values[m] for m in pool if m in proxy.values and meets(m, lims)]
        return min(vals) if vals else None

    # -- 2. correct and re-allocate -------------------------------------------------------------
    rounds: list[dict[str, Any]] = []
    stopped = "rounds exhausted" if options.rounds else "no correction rounds asked for"
    last_round = 0
    for r in range(1, options.rounds + 1):
        check_stop()
        maps = list(proxy.values)
        if not model.fit(maps, [proxy.values[m] for m in maps]):
            stopped = "too few measured maps to fit a correction"
            break
        cproblem, _ = build_problem(space, cost_model, model.corrected())
        before = [best_at(lims) for lims in budgets]
        new: list[Candidate] = []
        for lims, c in zip(budgets, [c for c in first if c.budget], strict=True):
            try:
                a = alloc.allocate(cproblem, {**lims, **plimits})
            except InfeasibleBudgetError:
                continue
            pmap = space.from_choices(a.choices)
            cand = Candidate(pmap, method, float(a.objective), dict(a.limits), c.label, bool(a.exact), float(a.gap))
            if add(cand, {"score": score, "round": r, "local_search": False, "guard": False, "how": c.label}):
                new.append(cand)
        if not new:
            rounds.append({"round": r, "new_maps": 0, "improved": 0, "factors": model.factors()})
            stopped = f"round {r}: the corrected scores repeat measured maps"
            break
        proxy([c.precision_map for c in new])
        after = [best_at(lims) for lims in budgets]
        improved = sum(1 for b, a in zip(before, after, strict=True)
                       if a is not None and (b is None or a < b * (1 - 1e-9)))
        rounds.append({"round": r, "new_maps": len(new), "improved": improved, "factors": model.factors()})
        last_round = r
        report(stage, 0.4 * r / max(1, options.rounds), f"{method}: round {r}, {len(new)} maps, {improved} budgets improved")
        if not improved:
            stopped = f"round {r}: no budget improved"
            break
    cproblem, _ = build_problem(space, cost_model, model.corrected())

    def front_of(maps: Sequence[PrecisionMap]) -> list[PrecisionMap]:
        pts = sorted(maps, key=lambda m: (cost(m)[metric], proxy.values[m]))
        out: list[PrecisionMap] = []
        best = math.inf
        for m in pts:
            q = proxy.values[m]
            if q < best:
                out.append(m)
                best = q
        return out

    def below_floor(q: float) -> bool:
        return floor is not None and q <= floor

    # -- 3. more maps where the measured front bends --------------------------------------------
    dense = 0
    tried: set[tuple[float, float]] = set()
    for _ in range(options.extra_points):
        check_stop()
        front = front_of(list(pool))
        stop_i = next((i for i, m in enumerate(front) if below_floor(proxy.values[m])), len(front) - 1)
        gaps = []
        for m1, m2 in zip(front[: stop_i + 1], front[1: stop_i + 1], strict=False):
            c1, c2 = cost(m1)[metric], cost(m2)[metric]
            key = (c1, c2)
            if key in tried or c2 <= c1 * (1 + 1e-6):
                continue
            q1, q2 = max(proxy.values[m1], 1e-30), max(proxy.values[m2], 1e-30)
            gaps.append((abs(math.log(q1) - math.log(q2)), key))
        if not gaps:
            break
        _, (c1, c2) = max(gaps)
        tried.add((c1, c2))
        try:
            a = alloc.allocate(cproblem, {**extra, metric: math.sqrt(c1 * c2)})
        except InfeasibleBudgetError:
            continue
        pmap = space.from_choices(a.choices)
        cand = Candidate(pmap, method, float(a.objective), dict(a.limits), "dense", bool(a.exact), float(a.gap))
        if add(cand, {"score": score, "round": last_round, "local_search": False, "guard": False, "how": "dense"}):
            proxy.one(pmap)
            dense += 1

    # -- 4. local search ------------------------------------------------------------------------
    local = _local_search(space, cproblem, pool, refs, proxy, options.local_steps, metric, extra, cost, front_of,
                          below_floor, add, score, last_round, check_stop)
    report(stage, 0.9, f"{method}: local search, {local['evaluations']} maps measured, {local['improved']} improved")

    # -- 5. guard against uniform maps, drop what measured maps dominate -------------------------
    guard: list[dict[str, Any]] = []

    def guard_at(lims: Mapping[str, float], u: Candidate, where: str) -> None:
        qu = proxy.values[u.precision_map]
        best = best_at(lims)
        if best is None or best > qu:
            add(replace(u, label=f"{u.label} (guard)"),
                {"score": score, "round": last_round, "local_search": False, "guard": True, "how": f"guard at {where}"})
            guard.append({"at": where, "uniform": u.label, "uniform_proxy": qu, "best_proxy": best})

    for u in refs:
        guard_at({metric: cost(u.precision_map)[metric]}, u, u.label)
    if limits:
        inside = [u for u in refs if meets(u.precision_map, limits)]
        if inside:
            guard_at(limits, min(inside, key=lambda u: proxy.values[u.precision_map]), "the budget")
    everything = [*pool, *(u.precision_map for u in refs)]
    kept = [m for m in pool if not any(_dominates(cost(o)[metric], proxy.values[o], cost(m)[metric], proxy.values[m])
                                       for o in everything if o != m)]
    if limits:  # the map proposed at the budget is always evaluated
        inside_pool = [m for m in pool if meets(m, limits)]
        if inside_pool:
            at_budget = min(inside_pool, key=lambda m: (proxy.values[m], cost(m)[metric]))
            if at_budget not in kept:
                kept.append(at_budget)

    # -- 6. stop at the noise floor -------------------------------------------------------------
    kept.sort(key=lambda m: (cost(m)[metric], proxy.values[m]))
    cut = next((i for i, m in enumerate(kept) if below_floor(proxy.values[m])), None)
    dropped: list[PrecisionMap] = []
    if cut is not None and cut + 2 < len(kept):
        protected = _best_in(kept, limits, meets, proxy) if limits else None
        dropped = [m for m in kept[cut + 2:] if m != protected]
        kept = [m for m in kept if m not in set(dropped)]
    out = []
    for m in kept:
        c = pool[m]
        out.append(replace(c, provenance={**(c.provenance or {}), "proxy": proxy.values[m]}))
    swept = [cost(m) for m in kept] or [cost(m) for m in pool]
    if cut is not None:
        why = (f"the proxy fell to the noise floor ({floor:.3g}) at {cost(kept[min(cut, len(kept) - 1)])['avg_bits']:.2f} "
               f"average bits; {len(dropped)} larger maps not evaluated")
    elif floor is None:
        why = "no noise floor for this task: the whole range is swept"
    else:
        why = f"the largest budget of the sweep was reached above the noise floor ({floor:.3g})"
    info = {
        "score": score,
        "rounds": rounds,
        "rounds_stopped": stopped,
        "dense": dense,
        "local": local,
        "guard": guard,
        "sweep": {
            "metric": metric,
            "range": [min(c[metric] for c in swept), max(c[metric] for c in swept)] if swept else [],
            "avg_bits": [min(c["avg_bits"] for c in swept), max(c["avg_bits"] for c in swept)] if swept else [],
            "stopped": why,
            "noise_floor": floor,
            "dropped": len(dropped),
        },
        "measured": len(pool),
        "proposed": len(out),
        "proxy_evaluations": proxy.measured - start_units,
        "forward_units": (proxy.measured - start_units) * proxy.units_per_map,
    }
    report(stage, 1.0, f"{method}: {len(out)} maps proposed after {info['proxy_evaluations']} proxy evaluations")
    return LoopResult(out, info)


def _best_in(maps: Sequence[PrecisionMap], limits: Mapping[str, float], meets: Callable[..., bool],
             proxy: Proxy) -> PrecisionMap | None:
    inside = [m for m in maps if meets(m, limits)]
    return min(inside, key=lambda m: proxy.values[m]) if inside else None


def _local_search(
    space: SearchSpace,
    cproblem: alloc.Problem,
    pool: dict[PrecisionMap, Candidate],
    refs: Sequence[Candidate],
    proxy: Proxy,
    steps: int,
    metric: str,
    extra: Mapping[str, float],
    cost: Callable[[PrecisionMap], dict[str, float]],
    front_of: Callable[[Sequence[PrecisionMap]], list[PrecisionMap]],
    below_floor: Callable[[float], bool],
    add: Callable[[Candidate, dict[str, Any]], bool],
    score: str,
    last_round: int,
    check_stop: Callable[[], None],
) -> dict[str, Any]:
    """Exchange moves at equal or lower cost from the measured front and the uniform maps (see the
    module docstring); accepted maps join ``pool``."""
    info: dict[str, Any] = {"evaluations": 0, "starts": 0, "improved": 0}
    if steps <= 0:
        return info
    labels = {u.precision_map: u.label for u in refs}
    # the maps allocated at the budget first (the point a user deploys), then the uniform maps,
    # then the rest of the measured front; maps measured at the noise floor need no search
    at_budget = [m for m, c in pool.items() if c.label == "budget"]
    starts = [*sorted(at_budget, key=lambda m: proxy.values[m]), *(u.precision_map for u in refs),
              *front_of(list(pool))]
    starts = [m for m in dict.fromkeys(starts) if not below_floor(proxy.values[m])]
    if not starts:
        return info
    info["starts"] = len(starts)
    per_start = max(2 * MOVES_PER_STEP, steps // 2)
    metrics = list(cproblem.weights)
    V = [np.asarray(v, dtype=np.float64) for v in cproblem.values]
    W = {m: [np.asarray(w, dtype=np.float64) for w in cproblem.weights[m]] for m in metrics}
    used = 0
    for start in starts:
        if used >= steps:
            break
        check_stop()
        choice = np.array(space.decision_choices(start), dtype=np.int64)
        q_cur = proxy.values[start]
        cap = {metric: cost(start)[metric]}
        for k, v in extra.items():
            cap[k] = max(float(v), cost(start)[k])
        tried: set[PrecisionMap] = set()
        spent = 0
        name = labels.get(start) or (pool[start].label if start in pool else "")
        improved = False
        misses = 0
        while spent < per_start and used < steps:
            moves = _moves(choice, V, W, cap, cproblem.offsets)
            batch: list[PrecisionMap] = []
            for ch in moves:
                pmap = space.from_choices(ch)
                if pmap in tried or pmap == start:
                    continue
                tried.add(pmap)
                batch.append(pmap)
                if len(batch) >= min(MOVES_PER_STEP, per_start - spent, steps - used):
                    break
            if not batch:
                break
            n_new = sum(1 for m in batch if m not in proxy.values)
            qs = proxy(batch)
            spent += max(1, n_new)
            used += n_new
            i = int(np.argmin(qs))
            if not qs[i] < q_cur * (1 - 1e-9):
                misses += 1
                if misses >= PATIENCE:
                    break  # no move of the last batches helps: the next start
                continue
            misses = 0
            q_cur = qs[i]
            choice = np.array(space.decision_choices(batch[i]), dtype=np.int64)
            improved = True
            cand = Candidate(batch[i], "", float(sum(V[d][choice[d]] for d in range(len(V)))), dict(cap),
                             "local", False, 0.0)
            add(cand, {"score": score, "round": last_round, "local_search": True, "guard": False,
                       "how": f"local from {name or 'a front map'}"})
        info["improved"] += int(improved)
    info["evaluations"] = used
    return info


def _moves(
    choice: np.ndarray,
    V: list[np.ndarray],
    W: Mapping[str, list[np.ndarray]],
    cap: Mapping[str, float],
    offsets: Mapping[str, float],
) -> list[np.ndarray]:
    """Every move from ``choice`` that changes one decision, or two (one up, one down in the swept
    cost), within ``cap``: those that keep the swept cost first, then those that lower it, each
    ordered by the predicted change of the summed scores (smallest first)."""
    n = len(V)
    dec, opt, dv = [], [], []
    dc: dict[str, list[float]] = {m: [] for m in W}
    for d in range(n):
        k0 = int(choice[d])
        for k in range(len(V[d])):
            if k == k0:
                continue
            dec.append(d)
            opt.append(k)
            dv.append(V[d][k] - V[d][k0])
            for m in W:
                dc[m].append(W[m][d][k] - W[m][d][k0])
    if not dec:
        return []
    dec_a, opt_a, dv_a = np.array(dec), np.array(opt), np.array(dv)
    dc_a = {m: np.array(v) for m, v in dc.items()}
    rows = np.arange(n)
    cur = {m: float(np.array([W[m][d][choice[d]] for d in rows]).sum()) + offsets.get(m, 0.0) for m in W}
    slack = {m: cap[m] - cur[m] for m in cap if m in W}
    tol = {m: rules.RTOL * max(abs(cap[m]), 1.0) for m in slack}
    out: list[tuple[float, np.ndarray]] = []
    ok1 = np.ones(len(dec_a), dtype=bool)
    for m, s in slack.items():
        ok1 &= dc_a[m] <= s + tol[m]
    first_metric = next(iter(cap))
    # moves that spend the start's cost come first: one that frees cost leaves budget unspent
    frees = -tol.get(first_metric, 0.0)
    for i in np.flatnonzero(ok1):
        ch = choice.copy()
        ch[dec_a[i]] = opt_a[i]
        out.append((int(dc_a[first_metric][i] < frees), float(dv_a[i]), ch))
    up = np.flatnonzero(dc_a[first_metric] > 0)
    down = np.flatnonzero(dc_a[first_metric] < 0)
    if len(up) and len(down):
        ok = dec_a[up][:, None] != dec_a[down][None, :]
        for m, s in slack.items():
            ok &= (dc_a[m][up][:, None] + dc_a[m][down][None, :]) <= s + tol[m]
        tot = dv_a[up][:, None] + dv_a[down][None, :]
        freed = (dc_a[first_metric][up][:, None] + dc_a[first_metric][down][None, :]) < frees
        ii, jj = np.nonzero(ok)
        order = np.lexsort((tot[ii, jj], freed[ii, jj]))[:512]
        for t in order:
            i, j = up[ii[t]], down[jj[t]]
            ch = choice.copy()
            ch[dec_a[i]] = opt_a[i]
            ch[dec_a[j]] = opt_a[j]
            out.append((int(freed[ii[t], jj[t]]), float(tot[ii[t], jj[t]]), ch))
    out.sort(key=lambda t: (t[0], t[1]))
    return [ch for _, _, ch in out[:1024]]


def uniform_references(uniform: Sequence[Candidate], proxy: Proxy, floor: float | None,
                       size: Callable[[PrecisionMap], float]) -> tuple[list[Candidate], int]:
    """The uniform reference maps to evaluate: those above the noise floor and the smallest one at or
    below it (the rest measure as full precision); returns them and how many were left out."""
    if floor is None:
        return list(uniform), 0
    measured = [u for u in uniform if u.precision_map in proxy.values]
    below = sorted((u for u in measured if proxy.values[u.precision_map] <= floor), key=lambda u: size(u.precision_map))
    left_out = {id(u) for u in below[1:]}
    return [u for u in uniform if id(u) not in left_out], len(left_out)


__all__ = ["NOISE_FLOORS", "LoopResult", "Proxy", "close_loop", "noise_floor", "provenance_of", "uniform_references"]
