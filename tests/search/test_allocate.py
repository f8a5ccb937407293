"""The allocator against brute force (small instances) and scipy's milp (hundreds of groups)."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from search import allocate as alloc_mod
from search.allocate import (
    Allocation,
    Problem,
    allocate,
    allocate_front,
    allocate_milp,
    cost_range,
)
from search.errors import InfeasibleBudgetError, InvalidInputError

RTOL = 1e-9


# ---------------------------------------------------------------------------------------------
# Instances and the brute-force reference
# ---------------------------------------------------------------------------------------------


def small_problem(rng: np.random.Generator, metrics=("a", "b", "c")) -> Problem:
    """2-6 groups x 1-5 options; values on a coarse grid (ties), integer costs with zeros
    (free options such as pruning), one metric with real costs, some offsets."""
    n = int(rng.integers(2, 7))
    sizes = rng.integers(1, 6, n)
    values = [np.round(rng.random(k), 1) for k in sizes]
    weights = {}
    for i, m in enumerate(metrics):
        if i == 1:
            weights[m] = [rng.random(k) * 3 for k in sizes]
        else:
            weights[m] = [rng.integers(0, 5, k).astype(float) for k in sizes]
    offsets = {metrics[0]: float(rng.integers(0, 3))}
    return Problem(values, weights, offsets)


def all_maps(p: Problem):
    return itertools.product(*[range(len(v)) for v in p.values])


def enumerate_maps(p: Problem) -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]:
    """Every map (rows of option indices), its summed value and its total per metric."""
    maps = np.array(list(all_maps(p)), dtype=np.int64)
    cols = range(p.n_groups)
    values = sum(np.asarray(p.values[g])[maps[:, g]] for g in cols)
    totals = {m: p.offsets.get(m, 0.0) + sum(np.asarray(w[g])[maps[:, g]] for g in cols) for m, w in p.weights.items()}
    return maps, values, totals


def brute(p: Problem, limits: dict[str, float], enumerated=None) -> float | None:
    """The optimum by enumerating every map (None: infeasible); budgets with Budget's tolerance."""
    _, values, totals = enumerated or enumerate_maps(p)
    ok = np.ones(len(values), dtype=bool)
    for m, lim in limits.items():
        ok &= totals[m] <= lim + RTOL * abs(lim)
    return float(values[ok].min()) if ok.any() else None


def sweep_limits(p: Problem, metric: str, enumerated, rng: np.random.Generator, n: int = 12) -> list[float]:
    """Costs that maps have (budgets exactly at a boundary), points between them, and beyond."""
    costs = np.unique(enumerated[2][metric])
    picked = np.unique(np.concatenate([costs[:2], costs[-1:], rng.choice(costs, min(n, len(costs)))]))
    mids = (picked[:-1] + picked[1:]) / 2
    return [float(x) for x in (*picked, *mids, costs[-1] + 1.0)]


def check_allocation(p: Problem, a: Allocation, limits: dict[str, float], optimum: float) -> None:
    assert isinstance(a, Allocation)
    assert math.isclose(a.objective, optimum, rel_tol=1e-9, abs_tol=1e-12), (a, optimum)
    assert math.isclose(a.objective, p.value_of(a.choices), rel_tol=1e-12, abs_tol=1e-12)
    for m, lim in limits.items():
        assert a.costs[m] <= lim + RTOL * abs(lim)
    assert a.costs == pytest.approx(p.cost_of(a.choices))
    assert a.lower_bound <= optimum + 1e-9 * max(1.0, abs(optimum))
    assert a.exact and a.gap == 0.0


# ---------------------------------------------------------------------------------------------
# Exactness
# ---------------------------------------------------------------------------------------------


def test_one_budget_equals_brute_force_at_every_budget_of_a_sweep():
    rng = np.random.default_rng(0)
    solvers: set[str] = set()
    for _ in range(300):
        p = small_problem(rng)
        enumerated = enumerate_maps(p)
        for metric in ("a", "b"):
            for lim in sweep_limits(p, metric, enumerated, rng):
                a = allocate(p, {metric: lim})
                check_allocation(p, a, {metric: lim}, brute(p, {metric: lim}, enumerated))
                solvers.add(a.solver)
    # The instances reach the vertex case and the exact gap closure.
    assert {"hull", "hull+dp"} <= solvers


def test_several_budgets_equal_brute_force_and_milp():
    rng = np.random.default_rng(1)
    seen_infeasible = seen_milp = 0
    for _ in range(60):
        p = small_problem(rng)
        enumerated = enumerate_maps(p)
        for _ in range(4):
            metrics = list(rng.choice(["a", "b", "c"], size=int(rng.integers(2, 4)), replace=False))
            limits = {m: float(rng.uniform(p.smallest(m), cost_range(p, m)[1] + 0.5)) for m in metrics}
            best = brute(p, limits, enumerated)
            if best is None:
                seen_infeasible += 1
                with pytest.raises(InfeasibleBudgetError) as info:
                    allocate(p, limits)
                assert info.value.field in limits
                assert "together" in info.value.message
                with pytest.raises(InfeasibleBudgetError):
                    allocate_milp(p, limits)
                continue
            a = allocate(p, limits)
            check_allocation(p, a, limits, best)
            check_allocation(p, allocate_milp(p, limits), limits, best)
            seen_milp += a.solver == "milp"
    assert seen_infeasible > 0 and seen_milp > 0


def medium_problem(rng: np.random.Generator, kind: str, n: int = 300) -> Problem:
    bits = np.array([0, 2, 3, 4, 6, 8])
    if kind == "realistic":
        n_params = rng.choice([4096 * 4096, 1024 * 4096, 4096 * 11008], n).astype(float)
        sens = np.exp(rng.normal(0, 1.5, n))
        v = sens[:, None] * 4.0 ** (-bits[None, :]) * np.exp(rng.normal(0, 0.2, (n, len(bits))))
        v[:, 0] = sens * 3  # pruning: free and costly in value
        values = list(-np.sort(-v, axis=1))
        weights = {"size_bytes": list(n_params[:, None] * bits / 8)}
    else:
        sizes = rng.integers(1, 7, n)
        values = [rng.random(k) for k in sizes]
        if kind == "ties":
            values = [np.round(v, 1) for v in values]
            weights = {"size_bytes": [rng.integers(0, 6, k).astype(float) for k in sizes]}
        else:
            weights = {"size_bytes": [rng.random(k) * 100 for k in sizes]}
    return Problem(values, weights, {"size_bytes": 1000.0})


@pytest.mark.parametrize("kind", ["realistic", "uniform", "ties"])
def test_one_budget_equals_milp_on_hundreds_of_groups(kind):
    rng = np.random.default_rng(2)
    p = medium_problem(rng, kind)
    lo, hi = cost_range(p, "size_bytes")
    for lim in np.linspace(lo, hi, 8):
        lim = float(lim)
        a = allocate(p, {"size_bytes": lim})
        m = allocate_milp(p, {"size_bytes": lim})
        assert a.exact
        assert a.costs["size_bytes"] <= lim * (1 + RTOL)
        assert math.isclose(a.objective, m.objective, rel_tol=1e-9), (kind, lim, a.solver, a.objective, m.objective)


@pytest.mark.parametrize("limit", ["work", "time"])
def test_a_cut_search_reports_a_certified_gap(monkeypatch, limit):
    """Out of work (deterministic) or time: the best allocation found, its certified bound below
    the true optimum, and the gap between them."""
    kwargs = {}
    if limit == "work":
        monkeypatch.setattr(alloc_mod, "MAX_WORK", 0)
    else:
        kwargs["time_limit"] = 1e-9
    rng = np.random.default_rng(4)
    p = medium_problem(rng, "uniform", 300)
    lo, hi = cost_range(p, "size_bytes")
    inexact = 0
    for lim in np.linspace(lo, hi, 7)[1:-1]:
        lim = float(lim)
        a = allocate(p, {"size_bytes": lim}, **kwargs)
        best = allocate_milp(p, {"size_bytes": lim}).objective
        assert a.costs["size_bytes"] <= lim * (1 + RTOL)
        assert a.lower_bound <= best * (1 + 1e-9) <= a.objective * (1 + 2e-9)
        assert a.gap == pytest.approx((a.objective - a.lower_bound) / a.objective)
        inexact += not a.exact
        if not a.exact:
            assert 0 < a.gap < 1e-3
    assert inexact > 0


@pytest.mark.parametrize("first", [1, 2])
def test_exact_search_grows_its_core_until_proven(monkeypatch, first):
    """Starting from a tiny core prefix, the search must keep growing it: stopping at the first
    prefix would miss optima that move groups further down the order."""
    monkeypatch.setattr(alloc_mod, "FIRST_CORE", first)
    rng = np.random.default_rng(10)
    for _ in range(3):
        p = medium_problem(rng, "uniform", 60)
        lo, hi = cost_range(p, "size_bytes")
        for lim in np.linspace(lo, hi, 7)[1:-1]:
            a = allocate(p, {"size_bytes": float(lim)})
            m = allocate_milp(p, {"size_bytes": float(lim)})
            assert a.exact and math.isclose(a.objective, m.objective, rel_tol=1e-9)
    rng = np.random.default_rng(11)
    for _ in range(100):
        p = small_problem(rng)
        enumerated = enumerate_maps(p)
        for lim in sweep_limits(p, "b", enumerated, rng, 6):
            check_allocation(p, allocate(p, {"b": lim}), {"b": lim}, brute(p, {"b": lim}, enumerated))


def test_milp_warm_start_is_kept_when_milp_finds_nothing_better():
    rng = np.random.default_rng(5)
    p = small_problem(rng)
    lim = float(np.mean(cost_range(p, "a")))
    best = allocate(p, {"a": lim})
    m = allocate_milp(p, {"a": lim}, warm_start=best.choices)
    assert m.objective == pytest.approx(best.objective)
    with pytest.raises(InvalidInputError) as info:
        allocate_milp(p, {"a": lim}, warm_start=np.zeros(p.n_groups + 1, dtype=int))
    assert info.value.field == "warm_start"


def test_ten_thousand_groups_get_a_certified_allocation_per_budget():
    """LLM scale: every budget answered within its limit, with a certified gap under 1e-4
    (exact where the search proves it); a second budget that does not bind costs no milp."""
    rng = np.random.default_rng(12)
    n = 10_000
    n_params = np.array([4096 * 4096] * 4 + [4096 * 11008] * 3, dtype=float)[np.arange(n) % 7]
    bits = np.array([2, 3, 4, 5, 6, 8])
    v = np.exp(rng.normal(0, 1.5, n))[:, None] * 4.0 ** -bits * np.exp(rng.normal(0, 0.15, (n, 6)))
    p = Problem(list(-np.sort(-v, axis=1)), {"size_bytes": list(n_params[:, None] * bits / 8),
                                             "avg_bits": list(n_params[:, None] * bits / n_params.sum())})
    for avg in (2.5, 3.5, 4.25, 6.0):
        lim = float(n_params.sum() * avg / 8)
        a = allocate(p, {"size_bytes": lim})
        assert a.costs["size_bytes"] <= lim * (1 + RTOL)
        assert a.lower_bound <= a.objective and a.gap < 1e-4
        both = allocate(p, {"size_bytes": lim, "avg_bits": 8.0})
        assert both.solver == "hull+relaxation" and both.objective == a.objective


# ---------------------------------------------------------------------------------------------
# Fronts and ranges
# ---------------------------------------------------------------------------------------------


def test_cost_range_is_smallest_cost_and_cost_of_unconstrained_optimum():
    rng = np.random.default_rng(6)
    for _ in range(40):
        p = small_problem(rng)
        lo, hi = cost_range(p, "b")
        _, values, totals = enumerate_maps(p)
        assert lo == pytest.approx(totals["b"].min())
        optima = np.isclose(values, values.min(), rtol=0, atol=1e-12)
        assert hi == pytest.approx(totals["b"][optima].min())


def test_front_is_monotone_and_each_point_equals_allocate():
    rng = np.random.default_rng(7)
    for kind in ("realistic", "uniform"):
        p = medium_problem(rng, kind, 400)
        pts = allocate_front(p, "size_bytes", 32)
        lo, hi = cost_range(p, "size_bytes")
        assert len(pts) == 32
        assert pts[0].limits["size_bytes"] == pytest.approx(lo) and pts[-1].limits["size_bytes"] == pytest.approx(hi)
        assert pts[-1].objective == pytest.approx(float(sum(v.min() for v in p.values)))
        for a, b in itertools.pairwise(pts):
            assert b.limits["size_bytes"] > a.limits["size_bytes"]
            assert b.objective <= a.objective * (1 + 1e-12)
        for a in pts:
            assert a.exact and a.costs["size_bytes"] <= a.limits["size_bytes"] * (1 + RTOL)
            again = allocate(p, a.limits)
            assert again.objective == pytest.approx(a.objective, rel=1e-12)
    small = small_problem(np.random.default_rng(8))
    for a in allocate_front(small, "a", 5):
        assert a.objective == pytest.approx(brute(small, a.limits))


def test_front_with_extra_limits_matches_brute_force():
    rng = np.random.default_rng(9)
    for _ in range(20):
        p = small_problem(rng)
        extra = {"b": float(np.mean(cost_range(p, "b")))}
        pts = allocate_front(p, "a", 6, extra_limits=extra)
        assert len(pts) == 6
        # The sweep starts at the smallest "a" achievable within the extra limit.
        enumerated = enumerate_maps(p)
        totals = enumerated[2]
        assert pts[0].limits["a"] == pytest.approx(totals["a"][totals["b"] <= extra["b"] * (1 + RTOL)].min())
        for a, b in itertools.pairwise(pts):
            assert b.objective <= a.objective + 1e-12
        for a in pts:
            assert a.limits["b"] == extra["b"]
            assert a.objective == pytest.approx(brute(p, a.limits, enumerated))


# ---------------------------------------------------------------------------------------------
# Infeasible budgets and bad input
# ---------------------------------------------------------------------------------------------


def test_infeasible_budget_names_the_smallest_achievable_value():
    p = Problem(
        [np.array([3.0, 1.0]), np.array([2.0, 0.5, 0.0])],
        {"size_bytes": [np.array([2.0, 4.0]), np.array([1.0, 2.0, 8.0])], "avg_bits": [np.array([2.0, 4.0]), np.array([2.0, 4.0, 8.0])]},
        {"size_bytes": 10.0},
    )
    for fn in (allocate, allocate_milp):
        with pytest.raises(InfeasibleBudgetError) as info:
            fn(p, {"size_bytes": 12.5})
        assert info.value.field == "size_bytes"
        assert info.value.smallest == pytest.approx(13.0)
        assert "13" in info.value.message
    # Exactly the smallest is feasible.
    a = allocate(p, {"size_bytes": 13.0})
    assert a.costs["size_bytes"] == 13.0 and a.objective == 5.0
    # Each budget is checked on its own first: the second one is named.
    with pytest.raises(InfeasibleBudgetError) as info:
        allocate(p, {"size_bytes": 100.0, "avg_bits": 3.0})
    assert info.value.field == "avg_bits" and info.value.smallest == pytest.approx(4.0)
    # Jointly infeasible: each alone achievable, not together.
    q = Problem(
        [np.array([0.0, 0.0])],
        {"x": [np.array([0.0, 1.0])], "y": [np.array([1.0, 0.0])]},
    )
    with pytest.raises(InfeasibleBudgetError) as info:
        allocate(q, {"x": 0.5, "y": 0.5})
    assert info.value.field == "x" and "together" in info.value.message
    assert info.value.smallest == pytest.approx(1.0)  # the smallest x within y <= 0.5


def test_unconstrained_and_infinite_limits():
    p = Problem([np.array([1.0, 0.0, 0.0]), np.array([2.0])], {"s": [np.array([0.0, 5.0, 3.0]), np.array([1.0])]})
    for limits in ({}, {"s": math.inf}):
        a = allocate(p, limits)
        assert a.exact and a.objective == 2.0 and list(a.choices) == [2, 0]
    assert cost_range(p, "s") == (1.0, 4.0)


def test_single_option_groups_and_zero_costs():
    p = Problem([np.array([5.0]), np.array([1.0, 0.0]), np.array([0.0])],
                {"s": [np.array([0.0]), np.array([0.0, 0.0]), np.array([0.0])]})
    a = allocate(p, {"s": 0.0})
    assert a.objective == 5.0 and a.exact and list(a.choices) == [0, 1, 0]
    front = allocate_front(p, "s", 3)
    assert [f.objective for f in front] == [5.0, 5.0, 5.0]


@pytest.mark.parametrize(
    "build, field",
    [
        (lambda: Problem([], {}), "values"),
        (lambda: Problem([np.array([])], {}), "values"),
        (lambda: Problem([np.array([1.0, -1.0])], {}), "values"),
        (lambda: Problem([np.array([1.0, np.nan])], {}), "values"),
        (lambda: Problem([np.array([[1.0]])], {}), "values"),
        (lambda: Problem([np.array([1.0, 2.0])], {"s": [np.array([1.0])]}), "weights"),
        (lambda: Problem([np.array([1.0])], {"s": []}), "weights"),
        (lambda: Problem([np.array([1.0])], {"s": [np.array([np.inf])]}), "weights"),
        (lambda: Problem([np.array([1.0])], {"s": [np.array([1.0])]}, {"t": 1.0}), "offsets"),
        (lambda: Problem([np.array([1.0])], {"s": [np.array([1.0])]}, {"s": math.nan}), "offsets"),
        (lambda: Problem([np.array([1.0])], {}, names=["a", "b"]), "names"),
    ],
)
def test_bad_problems_name_the_field(build, field):
    with pytest.raises(InvalidInputError) as info:
        build()
    assert info.value.field == field


def test_bad_limits_and_arguments_name_the_field():
    p = Problem([np.array([1.0, 0.0])], {"s": [np.array([0.0, 1.0])]}, names=["layer.0"])
    with pytest.raises(InvalidInputError) as info:
        allocate(p, {"latency_ms": 1.0})
    assert info.value.field == "limits"
    with pytest.raises(InvalidInputError) as info:
        allocate(p, {"s": math.nan})
    assert info.value.field == "s"
    with pytest.raises(InvalidInputError) as info:
        allocate(p, {"s": 1.0}, time_limit=0)
    assert info.value.field == "time_limit"
    with pytest.raises(InvalidInputError) as info:
        allocate_front(p, "s", 1)
    assert info.value.field == "n_points"
    with pytest.raises(InvalidInputError) as info:
        allocate_front(p, "s", 4, extra_limits={"s": 1.0})
    assert info.value.field == "extra_limits"
    with pytest.raises(InvalidInputError) as info:
        cost_range(p, "bops")
    assert info.value.field == "metric"
    with pytest.raises(InvalidInputError, match="layer.0"):
        Problem([np.array([1.0, -1.0])], {}, names=["layer.0"])


def test_geometric_front_spacing_is_denser_at_the_cheap_end_and_keeps_the_ends():
    from search.allocate import Problem, allocate, allocate_front, cost_range

    rng = np.random.default_rng(5)
    values = [np.sort(rng.random(4))[::-1].copy() for _ in range(12)]
    weights = {"size_bytes": [np.array([1.0, 2.0, 4.0, 8.0]) * (g + 1) for g in range(12)]}
    problem = Problem(values=values, weights=weights)
    lo, hi = cost_range(problem, "size_bytes")
    front = allocate_front(problem, "size_bytes", 6, spacing="geometric")
    lims = [a.limits["size_bytes"] for a in front]
    assert lims[0] == pytest.approx(lo) and lims[-1] == pytest.approx(hi)
    gaps = np.diff(lims)
    assert np.all(gaps[1:] > gaps[:-1])  # growing steps: denser where maps are cheap
    for a in front:
        assert a.objective == pytest.approx(allocate(problem, a.limits).objective, rel=1e-12, abs=1e-12)
    with pytest.raises(InvalidInputError):
        allocate_front(problem, "size_bytes", 6, spacing="log")


def test_front_bounds_narrow_the_swept_range():
    from search.allocate import Problem, allocate_front, cost_range

    rng = np.random.default_rng(6)
    values = [np.sort(rng.random(4))[::-1].copy() for _ in range(10)]
    weights = {"size_bytes": [np.array([0.0, 2.0, 4.0, 8.0]) * (g + 1) for g in range(10)]}
    problem = Problem(values=values, weights=weights)
    lo, hi = cost_range(problem, "size_bytes")
    mid = (lo + hi) / 3
    low = [a.limits["size_bytes"] for a in allocate_front(problem, "size_bytes", 4, bounds=(None, mid))]
    high = [a.limits["size_bytes"] for a in allocate_front(problem, "size_bytes", 4, spacing="geometric",
                                                           bounds=(mid, None))]
    assert low[0] == pytest.approx(lo) and low[-1] == pytest.approx(mid)
    assert high[0] == pytest.approx(mid) and high[-1] == pytest.approx(hi)
    # bounds outside the range are clipped to it
    wide = [a.limits["size_bytes"] for a in allocate_front(problem, "size_bytes", 3, bounds=(lo - 5, hi + 5))]
    assert wide[0] == pytest.approx(lo) and wide[-1] == pytest.approx(hi)
