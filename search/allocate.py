"""Exact allocation: pick one option per group, minimise the summed sensitivity under cost budgets.

This is the multiple-choice knapsack problem. Each group ``g`` has options ``k`` with a value
``values[g][k]`` (the sensitivity, minimised in sum) and, per cost metric, a weight
``weights[metric][g][k]``; the total cost of a metric is its ``offset`` plus the chosen weights.

One budget (the common case) is solved along the *hull path*, computed once per metric:

1. each group's options are reduced to the lower convex hull of (cost, value), starting at the
   cheapest option and ending at the best one (dominated and non-convex options drop out);
2. all hull segments are sorted by efficiency (value saved per unit cost): taking them in that
   order is the parametric solution of the LP relaxation, and every prefix (a *vertex*) is an
   optimal allocation for its own cost;
3. a budget between two vertices gives the vertex below it, improved by a greedy fill of the
   leftover budget, as the incumbent, and the Lagrangian (LP) bound
   ``L(lam) = sum_g min_k (v + lam c) - lam B`` at the breakpoint's efficiency ``lam``. A better
   allocation has summed reduced cost ``v + lam c - min(...)`` below the gap, so options with a
   larger reduced cost are ruled out: most groups keep one option and are fixed. A dynamic
   programme over (cost, value) states of the remaining groups (dominance; pruned by the reduced
   cost, by feasibility and by the LP bound of the groups still to come) closes the gap on a
   growing prefix of them until the prefix holds every group that can move: the result is then
   proven optimal. The search has deterministic limits (``MAX_STATES``, ``MAX_WORK``) and honours
   ``time_limit``; when one cuts it short, the best allocation found is returned with its gap to
   the certified lower bound (``exact`` False).

Several budgets at once go to ``scipy.optimize.milp`` (HiGHS), bounded by the one-budget
relaxations (whose exact optima are lower bounds; if one of them meets every budget it is the
answer without a MILP).

Budgets are met within a relative tolerance of 1e-9, as :meth:`search.result.Budget.is_feasible`.
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from scipy import sparse
from scipy.optimize import Bounds, LinearConstraint, milp

from search.errors import InfeasibleBudgetError, InvalidInputError, SearchError

__all__ = [
    "Allocation",
    "Problem",
    "allocate",
    "allocate_front",
    "allocate_milp",
    "cost_range",
]

#: Budgets are met within this relative tolerance (the same as ``Budget.is_feasible``).
BUDGET_RTOL = 1e-9
#: Gaps below this, relative to the objective's scale, count as proven zero (floating-point noise).
GAP_RTOL = 1e-11
#: Limits of the exact search that closes a one-budget gap: states alive at once, and candidate
#: states examined in all (deterministic; about 20-40 ns each). Past them the allocation found so
#: far is returned with its certified gap (typically below 1e-5 relative on hard instances).
MAX_STATES = 20_000
MAX_WORK = 1_000_000
#: Groups in the exact search's first core prefix (then x4, or the whole core once it is within 8x).
FIRST_CORE = 32
_TINY = 1e-300


# --------------------------------------------------------------------------------------------
# Problem and result
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class Problem:
    """Groups, their options' values and costs.

    ``values[g][k] >= 0`` is the sensitivity of group ``g`` at option ``k`` (the allocator
    minimises the sum); ``weights[metric][g][k]`` is that option's contribution to ``metric``
    (e.g. ``size_bytes``, ``avg_bits``, ``bops``, ``latency_ms``); ``offsets[metric]`` is a
    constant cost outside the groups; ``names`` name the groups in messages. Groups may have
    different numbers of options, and one option only. Arrays are copied and made read-only.
    """

    values: list[np.ndarray]
    weights: dict[str, list[np.ndarray]]
    offsets: dict[str, float] = field(default_factory=dict)
    names: list[str] | None = None
    _cache: dict[str, Any] = field(default_factory=dict, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if isinstance(self.values, np.ndarray | str) or not isinstance(self.values, Sequence):
            raise InvalidInputError("values must be a list of 1-D arrays, one per group", field="values")
        n_groups = len(self.values)
        if n_groups == 0:
            raise InvalidInputError("the problem has no groups", field="values")
        names = None
        if self.names is not None:
            names = [str(n) for n in self.names]
            if len(names) != n_groups:
                raise InvalidInputError(
                    f"names has {len(names)} entries for {n_groups} groups", field="names"
                )
        object.__setattr__(self, "names", names)

        values = [self._array(v, g, "values") for g, v in enumerate(self.values)]
        lengths = np.fromiter((len(v) for v in values), dtype=np.int64, count=n_groups)
        for g in np.flatnonzero(lengths == 0)[:1]:
            raise InvalidInputError(f"{self.label(int(g))} has no options", field="values")
        flat_v = np.concatenate(values)
        bad = ~np.isfinite(flat_v) | (flat_v < 0)
        if bad.any():
            g = self._group_of_flat(lengths, int(np.flatnonzero(bad)[0]))
            raise InvalidInputError(
                f"values of {self.label(g)} must be finite and non-negative, got {values[g].tolist()}",
                field="values",
            )

        if not isinstance(self.weights, Mapping):
            raise InvalidInputError("weights must map a metric name to one array per group", field="weights")
        weights: dict[str, list[np.ndarray]] = {}
        flat_w: dict[str, np.ndarray] = {}
        for metric, per_group in self.weights.items():
            if not isinstance(metric, str) or not metric:
                raise InvalidInputError(f"metric names must be non-empty strings, got {metric!r}", field="weights")
            if isinstance(per_group, np.ndarray | str) or not isinstance(per_group, Sequence):
                raise InvalidInputError(f"weights[{metric!r}] must be a list of arrays", field="weights")
            if len(per_group) != n_groups:
                raise InvalidInputError(
                    f"weights[{metric!r}] has {len(per_group)} groups, values has {n_groups}", field="weights"
                )
            arrs = [self._array(w, g, f"weights[{metric!r}]") for g, w in enumerate(per_group)]
            for g, (a, n) in enumerate(zip(arrs, lengths, strict=True)):
                if len(a) != n:
                    raise InvalidInputError(
                        f"weights[{metric!r}] of {self.label(g)} has {len(a)} options, values has {n}",
                        field="weights",
                    )
            fw = np.concatenate(arrs)
            nonfinite = ~np.isfinite(fw)
            if nonfinite.any():
                g = self._group_of_flat(lengths, int(np.flatnonzero(nonfinite)[0]))
                raise InvalidInputError(
                    f"weights[{metric!r}] of {self.label(g)} must be finite, got {arrs[g].tolist()}",
                    field="weights",
                )
            weights[metric] = arrs
            flat_w[metric] = fw

        if not isinstance(self.offsets, Mapping):
            raise InvalidInputError("offsets must map a metric name to a number", field="offsets")
        offsets: dict[str, float] = {}
        for metric, off in self.offsets.items():
            if metric not in weights:
                raise InvalidInputError(
                    f"offset for {metric!r}, which has no weights (metrics: {', '.join(weights) or 'none'})",
                    field="offsets",
                )
            if isinstance(off, bool) or not isinstance(off, int | float | np.number) or not math.isfinite(off):
                raise InvalidInputError(f"offsets[{metric!r}] must be a finite number, got {off!r}", field="offsets")
            offsets[metric] = float(off)

        object.__setattr__(self, "values", values)
        object.__setattr__(self, "weights", weights)
        object.__setattr__(self, "offsets", offsets)

        # Padded (group x option) matrices: missing options have value +inf and cost 0.
        n_opt = int(lengths.max())
        starts = np.zeros(n_groups + 1, dtype=np.int64)
        np.cumsum(lengths, out=starts[1:])
        group_of = np.repeat(np.arange(n_groups), lengths)
        col = np.arange(len(flat_v)) - starts[group_of]
        mask = np.zeros((n_groups, n_opt), dtype=bool)
        mask[group_of, col] = True
        vmat = np.full((n_groups, n_opt), np.inf)
        vmat[group_of, col] = flat_v
        wmat: dict[str, np.ndarray] = {}
        for metric, fw in flat_w.items():
            m = np.zeros((n_groups, n_opt))
            m[group_of, col] = fw
            wmat[metric] = m
        for a in (flat_v, mask, vmat, starts, group_of, col, *flat_w.values(), *wmat.values()):
            a.setflags(write=False)
        self._cache.update(
            lengths=lengths, starts=starts, group_of=group_of, col=col, mask=mask, V=vmat, W=wmat,
            flat_v=flat_v, flat_w=flat_w, paths={},
        )

    # -- helpers --------------------------------------------------------------------------

    def _array(self, a: Any, g: int, what: str) -> np.ndarray:
        try:
            arr = np.array(a, dtype=np.float64)
        except (TypeError, ValueError) as exc:
            raise InvalidInputError(f"{what} of {self.label(g)} is not numeric: {exc}", field=what.split("[")[0]) from exc
        if arr.ndim != 1:
            raise InvalidInputError(f"{what} of {self.label(g)} must be 1-D, got shape {arr.shape}", field=what.split("[")[0])
        arr.setflags(write=False)
        return arr

    @staticmethod
    def _group_of_flat(lengths: np.ndarray, i: int) -> int:
        return int(np.searchsorted(np.cumsum(lengths), i, side="right"))

    def label(self, g: int) -> str:
        """How messages name group ``g``."""
        return f"group {g} ({self.names[g]!r})" if self.names else f"group {g}"

    @property
    def n_groups(self) -> int:
        return len(self.values)

    @property
    def metrics(self) -> list[str]:
        return list(self.weights)

    @property
    def n_options(self) -> np.ndarray:
        """Number of options per group."""
        return self._cache["lengths"]

    def value_of(self, choices: np.ndarray) -> float:
        """Summed value of an allocation."""
        return float(self._cache["V"][np.arange(self.n_groups), choices].sum())

    def cost_of(self, choices: np.ndarray) -> dict[str, float]:
        """Total cost per metric of an allocation, offsets included."""
        rows = np.arange(self.n_groups)
        return {m: float(w[rows, choices].sum()) + self.offsets.get(m, 0.0) for m, w in self._cache["W"].items()}

    def smallest(self, metric: str) -> float:
        """The smallest achievable total of ``metric`` (each group at its cheapest option)."""
        self._check_metric(metric, "metric")
        w = np.where(self._cache["mask"], self._cache["W"][metric], np.inf)
        return float(w.min(axis=1).sum()) + self.offsets.get(metric, 0.0)

    def _check_metric(self, metric: str, what: str) -> None:
        if metric not in self.weights:
            raise InvalidInputError(
                f"unknown cost metric {metric!r}; this problem has: {', '.join(self.weights) or 'none'}", field=what
            )

    def _check_choices(self, choices: Any, what: str) -> np.ndarray:
        try:
            c = np.asarray(choices)
        except (TypeError, ValueError) as exc:  # pragma: no cover - asarray rarely fails
            raise InvalidInputError(f"{what} is not an array: {exc}", field=what) from exc
        if c.shape != (self.n_groups,) or not np.issubdtype(c.dtype, np.integer):
            raise InvalidInputError(f"{what} must be {self.n_groups} integer option indices", field=what)
        if (c < 0).any() or (c >= self.n_options).any():
            raise InvalidInputError(f"{what} has an option index out of range", field=what)
        return c.astype(np.int64)


@dataclass(frozen=True, eq=False)
class Allocation:
    """One allocation: the option per group, its summed value, and how good it is proven to be.

    ``lower_bound`` is a certified lower bound on the optimum under ``limits`` (the optimum
    itself when ``exact``); ``gap = (objective - lower_bound) / max(|objective|, tiny)``.
    ``costs`` are the totals per metric, offsets included; ``solver`` names the path taken:
    ``unconstrained``, ``hull`` (a hull vertex, or its greedy fill, proven by the LP bound),
    ``hull+dp`` (the exact search on the undecided groups), ``hull+relaxation`` (a one-budget
    optimum that meets the other budgets too), ``milp``.
    """

    choices: np.ndarray
    objective: float
    lower_bound: float
    gap: float
    exact: bool
    costs: dict[str, float]
    limits: dict[str, float]
    solver: str

    def to_dict(self) -> dict[str, Any]:
        return {
            "choices": [int(c) for c in self.choices],
            "objective": self.objective,
            "lower_bound": self.lower_bound,
            "gap": self.gap,
            "exact": self.exact,
            "costs": dict(self.costs),
            "limits": dict(self.limits),
            "solver": self.solver,
        }


def _make(problem: Problem, choices: np.ndarray, lower_bound: float, limits: dict[str, float], solver: str,
          *, exact: bool) -> Allocation:
    choices = np.asarray(choices, dtype=np.int64)
    choices.setflags(write=False)
    obj = problem.value_of(choices)
    scale = max(abs(obj), _TINY)
    if exact or obj - lower_bound <= GAP_RTOL * scale:
        exact, lower_bound = True, obj
    gap = max(0.0, (obj - lower_bound) / scale)
    return Allocation(
        choices=choices, objective=obj, lower_bound=float(min(lower_bound, obj)), gap=gap, exact=exact,
        costs=problem.cost_of(choices), limits=dict(limits), solver=solver,
    )


# --------------------------------------------------------------------------------------------
# Limits and infeasibility
# --------------------------------------------------------------------------------------------


def _active_limits(problem: Problem, limits: Mapping[str, float] | None, what: str = "limits") -> dict[str, float]:
    if limits is None:
        return {}
    if not isinstance(limits, Mapping):
        raise InvalidInputError(f"{what} must map a metric name to a number", field=what)
    out: dict[str, float] = {}
    for metric, lim in limits.items():
        problem._check_metric(metric, what)
        if isinstance(lim, bool) or not isinstance(lim, int | float | np.number) or math.isnan(lim):
            raise InvalidInputError(f"the limit on {metric} must be a number, got {lim!r}", field=metric)
        if lim == -math.inf:
            raise InvalidInputError(f"the limit on {metric} is -inf", field=metric)
        if math.isfinite(lim):
            out[metric] = float(lim)
    return out


def _budget(problem: Problem, metric: str, limit: float) -> float:
    """The limit on the groups' summed cost: offsets removed, tolerance added."""
    return limit + BUDGET_RTOL * abs(limit) - problem.offsets.get(metric, 0.0)


def _check_each(problem: Problem, limits: dict[str, float]) -> None:
    """Raise InfeasibleBudgetError naming the first budget that no allocation meets on its own."""
    bad = []
    for metric, lim in limits.items():
        smallest = problem.smallest(metric)
        if _budget(problem, metric, lim) < smallest - problem.offsets.get(metric, 0.0):
            bad.append((metric, lim, smallest))
    if bad:
        metric, lim, smallest = bad[0]
        msg = "; ".join(f"{m} <= {lv:.6g} is not achievable: the smallest achievable {m} is {s:.6g}" for m, lv, s in bad)
        raise InfeasibleBudgetError(msg, field=metric, smallest=smallest)


def _fmt_limits(limits: Mapping[str, float]) -> str:
    return " and ".join(f"{m} <= {v:.6g}" for m, v in limits.items())


# --------------------------------------------------------------------------------------------
# The hull path (one budget)
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Path:
    vert: np.ndarray  # (G, K) option index of each group's hull vertex by step (0: cheapest)
    seg_group: np.ndarray  # (S,) group of each segment, in path order
    seg_step: np.ndarray  # (S,) the vertex step each segment leads to (1: the first upgrade)
    seg_dc: np.ndarray  # (S,) cost added by each segment
    seg_dv: np.ndarray  # (S,) value added (negative)
    eff: np.ndarray  # (S,) value saved per unit cost, non-increasing
    ccum: np.ndarray  # (S+1,) summed cost after taking the first s segments (no offset)
    vcum: np.ndarray  # (S+1,) summed value after the first s segments


def _path(problem: Problem, metric: str) -> _Path:
    cached = problem._cache["paths"].get(metric)
    if cached is not None:
        return cached
    V = problem._cache["V"]
    C = np.where(problem._cache["mask"], problem._cache["W"][metric], np.inf)
    G, K = V.shape
    rows = np.arange(G)
    # Each group's hull starts at its cheapest option (the best of equally cheap ones).
    start = np.where(C == C.min(axis=1)[:, None], V, np.inf).argmin(axis=1)
    group, step, to, dc, dv = _march(C, V, start, improving=True)
    vert = np.repeat(start[:, None], K, axis=1)  # columns past a group's last step are never read
    vert[group, step] = to
    # Convexity can break by rounding only: keep each group's efficiencies non-increasing so that
    # the sort never takes a group's segments out of order.
    eff = np.full((G, K), np.inf)
    eff[group, step] = -dv / dc
    eff = np.minimum.accumulate(eff, axis=1)[group, step]
    # _march lists segments step by step: a stable sort keeps each group's order among ties.
    order = np.argsort(-eff, kind="stable")
    group, step, eff, dc, dv = group[order], step[order], eff[order], dc[order], dv[order]
    start_c = float(C[rows, start].sum())
    start_v = float(V[rows, start].sum())
    ccum = np.concatenate([[start_c], start_c + np.cumsum(dc)])
    vcum = np.concatenate([[start_v], start_v + np.cumsum(dv)])
    # Rounding in the running sum must not make it decrease.
    ccum = np.maximum.accumulate(ccum)
    path = _Path(vert=vert, seg_group=group, seg_step=step, seg_dc=dc, seg_dv=dv, eff=eff, ccum=ccum, vcum=vcum)
    problem._cache["paths"][metric] = path
    return path


def _vertex(problem: Problem, path: _Path, s: int) -> np.ndarray:
    return path.vert[np.arange(problem.n_groups), _steps(problem, path, s)]


def _steps(problem: Problem, path: _Path, s: int) -> np.ndarray:
    """Hull steps taken per group after the first ``s`` segments of the path."""
    return np.bincount(path.seg_group[:s], minlength=problem.n_groups)


#: Segments the greedy fill looks at, at most.
_GREEDY_SCAN = 4096


def _greedy_fill(path: _Path, steps: np.ndarray, start: int, slack: float) -> tuple[np.ndarray, float]:
    """From hull steps ``steps``, take later segments of the path (from ``start``, best first)
    that fit the slack and continue their group's hull: the classic greedy heuristic.
    Returns the new steps and the value they add (<= 0)."""
    dc = path.seg_dc[start : start + _GREEDY_SCAN]
    cand = np.flatnonzero(dc <= slack)
    if not cand.size:
        return steps, 0.0
    steps = steps.copy()
    gained = 0.0
    cand += start
    for i, g, k, c in zip(cand.tolist(), path.seg_group[cand].tolist(), path.seg_step[cand].tolist(),
                          path.seg_dc[cand].tolist(), strict=True):
        if c <= slack and steps[g] + 1 == k:
            steps[g] = k
            slack -= c
            gained += path.seg_dv[i]
    return steps, gained


class _Deadline:
    def __init__(self, time_limit: float | None) -> None:
        if time_limit is not None and (
            isinstance(time_limit, bool) or not isinstance(time_limit, int | float) or not time_limit > 0
        ):
            raise InvalidInputError(f"time_limit must be a positive number of seconds, got {time_limit!r}",
                                    field="time_limit")
        self.end = None if time_limit is None else time.perf_counter() + float(time_limit)

    def left(self) -> float | None:
        return None if self.end is None else max(0.0, self.end - time.perf_counter())

    def passed(self) -> bool:
        return self.end is not None and time.perf_counter() >= self.end


def _allocate_one(problem: Problem, metric: str, limit: float, deadline: _Deadline,
                  limits: dict[str, float] | None = None) -> Allocation:
    limits = {metric: limit} if limits is None else limits
    path = _path(problem, metric)
    budget = _budget(problem, metric, limit)
    V = problem._cache["V"]
    C = problem._cache["W"][metric]
    rows = np.arange(problem.n_groups)
    s = int(np.searchsorted(path.ccum, budget, side="right")) - 1
    if s < 0:  # pragma: no cover - callers check feasibility first
        raise InfeasibleBudgetError(
            f"{metric} <= {limit:.6g} is not achievable: the smallest achievable {metric} is "
            f"{problem.smallest(metric):.6g}", field=metric, smallest=problem.smallest(metric))
    choice = _vertex(problem, path, s)
    cost = float(C[rows, choice].sum())
    while cost > budget and s > 0:  # the running sum rounded below the exact total
        s -= 1
        choice = _vertex(problem, path, s)
        cost = float(C[rows, choice].sum())
    if s >= len(path.eff):
        return _make(problem, choice, problem.value_of(choice), limits, "hull", exact=True)
    lam = float(path.eff[s])
    # Incumbents: the vertex filled greedily, and the vertices one and two segments back filled
    # from the same point of the path (undoing a large last segment can leave room for better).
    steps = _steps(problem, path, s)
    best_steps, best_gain = steps, 0.0
    back_steps, back_v, back_c = steps.copy(), 0.0, cost
    for back in range(3):
        if back:
            if s - back < 0:
                break
            g = path.seg_group[s - back]
            back_steps[g] -= 1
            back_v -= path.seg_dv[s - back]
            back_c -= path.seg_dc[s - back]
        cand, gain = _greedy_fill(path, back_steps, s, budget - back_c)
        if back_v + gain < best_gain:
            best_steps, best_gain = cand, back_v + gain
    incumbent = choice if best_steps is steps else path.vert[rows, best_steps]
    if float(C[rows, incumbent].sum()) > budget:  # rounding in the running sums
        incumbent = choice
    return _close_gap(problem, V, C, choice, cost, lam, budget, limits, deadline, incumbent)


def _close_gap(problem: Problem, V: np.ndarray, C: np.ndarray, choice: np.ndarray, cost: float, lam: float,
               budget: float, limits: dict[str, float], deadline: _Deadline,
               incumbent: np.ndarray) -> Allocation:
    """Prove the vertex ``choice`` optimal or find the optimum, with the Lagrangian bound at ``lam``.

    Reduced costs ``R = v + lam c - min_k(v + lam c)`` (per group) say how far each option is
    from the LP's choice; an allocation better than the incumbent has summed ``R`` below the gap,
    so only groups whose second-smallest ``R`` is below the gap can move (the *core*). Sorted by
    that second ``R`` the core is a prefix of the groups; the exact search runs on a growing
    prefix (32, 128, ... groups, the rest at their LP choice), each run improving the incumbent
    and shrinking the core, until the prefix holds the whole core: then the result is proven.
    """
    G = problem.n_groups
    rows = np.arange(G)
    mask = problem._cache["mask"]
    vc = V[rows, choice]
    cc = C[rows, choice]
    value = float(vc.sum())
    # Reduced costs relative to the vertex (differences keep precision at large totals).
    D = (V - vc[:, None]) + lam * (C - cc[:, None])
    D[~mask] = np.inf
    dmin = D.min(axis=1)
    R = D - dmin[:, None]
    lower = value - lam * (budget - cost) + float(dmin.sum())
    tol = GAP_RTOL * (abs(value) + abs(lam) * abs(budget) + abs(lower)) + _TINY

    best_choice = incumbent
    best_v = problem.value_of(best_choice)
    if best_v - lower <= tol:
        return _make(problem, best_choice, lower, limits, "hull", exact=True)

    base = D.argmin(axis=1)
    second = np.partition(R, 1, axis=1)[:, 1] if R.shape[1] > 1 else np.full(G, np.inf)
    # The groups that may move, by their second reduced cost: later cores are prefixes of it.
    order = np.flatnonzero(second < best_v - lower - tol)
    order = order[np.argsort(second[order], kind="stable")]
    second = second[order]
    size = FIRST_CORE
    work = [MAX_WORK]
    while True:
        n_core = int(np.searchsorted(second, best_v - lower - tol, side="left"))
        if n_core == 0:
            return _make(problem, best_choice, lower, limits, "hull+dp", exact=True)
        size = min(size, n_core)
        best_v, best_choice, finished = _core_dp(
            problem, V, C, R, base, order[:size], budget, lam, lower, tol, best_v, best_choice, deadline, work)
        if not finished:
            # Out of work or time: the best allocation found, with its certified gap.
            return _make(problem, best_choice, lower, limits, "hull+dp", exact=False)
        n_core = int(np.searchsorted(second, best_v - lower - tol, side="left"))
        if n_core <= size:
            return _make(problem, best_choice, lower, limits, "hull+dp", exact=True)
        # Straight to the whole core when it is not much larger; else a larger prefix first.
        size = size * 4 if n_core > 8 * size else n_core


def _core_dp(problem: Problem, V: np.ndarray, C: np.ndarray, R: np.ndarray, base: np.ndarray,
             core: np.ndarray, budget: float, lam: float, lower: float, tol: float, best_v: float,
             best_choice: np.ndarray, deadline: _Deadline, work: list[int]) -> tuple[float, np.ndarray, bool]:
    """Exact search over the groups ``core`` (the others at ``base``): (cost, value) states with
    dominance, pruned by the reduced-cost bound and by feasibility.

    Finds the best allocation that differs from ``base`` only in ``core``, if it beats
    ``best_v`` by more than ``tol``. Returns (best value, its choices, finished); finished is
    False when the states grew past ``MAX_STATES``, the candidates examined past the budget in
    ``work[0]`` (decremented) or the deadline passed: then the best allocation found so far.
    """
    G = problem.n_groups
    rows = np.arange(G)
    n = len(core)
    thr = best_v - lower - tol
    opts = [np.flatnonzero(R[g] < thr) for g in core]
    oc = [C[g, k] for g, k in zip(core, opts, strict=True)]
    ov = [V[g, k] for g, k in zip(core, opts, strict=True)]
    orr = [R[g, k] for g, k in zip(core, opts, strict=True)]
    # Suffix sums over the groups still to come: cheapest cost, cost and value at base.
    min_rest = np.zeros(n + 1)
    base_c_rest = np.zeros(n + 1)
    base_v_rest = np.zeros(n + 1)
    for t in range(n - 1, -1, -1):
        g = core[t]
        min_rest[t] = min_rest[t + 1] + oc[t].min()
        base_c_rest[t] = base_c_rest[t + 1] + C[g, base[g]]
        base_v_rest[t] = base_v_rest[t + 1] + V[g, base[g]]
    rest_lp = _RestLP(C[core], np.where(R[core] < thr, V[core], np.inf), base[core])
    outside = np.ones(G, dtype=bool)
    outside[core] = False
    sc = np.array([float(C[rows[outside], base[outside]].sum())])
    sv = np.array([float(V[rows[outside], base[outside]].sum())])
    sr = np.array([0.0])
    parents: list[np.ndarray] = []
    picks: list[np.ndarray] = []
    finished = True
    for t in range(n):
        m = len(sc)
        work[0] -= m * len(oc[t])
        # Option-major: each option's block keeps the states' cost order (a cheap merge below).
        nc = (oc[t][:, None] + sc).ravel()
        nr = (orr[t][:, None] + sr).ravel()
        idx = np.flatnonzero((nr < thr) & (nc <= budget - min_rest[t + 1]))
        nc, nr = nc[idx], nr[idx]
        bound = nr
        if idx.size > 8:
            # What the groups still to come can do at best with the slack (or deficit) left at
            # their base options, in reduced terms: the LP bound of every completion.
            bound = nr + rest_lp.penalty(t + 1, budget - base_c_rest[t + 1] - nc, lam)
            ok = np.flatnonzero(bound < thr)
            idx, nc, nr, bound = idx[ok], nc[ok], nr[ok], bound[ok]
        pick, parent = np.divmod(idx, m)
        nv = ov[t][pick] + sv[parent]
        if idx.size > 1:
            # Dominance: by cost, keep a state only if it beats every cheaper one's value.
            o = np.argsort(nc, kind="stable")
            vs = nv[o]
            nd = np.empty(len(o), dtype=bool)
            nd[0] = True
            nd[1:] = vs[1:] < np.minimum.accumulate(vs)[:-1]
            o = o[nd]
            pick, parent, nc, nv, nr = pick[o], parent[o], nc[o], nv[o], nr[o]
        sc, sv, sr = nc, nv, nr
        parents.append(parent)
        picks.append(pick)
        if not len(sc):
            break
        # Complete every state with the remaining groups' base options: a cheap incumbent.
        comp_v = np.where(sc + base_c_rest[t + 1] <= budget, sv + base_v_rest[t + 1], np.inf)
        j = int(np.argmin(comp_v))
        if comp_v[j] < best_v - tol:
            best_v = float(comp_v[j])
            best_choice = _trace(core, opts, parents, picks, base, t, j)
            thr = best_v - lower - tol
            sel = np.flatnonzero(sr < thr)
            if len(sel) < len(sr):
                parents[-1], picks[-1] = parents[-1][sel], picks[-1][sel]
                sc, sv, sr = sc[sel], sv[sel], sr[sel]
        if len(sc) > MAX_STATES or work[0] < 0 or deadline.passed():
            finished = False
            break
    return problem.value_of(best_choice), best_choice, finished


class _RestLP:
    """LP bounds on what the core groups from position ``t`` on can do from their base options.

    Filling a slack ``S`` by upgrades saves at most ``F_t(S)`` (their hull segments above base,
    best value per unit cost first); freeing a deficit ``D`` by downgrades loses at least
    ``G_t(D)``. Every completion of a state with slack ``S`` then has a reduced cost of at least
    ``lam S - F_t(S)`` (or ``G_t(D) - lam D``), both >= 0 since base is optimal at ``lam``.
    """

    def __init__(self, C: np.ndarray, V: np.ndarray, base: np.ndarray) -> None:
        pos, _, _, dc, dv = _march(C, V, base, improving=True)
        self.up = self._sorted(pos, dc, dv, upward=True)
        pos, _, _, dc, dv = _march(-C, V, base, improving=False)
        self.down = self._sorted(pos, dc, dv, upward=False)
        self._curves: dict[bool, tuple[int, np.ndarray, np.ndarray]] = {}

    @staticmethod
    def _sorted(pos: np.ndarray, dc: np.ndarray, dv: np.ndarray, *, upward: bool):
        """Segments by position, cost moved (> 0) and value gained (upward: saved; downward:
        lost), best rate first."""
        amount = -dv if upward else dv
        rate = amount / dc
        o = np.argsort(-rate if upward else rate, kind="stable")
        return pos[o], dc[o], amount[o]

    def _curve(self, t: int, upward: bool) -> tuple[np.ndarray, np.ndarray]:
        # The curve of the groups from t0 <= t on includes more groups: a weaker bound, still
        # valid, so it is rebuilt only every few steps.
        cached = self._curves.get(upward)
        if cached is None or t - cached[0] >= 4:
            pos, dc, amount = self.up if upward else self.down
            sel = pos >= t
            x = np.concatenate([[0.0], np.cumsum(dc[sel])])
            y = np.concatenate([[0.0], np.cumsum(amount[sel])])
            cached = self._curves[upward] = (t, x, y)
        return cached[1], cached[2]

    def penalty(self, t: int, slack: np.ndarray, lam: float) -> np.ndarray:
        out = np.zeros(len(slack))
        pos = slack > 0
        if pos.any():
            x, y = self._curve(t, True)
            s = slack[pos]
            out[pos] = np.maximum(0.0, lam * s - np.interp(s, x, y))
        neg = slack < 0
        if neg.any():
            x, y = self._curve(t, False)
            d = -slack[neg]
            out[neg] = np.maximum(0.0, np.interp(d, x, y, right=np.inf) - lam * d)
        return out


def _march(C: np.ndarray, V: np.ndarray, start: np.ndarray, *, improving: bool):
    """Lower-hull segments of each row's (C, V) options, from ``start`` towards larger C.

    Options with V = inf are absent. With ``improving`` only options of smaller V count (an
    upgrade that loses value never helps). Among equally steep options the nearest is taken:
    collinear points stay vertices. Returns (row, step, option, dc, dv) of every segment, step
    by step (step 1: the first segment of every row, then step 2...).
    """
    cur = start.copy()
    active = np.arange(len(start))
    out = []
    for step in range(1, C.shape[1]):
        if active.size == 0:
            break
        dc = C[active] - C[active, cur[active]][:, None]
        dv = V[active] - V[active, cur[active]][:, None]
        ok = (dc > 0) & np.isfinite(dv)
        if improving:
            ok &= dv < 0
        with np.errstate(invalid="ignore", divide="ignore"):
            slope = np.where(ok, dv / np.where(ok, dc, 1.0), np.inf)
        best = slope.min(axis=1)
        has = np.flatnonzero(np.isfinite(best))
        nxt = np.where(ok & (slope == best[:, None]), dc, np.inf).argmin(axis=1)[has]
        active = active[has]
        out.append((active, np.full(len(has), step), nxt, dc[has, nxt], dv[has, nxt]))
        cur[active] = nxt
    if not out:
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64), \
            np.zeros(0), np.zeros(0)
    return tuple(np.concatenate(parts) for parts in zip(*out, strict=True))


def _trace(core: np.ndarray, opts: list[np.ndarray], parents: list[np.ndarray], picks: list[np.ndarray],
           base: np.ndarray, t: int, j: int) -> np.ndarray:
    """The allocation of state ``j`` after step ``t``, the other groups at their base option."""
    choice = base.copy()
    for s in range(t, -1, -1):
        choice[core[s]] = opts[s][picks[s][j]]
        j = int(parents[s][j])
    return choice


# --------------------------------------------------------------------------------------------
# MILP (several budgets, the reference, and the fallback of the gap closure)
# --------------------------------------------------------------------------------------------


def _milp(obj: np.ndarray, allowed: np.ndarray, cons: Sequence[tuple[np.ndarray, float]],
          time_limit: float | None) -> tuple[np.ndarray | None, float, int]:
    """Pick one allowed option per row minimising ``obj`` subject to ``sum W <= b`` for each (W, b).

    Returns (choices or None, certified lower bound, scipy status): status 0 optimal, 1 stopped
    by the time limit, 2 infeasible. Choices are rounded, checked against the budgets, and None
    when no solution was found (or the rounded one breaks a budget).
    """
    n, _ = obj.shape
    gi, ki = np.nonzero(allowed)
    nv = len(gi)
    # Each row's best allowed option costs nothing (a constant shift), and the objective is
    # scaled by a typical option's excess: HiGHS's absolute tolerances then fit sensitivities
    # that span many orders of magnitude (scaling by the largest value loses the small ones).
    shift = np.where(allowed, obj, np.inf).min(axis=1)
    o = obj[gi, ki] - shift[gi]
    pos = o[o > 0]
    oscale = float(np.median(pos)) if pos.size else 1.0
    base_obj = float(shift.sum())
    rows_eq = sparse.csr_array((np.ones(nv), (gi, np.arange(nv))), shape=(n, nv))
    constraints = [LinearConstraint(rows_eq, 1.0, 1.0)]
    for W, b in cons:
        w = W[gi, ki]
        s = max(abs(b), float(np.abs(w).max()) if nv else 0.0)
        s = s if s > 0 else 1.0
        constraints.append(LinearConstraint(sparse.csr_array(w[None, :] / s), -np.inf, b / s))
    options: dict[str, Any] = {
        "mip_rel_gap": 1e-12,
        "mip_abs_gap": 0.0,
        "mip_feasibility_tolerance": 1e-9,
        "primal_feasibility_tolerance": 1e-9,
    }
    if time_limit is not None:
        options["time_limit"] = max(float(time_limit), 1e-3)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Unrecognized options", category=RuntimeWarning)
        res = milp(o / oscale, integrality=np.ones(nv), bounds=Bounds(0, 1), constraints=constraints,
                   options=options)
    dual = getattr(res, "mip_dual_bound", None)
    if dual is not None and math.isfinite(dual):
        bound = base_obj + float(dual) * oscale
    elif res.status == 0 and res.fun is not None:
        bound = base_obj + float(res.fun) * oscale
    else:
        bound = -math.inf
    if res.x is None:
        return None, bound, int(res.status)
    X = np.full(obj.shape, -1.0)
    X[gi, ki] = res.x
    choice = X.argmax(axis=1)
    rows = np.arange(n)
    for W, b in cons:
        if float(W[rows, choice].sum()) > b:
            return None, bound, int(res.status)
    return choice, bound, int(res.status)


def _meets(problem: Problem, choices: np.ndarray, limits: Mapping[str, float]) -> bool:
    costs = problem.cost_of(choices)
    return all(costs[m] - problem.offsets.get(m, 0.0) <= _budget(problem, m, lim) for m, lim in limits.items())


def _full_milp(problem: Problem, limits: dict[str, float], time_limit: float | None,
               objective: np.ndarray | None = None) -> tuple[np.ndarray | None, float, int]:
    cache = problem._cache
    cons = [(cache["W"][m], _budget(problem, m, lim)) for m, lim in limits.items()]
    obj = cache["V"] if objective is None else objective
    return _milp(np.where(cache["mask"], obj, 0.0), cache["mask"], cons, time_limit)


def _joint_infeasible(problem: Problem, limits: dict[str, float], deadline: _Deadline,
                      proven: bool) -> InfeasibleBudgetError:
    metric = next(iter(limits))
    others = {m: v for m, v in limits.items() if m != metric}
    smallest = None
    left = deadline.left()
    choice, _, status = _full_milp(problem, others, 10.0 if left is None else min(10.0, max(left, 1.0)),
                                   objective=problem._cache["W"][metric])
    if choice is not None and status == 0:
        smallest = problem.cost_of(choice)[metric]
    each = ", ".join(f"{m} {problem.smallest(m):.6g}" for m in limits)
    head = ("no allocation meets " if proven else "no allocation meeting ") + _fmt_limits(limits)
    head += " together" if proven else " together was found within the time limit (infeasibility not proven)"
    msg = f"{head}; each alone is achievable (smallest {each})"
    if smallest is not None:
        msg += f"; the smallest {metric} achievable within {_fmt_limits(others)} is {smallest:.6g}"
    return InfeasibleBudgetError(msg, field=metric, smallest=smallest)


def _run_milp(problem: Problem, limits: dict[str, float], deadline: _Deadline, incumbent: np.ndarray | None,
              bound: float) -> Allocation:
    choice, mbound, status = _full_milp(problem, limits, deadline.left())
    if status == 2:
        raise _joint_infeasible(problem, limits, deadline, proven=True)
    if status not in (0, 1):  # pragma: no cover - unbounded or a solver failure
        raise SearchError(f"milp failed (status {status}) on {_fmt_limits(limits)}", field="limits")
    if incumbent is not None and (choice is None or problem.value_of(incumbent) < problem.value_of(choice)):
        choice = incumbent
    if choice is None:
        raise _joint_infeasible(problem, limits, deadline, proven=False)
    # Proven when the bound meets the objective (``_make`` checks, within GAP_RTOL).
    return _make(problem, choice, max(bound, mbound), limits, "milp", exact=False)


# --------------------------------------------------------------------------------------------
# Public entry points
# --------------------------------------------------------------------------------------------


def _unconstrained(problem: Problem, limits: dict[str, float]) -> Allocation:
    cache = problem._cache
    V = cache["V"]
    best = V.min(axis=1)
    cand = V == best[:, None]
    # Among equally good options the cheapest, by the metrics in order.
    for w in cache["W"].values():
        key = np.where(cand, w, np.inf)
        cand &= key == key.min(axis=1)[:, None]
    choice = cand.argmax(axis=1)
    return _make(problem, choice, float(best.sum()), limits, "unconstrained", exact=True)


def allocate(problem: Problem, limits: Mapping[str, float], *, time_limit: float | None = None) -> Allocation:
    """The allocation of least summed value within ``limits`` (metric -> largest total cost).

    One budget: the hull path and the exact gap closure (milliseconds at 10,000 groups).
    Several: ``milp``, unless a one-budget allocation already meets every budget (then it is
    optimal, up to the gap of its one-budget search). ``time_limit`` (seconds) cuts the exact
    search short; the returned allocation then carries its certified gap.
    Infinite limits are ignored. Raises InfeasibleBudgetError when no allocation meets a budget
    alone (with the smallest achievable value) or all of them together.
    """
    deadline = _Deadline(time_limit)
    active = _active_limits(problem, limits)
    _check_each(problem, active)
    if not active:
        return _unconstrained(problem, active)
    if len(active) == 1:
        metric, lim = next(iter(active.items()))
        return _allocate_one(problem, metric, lim, deadline)
    # One budget at a time (in the order given): an optimum with one budget that meets the
    # others is optimal with all of them.
    relax = []
    for m, lim in active.items():
        a = _allocate_one(problem, m, lim, deadline, limits=active)
        if a.exact and _meets(problem, a.choices, active):
            return _make(problem, a.choices, a.objective, active, "hull+relaxation", exact=True)
        relax.append(a)
    # Every relaxation's bound holds with all budgets: a feasible one is as close as they prove.
    bound = max(a.lower_bound for a in relax)
    feasible = [a for a in relax if _meets(problem, a.choices, active)]
    if feasible:
        a = min(feasible, key=lambda a: a.objective)
        return _make(problem, a.choices, bound, active, "hull+relaxation", exact=False)
    # No one-budget allocation meets the others: milp, bounded below by the relaxations.
    return _run_milp(problem, active, deadline, None, bound)


def allocate_milp(problem: Problem, limits: Mapping[str, float], *, time_limit: float | None = None,
                  warm_start: np.ndarray | None = None) -> Allocation:
    """The same optimum by ``scipy.optimize.milp`` (HiGHS) on the whole problem: the reference.

    scipy's ``milp`` takes no starting solution, so ``warm_start`` (option index per group) is
    the incumbent returned when ``milp`` finds nothing better within ``time_limit``.
    """
    deadline = _Deadline(time_limit)
    active = _active_limits(problem, limits)
    _check_each(problem, active)
    incumbent = None
    if warm_start is not None:
        incumbent = problem._check_choices(warm_start, "warm_start")
        if not _meets(problem, incumbent, active):
            incumbent = None
    return _run_milp(problem, active, deadline, incumbent, -math.inf)


def cost_range(problem: Problem, metric: str) -> tuple[float, float]:
    """(smallest achievable total of ``metric``, its total at the unconstrained optimum), offsets
    included; among equally good optima the cheapest in ``metric``."""
    problem._check_metric(metric, "metric")
    path = _path(problem, metric)
    off = problem.offsets.get(metric, 0.0)
    rows = np.arange(problem.n_groups)
    W = problem._cache["W"][metric]
    lo = float(W[rows, _vertex(problem, path, 0)].sum()) + off
    hi = float(W[rows, _vertex(problem, path, len(path.eff))].sum()) + off
    return lo, max(lo, hi)


def allocate_front(problem: Problem, metric: str, n_points: int = 24, *,
                   extra_limits: Mapping[str, float] | None = None,
                   spacing: str = "linear",
                   bounds: tuple[float | None, float | None] | None = None) -> list[Allocation]:
    """Optimal allocations at ``n_points`` limits on ``metric``, from the smallest achievable total
    to the total of the unconstrained optimum (both included), spaced evenly (``"linear"``) or by a
    constant ratio (``"geometric"``: denser at the cheap end, where maps differ most; linear when the
    smallest total is not positive). ``bounds`` (either end None: that end of the range) narrows
    the swept range to its intersection with ``[low, high]``.

    Without ``extra_limits`` every point comes off one hull path (computed once). With them, the
    range is that under the extra limits and each point is an ``allocate`` with all limits.
    """
    problem._check_metric(metric, "metric")
    if isinstance(n_points, bool) or not isinstance(n_points, int | np.integer) or n_points < 2:
        raise InvalidInputError(f"n_points must be an integer >= 2, got {n_points!r}", field="n_points")
    extra = _active_limits(problem, extra_limits, "extra_limits")
    if metric in extra:
        raise InvalidInputError(f"extra_limits must not limit the swept metric {metric}", field="extra_limits")
    if spacing not in ("linear", "geometric"):
        raise InvalidInputError(f"spacing must be 'linear' or 'geometric', got {spacing!r}", field="spacing")

    def limits(lo: float, hi: float) -> np.ndarray:
        if bounds is not None:
            b_lo, b_hi = bounds
            if b_lo is not None:
                lo = min(hi, max(lo, float(b_lo)))
            if b_hi is not None:
                hi = max(lo, min(hi, float(b_hi)))
        if spacing == "geometric" and lo > 0 and hi > lo:
            out = np.geomspace(lo, hi, n_points)
            out[0], out[-1] = lo, hi
            return out
        return np.linspace(lo, hi, n_points)

    deadline = _Deadline(None)
    if not extra:
        lo, hi = cost_range(problem, metric)
        return [_allocate_one(problem, metric, float(lim), deadline) for lim in limits(lo, hi)]
    _check_each(problem, extra)
    top = allocate(problem, extra)
    choice, _, status = _full_milp(problem, extra, None, objective=problem._cache["W"][metric])
    if choice is None:  # pragma: no cover - top is feasible, so milp finds a solution
        raise _joint_infeasible(problem, extra, deadline, proven=status == 2)
    lo = problem.cost_of(choice)[metric]
    hi = max(lo, top.costs[metric])
    return [allocate(problem, {metric: float(lim), **extra}) for lim in limits(lo, hi)]
