"""NSGA-II (search/nsga2.py): on a synthetic problem with a cheap evaluate_many, and as the
``nsga2`` method of a real search on a tiny model."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from search.cost import CostModel
from search.errors import CanceledError, InvalidInputError
from search.nsga2 import default_population_size, run_nsga2
from search.pareto import hypervolume_2d, pareto_mask
from search.space import BitOption, Group, Member, PrecisionMap, SearchSpace

BITS = (2, 4, 8, 32)
WEIGHTS = (3.0, 0.2, 1.5, 0.1, 0.8, 2.5)  # how much each group's error hurts


def _space() -> SearchSpace:
    groups = []
    for i in range(len(WEIGHTS)):
        shape = (32 * (1 + i % 3), 32)
        groups.append(
            Group(name=f"layer.{i}", kind="layer", members=(Member(f"layer.{i}", shape),), block=i, parent=f"layer.{i}",
                  macs_per_token=shape[0] * shape[1])
        )
    opts = tuple(BitOption(b) for b in BITS)
    return SearchSpace(groups=tuple(groups), options=tuple(opts for _ in groups), n_blocks=len(groups))


def _quality(pmap: PrecisionMap) -> float:
    """A synthetic accuracy: each group loses w * 2^-bits (0 at 32 bits)."""
    loss = sum(w * (0.0 if pmap[f"layer.{i}"].bits == 32 else 2.0 ** -pmap[f"layer.{i}"].bits)
               for i, w in enumerate(WEIGHTS) if f"layer.{i}" in pmap)
    return 1.0 - loss / 4


class Recorder:
    def __init__(self) -> None:
        self.calls: list[list[PrecisionMap]] = []

    def __call__(self, maps: list[PrecisionMap]) -> list[dict[str, float]]:
        self.calls.append(list(maps))
        return [{"accuracy": _quality(m)} for m in maps]

    @property
    def maps(self) -> list[PrecisionMap]:
        return [m for c in self.calls for m in c]


def _hv(points: np.ndarray, ref: tuple[float, float]) -> float:
    return hypervolume_2d(points[pareto_mask(points, (True, False))], ref, (True, False))


def test_nsga2_evaluates_generations_in_batches_within_budget_and_returns_a_front():
    space = _space()
    cm = CostModel(space)
    rec = Recorder()
    res = run_nsga2(space, cm.cost, rec, metric="accuracy", higher_is_better=True, n_evaluations=48,
                    population_size=8, seed=3)
    # each generation is one call with several maps: what the workers run in parallel
    assert len(rec.calls) >= 3
    assert max(len(c) for c in rec.calls) > 1
    assert all(len(c) <= 8 for c in rec.calls)
    # the budget counts distinct maps, and no map is evaluated twice
    assert len(rec.maps) == len(set(rec.maps)) == 48 == len(res.evaluated)
    # the front is non-dominated and sorted by size
    sizes = [p.cost.size_bytes for p in res.front]
    assert sizes == sorted(sizes)
    for p in res.front:
        assert not any(
            q.cost.size_bytes <= p.cost.size_bytes and q.metrics["accuracy"] >= p.metrics["accuracy"]
            and (q.cost.size_bytes < p.cost.size_bytes or q.metrics["accuracy"] > p.metrics["accuracy"])
            for q in res.evaluated
        )
    assert res.info["population_size"] == 8


def test_nsga2_gets_close_to_the_exhaustive_front_and_beats_random_search():
    space = _space()
    cm = CostModel(space)
    all_maps = [space.from_choices(c) for c in itertools.product(range(len(BITS)), repeat=len(WEIGHTS))]
    xy = np.array([[cm.cost(m).size_bytes, _quality(m)] for m in all_maps])
    ref = (xy[:, 0].max() * 1.01, xy[:, 1].min() - 0.01)
    hv_all = _hv(xy, ref)
    budget = 120
    res = run_nsga2(space, cm.cost, Recorder(), metric="accuracy", higher_is_better=True, n_evaluations=budget, seed=0)
    found = np.array([[p.cost.size_bytes, p.metrics["accuracy"]] for p in res.evaluated])
    hv_nsga = _hv(found, ref)
    rng = np.random.default_rng(0)
    hv_random = np.mean([_hv(xy[rng.choice(len(all_maps), budget, replace=False)], ref) for _ in range(5)])
    assert hv_nsga / hv_all >= 0.95, (hv_nsga, hv_all)
    assert hv_nsga > hv_random, (hv_nsga, hv_random)


def test_nsga2_is_deterministic_for_a_seed():
    space = _space()
    cm = CostModel(space)
    a, b = Recorder(), Recorder()
    run_nsga2(space, cm.cost, a, metric="accuracy", higher_is_better=True, n_evaluations=24, seed=7)
    run_nsga2(space, cm.cost, b, metric="accuracy", higher_is_better=True, n_evaluations=24, seed=7)
    assert a.maps == b.maps


def test_nsga2_resumes_a_study_from_its_own_sqlite_storage(tmp_path):
    space = _space()
    cm = CostModel(space)
    storage = f"sqlite:///{tmp_path / 'nsga2.db'}"
    first = Recorder()
    r1 = run_nsga2(space, cm.cost, first, metric="accuracy", higher_is_better=True, n_evaluations=8,
                   population_size=4, seed=1, storage=storage, study_name="job-1")
    assert r1.resumed == 0 and len(first.maps) == 8
    second = Recorder()
    r2 = run_nsga2(space, cm.cost, second, metric="accuracy", higher_is_better=True, n_evaluations=12,
                   population_size=4, seed=1, storage=storage, study_name="job-1")
    assert r2.resumed == 8
    assert not set(second.maps) & set(first.maps)  # what was evaluated is not evaluated again
    assert len(second.maps) == 4 and len(r2.evaluated) == 12


def test_nsga2_stops_when_asked_and_checks_its_input():
    space = _space()
    cm = CostModel(space)
    calls = {"n": 0}

    def stop() -> bool:
        calls["n"] += 1
        return calls["n"] > 2

    with pytest.raises(CanceledError):
        run_nsga2(space, cm.cost, Recorder(), metric="accuracy", higher_is_better=True, n_evaluations=100,
                  population_size=4, should_stop=stop)
    with pytest.raises(InvalidInputError):
        run_nsga2(space, cm.cost, Recorder(), metric="accuracy", higher_is_better=True, n_evaluations=0)
    with pytest.raises(InvalidInputError):
        run_nsga2(space, cm.cost, Recorder(), metric="accuracy", higher_is_better=True, n_evaluations=4,
                  cost_metric="watts")


def test_nsga2_stops_when_the_space_is_exhausted():
    groups = _space().groups[:2]
    space = SearchSpace(groups=groups, options=((BitOption(4), BitOption(8)),) * 2, n_blocks=2)
    rec = Recorder()
    res = run_nsga2(space, CostModel(space).cost, rec, metric="accuracy", higher_is_better=True, n_evaluations=50)
    assert len(res.evaluated) == 4 == len(set(rec.maps))


def test_nsga2_minimises_a_lower_is_better_metric_and_skips_non_finite_values():
    space = _space()
    cm = CostModel(space)

    def evaluate_many(maps):
        out = []
        for m in maps:
            q = _quality(m)
            out.append({"kl": math.inf if q < 0.5 else 1.0 - q})
        return out

    res = run_nsga2(space, cm.cost, evaluate_many, metric="kl", higher_is_better=False, n_evaluations=24, seed=2)
    assert res.front and all(math.isfinite(p.metrics["kl"]) for p in res.front)
    kls = [p.metrics["kl"] for p in res.front]
    assert kls == sorted(kls, reverse=True)  # larger maps, lower KL


def test_default_population_size():
    assert default_population_size(16) == 8
    assert default_population_size(64) == 16
    assert default_population_size(1) == 4
    assert default_population_size(10_000) == 32


def test_nsga2_method_in_a_real_search_measures_on_the_proxy_and_evaluates_what_it_keeps_once(trained_bert, sentiment_file, monkeypatch):
    from search import methods
    from search.local import DataOptions, prepare
    from search.pipeline import Search, SearchOptions
    from search.result import Budget

    opts = SearchOptions(
        methods=("nsga2",), bits=(2, 4, 8), include=("*.layer.0.*",), budget=Budget(max_avg_bits=6.0),
        uniform_baselines=(4, 8), front_points=4, method_options={"nsga2": {"n_evaluations": 10, "population_size": 4}},
    )
    data = DataOptions(source=str(sentiment_file), label_field="label", calibration=16, evaluation=32, max_length=16)
    search = prepare(trained_bert, data, opts, device="cpu")
    assert methods.get("nsga2").kind == "proposer"
    calls = []
    real = Search.evaluate

    def counting(self, pmap, **kw):
        calls.append(pmap)
        return real(self, pmap, **kw)

    monkeypatch.setattr(Search, "evaluate", counting)
    result = search.run()
    nsga = [p for p in result.points if p.method == "nsga2"]
    assert nsga and all("accuracy" in p.metrics for p in nsga)
    assert any(p.label == "budget" for p in nsga)
    # 10 maps measured by NSGA-II on the calibration proxy; only the maps it keeps and the uniform
    # baselines are evaluated, each once
    assert search.nsga2_info["evaluated"] == 10
    assert len(calls) == len(set(calls)) == len({p.precision_map for p in result.points}) < 12
    assert all(p.provenance["proxy"] >= 0 and p.provenance["score"] == "nsga2" for p in nsga)
