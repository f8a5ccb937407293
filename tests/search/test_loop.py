"""The closed loop (search/loop.py) on synthetic proxies where the additive score model is wrong by
construction, compared with brute force over every map; and on a real tiny model through
``run_search``: provenance, the uniform guard, and the evaluation rows read only at the end."""

from __future__ import annotations

import itertools
import json
import math
import random

import pytest

from bitscout.methods import LoopOptions
from search.cost import CostModel
from search.errors import InvalidInputError
from search.loop import Proxy, close_loop
from search.plan import candidates_from_table, uniform_candidates
from search.result import Budget, SearchResult, SensitivityTable
from search.space import BitOption, Group, Member, PrecisionMap, SearchSpace

BITS = (2, 3, 4, 8)
#: the error of each group alone at each width: what a sensitivity table measures exactly
ERR = {
    "a": {2: 0.020, 3: 0.015, 4: 0.010, 8: 0.0},
    "b": {2: 0.025, 3: 0.016, 4: 0.010, 8: 0.0},
    "c": {2: 1.000, 3: 0.300, 4: 0.100, 8: 0.001},
    "d": {2: 1.000, 3: 0.500, 4: 0.300, 8: 0.001},
}


def _space() -> SearchSpace:
    groups = tuple(
        Group(name=n, kind="layer", members=(Member(n, (32, 32)),), block=i, parent=n, macs_per_token=1024)
        for i, n in enumerate(ERR)
    )
    return SearchSpace(groups=groups, options=tuple(tuple(BitOption(b) for b in BITS) for _ in groups), n_blocks=4)


def _table() -> SensitivityTable:
    return SensitivityTable("kl", {g: {str(b): e for b, e in row.items()} for g, row in ERR.items()})


def compound(m: PrecisionMap) -> float:
    """Additive, except that a and b both at 2 bits hurt far more together than apart."""
    v = sum(ERR[g][m[g].bits] for g in ERR)
    return v + (0.5 if m["a"].bits == 2 and m["b"].bits == 2 else 0.0)


def cancel(m: PrecisionMap) -> float:
    """Additive, except that c and d at 3 bits cancel most of each other's error."""
    v = sum(ERR[g][m[g].bits] for g in ERR)
    return v - (0.75 if m["c"].bits == 3 and m["d"].bits == 3 else 0.0)


def _all_maps(space: SearchSpace) -> list[PrecisionMap]:
    return [space.from_choices(c) for c in itertools.product(*[range(len(o)) for o in space.options])]


def _best_within(maps, cm: CostModel, avg_bits: float, f) -> float:
    return min(f(m) for m in maps if cm.cost(m).avg_bits <= avg_bits * (1 + 1e-9))


def _run(f, *, budget=4.0, options=LoopOptions(), table=None, floor=None):
    space = _space()
    cm = CostModel(space)
    table = table or _table()
    b = Budget(max_avg_bits=budget)
    first = candidates_from_table(space, cm, table, b, n_points=8)
    uniform = uniform_candidates(space, (8, 4, 3, 2))
    proxy = Proxy(lambda maps: [f(m) for m in maps])
    res = close_loop(space, cm, table, b, first, uniform, proxy, options, floor=floor)
    return space, cm, first, uniform, res, proxy


#: brute force over all 256 maps at <= 4 average bits: the best discrepancy and the maps reaching it
EXACT = {
    "compound": (0.337, {(2, 3, 3, 8)}),
    "cancel": (0.070, {(2, 8, 3, 3), (4, 4, 3, 3)}),
}


def _bits(m: PrecisionMap) -> tuple[int, ...]:
    return tuple(m[g].bits for g in ERR)


@pytest.mark.parametrize("f", [compound, cancel], ids=["compound", "cancel"])
def test_the_brute_force_best_maps(f):
    space = _space()
    cm = CostModel(space)
    inside = [m for m in _all_maps(space) if cm.cost(m).avg_bits <= 4.0 + 1e-9]
    best = min(f(m) for m in inside)
    value, maps = EXACT[f.__name__]
    assert best == pytest.approx(value)
    assert {_bits(m) for m in inside if f(m) <= best + 1e-12} == maps


@pytest.mark.parametrize("f", [compound, cancel], ids=["compound", "cancel"])
def test_the_loop_finds_the_best_map_the_additive_allocation_misses(f):
    space, cm, first, _, res, _ = _run(f)
    exact, best_maps = EXACT[f.__name__]
    open_loop = min(f(c.precision_map) for c in first if cm.cost(c.precision_map).avg_bits <= 4.0 + 1e-9)
    closed = min(f(c.precision_map) for c in res.candidates if cm.cost(c.precision_map).avg_bits <= 4.0 + 1e-9)
    assert open_loop > exact * 1.2  # the additive allocation misses the best map by construction
    assert closed == pytest.approx(exact)  # the loop finds it
    best = min((c for c in res.candidates if cm.cost(c.precision_map).avg_bits <= 4.0 + 1e-9),
               key=lambda c: f(c.precision_map))
    assert best.provenance["proxy"] == pytest.approx(exact)
    assert _bits(best.precision_map) in best_maps
    assert best.provenance["round"] >= 1 or best.provenance["local_search"]
    # the open loop (what the search keeps with the loop off) proposes none of the best maps
    assert not {_bits(c.precision_map) for c in first} & best_maps


def test_with_the_loop_off_nothing_is_measured_and_the_first_allocation_stays():
    # the orchestration skips close_loop when the loop is off; the open loop's best is what it keeps
    space, cm, first, _, _, _ = _run(compound)
    exact, _ = EXACT["compound"]
    assert min(compound(c.precision_map) for c in first if c.label == "budget") > exact * 1.2


def test_without_rounds_the_local_search_alone_still_finds_it():
    space, cm, _, _, res, _ = _run(compound, options=LoopOptions(rounds=0, local_steps=64, extra_points=0))
    exact = _best_within(_all_maps(space), cm, 4.0, compound)
    closed = min(compound(c.precision_map) for c in res.candidates if cm.cost(c.precision_map).avg_bits <= 4.0 + 1e-9)
    assert closed == pytest.approx(exact)
    assert res.info["local"]["improved"] >= 1
    assert any(c.provenance["local_search"] for c in res.candidates)


def _guard_holds(res, uniform, cm, proxy):
    for u in uniform:
        cu = cm.cost(u.precision_map).avg_bits
        inside = [proxy.values[c.precision_map] for c in res.candidates if cm.cost(c.precision_map).avg_bits <= cu + 1e-9]
        assert inside and min(inside) <= proxy.values[u.precision_map] + 1e-15, u.label


def test_never_worse_than_uniform_even_from_a_table_that_is_wrong():
    # a table that says the opposite of the truth and no rounds or local search to repair it:
    # the guard alone keeps every budget at least as good as its uniform map
    inverted = SensitivityTable("kl", {g: {str(b): 1.0 / (1 + e * 100) for b, e in row.items()} for g, row in ERR.items()})
    opts = LoopOptions(rounds=0, local_steps=0, extra_points=0)
    space, cm, first, uniform, res, proxy = _run(compound, table=inverted, options=opts)
    _guard_holds(res, uniform, cm, proxy)
    guarded = [c for c in res.candidates if c.provenance["guard"]]
    assert guarded and all(c.label.endswith("(guard)") for c in guarded)
    assert {c.precision_map for c in guarded} <= {u.precision_map for u in uniform}
    # without the guard's replacement, some uniform map would have beaten every map at its cost
    assert any(
        min([compound(c.precision_map) for c in first if cm.cost(c.precision_map).avg_bits <= cm.cost(u.precision_map).avg_bits
             + 1e-9] or [math.inf]) > compound(u.precision_map)
        for u in uniform
    )


@pytest.mark.parametrize("seed", range(6))
def test_never_worse_than_uniform_on_random_interactions(seed):
    rng = random.Random(seed)
    pairs = {(g, h): rng.uniform(-0.2, 0.6) for g, h in itertools.combinations(ERR, 2)}

    def f(m):
        v = sum(ERR[g][m[g].bits] * rng_scale[g] for g in ERR)
        v += sum(w for (g, h), w in pairs.items() if m[g].bits <= 3 and m[h].bits <= 3)
        return max(v, 0.0) + 1e-6

    rng_scale = {g: rng.uniform(0.5, 3.0) for g in ERR}
    _, cm, _, uniform, res, proxy = _run(f, options=LoopOptions(rounds=1, local_steps=8, extra_points=1))
    _guard_holds(res, uniform, cm, proxy)


def test_the_sweep_stops_one_map_beyond_the_noise_floor():
    space, cm, _, _, res, proxy = _run(compound, floor=0.05)
    costs = sorted((cm.cost(c.precision_map).avg_bits, proxy.values[c.precision_map]) for c in res.candidates)
    first_below = next(i for i, (_, q) in enumerate(costs) if q <= 0.05)
    assert len(costs) <= first_below + 2
    assert "noise floor" in res.info["sweep"]["stopped"]
    assert res.info["sweep"]["dropped"] >= 1
    # without a floor the whole range is swept: larger maps are proposed
    _, _, _, _, res2, _ = _run(compound, floor=None)
    assert len(res2.candidates) > len(costs)
    assert res2.info["sweep"]["avg_bits"][1] > res.info["sweep"]["avg_bits"][1]


def test_the_proxy_measures_each_map_once_and_counts_units():
    calls = []

    def measure(maps):
        calls.append(list(maps))
        return [compound(m) for m in maps]

    space = _space()
    proxy = Proxy(measure, units_per_map=3)
    m = space.uniform(BitOption(4))
    assert proxy([m, m]) == [compound(m)] * 2
    assert proxy([m]) == [compound(m)]
    assert calls == [[m]] and proxy.measured == 1 and proxy.forward_units == 3


def test_loop_options_are_validated_with_the_field_named():
    from search.pipeline import SearchOptions

    assert SearchOptions().loop.enabled is True
    assert SearchOptions(loop={"enabled": False}).loop.enabled is False
    with pytest.raises(InvalidInputError) as e:
        SearchOptions(loop={"rounds": -1})
    assert e.value.field == "loop.rounds"
    with pytest.raises(InvalidInputError) as e:
        SearchOptions(loop={"local_stepz": 3})
    assert e.value.field == "loop.local_stepz"


# ------------------------------------------------------------------------------ on a tiny model


class Recording(list):
    """A list of batches that records, in one shared log, every time it is read."""

    def __init__(self, items, name, log):
        super().__init__(items)
        self.name, self.log = name, log

    def __iter__(self):
        self.log.append(self.name)
        return super().__iter__()

    def __getitem__(self, i):
        self.log.append(self.name)
        return super().__getitem__(i)


def _data(sentiment_file, **kw):
    from search.local import DataOptions

    base = dict(source=str(sentiment_file), label_field="label", calibration=16, evaluation=32, max_length=16,
                batch_size=8)
    base.update(kw)
    return DataOptions(**base)


def test_a_search_with_the_loop_records_provenance_and_reads_evaluation_rows_last(trained_bert, sentiment_file):
    from search.local import prepare
    from search.orchestration import SearchHooks, run_search
    from search.pipeline import SearchOptions

    opts = SearchOptions(methods=("kl",), bits=(2, 4, 8), front_points=6, budget=Budget(max_avg_bits=4.0),
                         loop={"rounds": 1, "local_steps": 6, "extra_points": 1})
    search = prepare(trained_bert, _data(sentiment_file), opts, device="cpu")
    log: list[str] = []
    search.calibration = Recording(search.calibration, "calibration", log)
    search.evaluation = Recording(search.evaluation, "evaluation", log)
    events = []
    result = run_search(search, SearchHooks(on_event=lambda kind, msg, **kw: events.append(kind)))
    assert "evaluation" in log and "calibration" in log
    first_eval = log.index("evaluation")
    assert "calibration" not in log[first_eval:]  # every choice was made before any evaluation row was read
    info = result.info["loop"]
    assert info["enabled"] and info["methods"]["kl"]["proxy_evaluations"] > 0
    assert info["forward_units"] == info["proxy_evaluations"] * len(search.calibration)
    assert "loop" in events
    for p in result.points:
        assert p.provenance is not None
        if p.method == "uniform":
            assert p.provenance["reference"] is True
        else:
            assert p.provenance["score"] == "kl" and isinstance(p.provenance["round"], int)
            assert "proxy" in p.provenance
    from search.cli import format_front

    table = format_front(result)
    assert "found" in table.splitlines()[0] and "kl r" in table and "reference" in table
    data = json.loads(result.to_json())
    assert all("provenance" in p for p in data["points"])
    again = SearchResult.from_json(result.to_json())
    assert [p.provenance for p in again.points] == [p.provenance for p in result.points]
    # never worse than uniform on the calibration proxy, at every uniform map's cost
    proxy = dict(zip(
        [p.precision_map for p in result.points],
        search.calibration_proxy([p.precision_map for p in result.points]), strict=True,
    ))
    for u in (p for p in result.points if p.method == "uniform"):
        inside = [proxy[p.precision_map] for p in result.points if p.method == "kl"
                  and p.cost.avg_bits <= u.cost.avg_bits + 1e-9]
        assert inside and min(inside) <= proxy[u.precision_map] * (1 + 1e-9) + 1e-15, u.label


def test_with_the_loop_off_the_search_measures_only_the_points_within_the_budget(trained_bert, sentiment_file):
    from search.local import prepare
    from search.pipeline import SearchOptions

    opts = SearchOptions(methods=("kl",), bits=(2, 4, 8), front_points=4, loop={"enabled": False},
                         budget=Budget(max_avg_bits=3.0))
    search = prepare(trained_bert, _data(sentiment_file), opts, device="cpu")
    measured = []
    real = search.calibration_proxy
    search.calibration_proxy = lambda maps, **kw: measured.extend(maps) or real(maps, **kw)
    result = search.run()
    assert result.info["loop"] == {"enabled": False}
    # what the recommendation is chosen on, and nothing else
    inside = {p.precision_map for p in result.points if opts.budget.is_feasible(p.cost)}
    assert inside and set(measured) == inside and len(measured) == len(inside)
    assert result.info["proxy"]["measured"] == len(inside)
    assert {p.provenance["round"] for p in result.points if p.method == "kl"} == {0}
    assert not any(p.provenance.get("local_search") for p in result.points)


def test_per_row_and_group_wise_grids_of_one_width_are_corrected_apart():
    """A group-wise grid whose errors compound 4x more than the table says gets its own factor:
    with one factor per bit-width, ``3`` and ``3g16`` would share it and stay mis-ordered."""
    from search.loop import _Model

    opts = (BitOption(3), BitOption(3, group_size=16), BitOption(8))
    groups = tuple(
        Group(name=n, kind="layer", members=(Member(n, (32, 32)),), block=0, parent=n, macs_per_token=1024)
        for n in "abcd"
    )
    space = SearchSpace(groups=groups, options=tuple(opts for _ in groups), n_blocks=1)
    table = SensitivityTable("kl", {n: {"3": 1.0, "3g16": 0.5, "8": 0.01} for n in "abcd"})

    def measure(m: PrecisionMap) -> float:
        return sum({"3": 1.0, "3g16": 2.0, "8": 0.01}[m[n].key()] for n in "abcd")

    maps = [space.from_choices(c) for c in itertools.product(range(3), repeat=4)]
    model = _Model(space, table)
    assert model.fit(maps, [measure(m) for m in maps])
    fac = model.factors()["bits"]
    assert set(fac) == {"3", "3g16", "8"}
    corrected = model.corrected().scores["a"]
    # measured, 3g16 is 2x worse than 3; the table said 2x better; the correction turns the order around
    assert corrected["3g16"] > 1.5 * corrected["3"]
