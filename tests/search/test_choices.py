"""The evaluation rows choose nothing: the recommended point, NSGA-II's maps and the points to
refine are chosen on the calibration proxy (:meth:`search.pipeline.Search.calibration_proxy`), and
the quantized weight cache (:class:`search.adapter.WeightCache`) changes no measurement.

Each test runs the same search twice, once with its evaluation rows' labels flipped (and, for the
proxy's exact answer, compares with a direct measurement): a choice made on the evaluation rows
would follow the flipped labels."""

from __future__ import annotations

import pytest
import torch

from search.data import TokenizedBatch
from search.result import Budget


def _data(sentiment_file, **kw):
    from search.local import DataOptions

    base = dict(source=str(sentiment_file), label_field="label", calibration=16, evaluation=32, max_length=16,
                batch_size=8)
    base.update(kw)
    return DataOptions(**base)


def _flipped(batches: list[TokenizedBatch]) -> list[TokenizedBatch]:
    return [TokenizedBatch(b.input_ids, b.attention_mask, 1 - b.labels) for b in batches]


def _run(trained_bert, sentiment_file, opts, *, flip: bool):
    from search.local import prepare

    search = prepare(trained_bert, _data(sentiment_file), opts, device="cpu")
    if flip:
        search.evaluation = _flipped(search.evaluation)
    return search, search.run()


def _direct_best(search, result) -> set:
    """The maps that meet the budget with the lowest calibration discrepancy, measured directly
    (a fresh measurement, without the weight cache)."""
    search.weight_cache = None
    feasible = list(dict.fromkeys(p.precision_map for p in result.points
                                  if not p.refined and search.options.budget.is_feasible(p.cost)))
    values = dict(zip(feasible, search.calibration_proxy(feasible), strict=True))
    best = min(values.values())
    return {m for m, v in values.items() if v <= best * (1 + 1e-12)}


@pytest.mark.parametrize("loop", [True, False])
def test_the_recommended_point_is_chosen_on_the_calibration_proxy(trained_bert, sentiment_file, loop):
    from search.pipeline import SearchOptions

    opts = SearchOptions(methods=("kl",), bits=(2, 4, 8), front_points=5, budget=Budget(max_avg_bits=4.0),
                         loop={"enabled": loop, "rounds": 1, "local_steps": 4, "extra_points": 1})
    search, plain = _run(trained_bert, sentiment_file, opts, flip=False)
    _, flipped = _run(trained_bert, sentiment_file, opts, flip=True)
    rec, rec_f = plain.info["recommended"], flipped.info["recommended"]
    assert rec is not None and rec_f is not None
    # the flipped labels changed what the evaluation reports ...
    acc = [p.metrics["accuracy"] for p in plain.points]
    acc_f = [p.metrics["accuracy"] for p in flipped.points]
    assert all(abs(a + b - 1.0) < 1e-9 for a, b in zip(acc, acc_f, strict=True))
    # ... and nothing of what the search chose
    assert [p.precision_map for p in plain.points] == [p.precision_map for p in flipped.points]
    assert plain.points[rec].precision_map == flipped.points[rec_f].precision_map
    # the recommended map is the direct answer: the lowest calibration discrepancy within the budget
    assert plain.points[rec].precision_map in _direct_best(search, plain)
    assert search.options.budget.is_feasible(plain.points[rec].cost)
    assert plain.info["proxy"]["measured"] >= 1


def test_nsga2_chooses_on_the_calibration_proxy_not_the_evaluation_rows(trained_bert, sentiment_file):
    from search.nsga2 import PROXY_METRIC
    from search.pipeline import SearchOptions

    opts = SearchOptions(methods=("nsga2",), bits=(2, 4, 8), include=("*.layer.0.*",), budget=Budget(max_avg_bits=6.0),
                         uniform_baselines=(4, 8), front_points=4,
                         method_options={"nsga2": {"n_evaluations": 10, "population_size": 4}})
    search, plain = _run(trained_bert, sentiment_file, opts, flip=False)
    _, flipped = _run(trained_bert, sentiment_file, opts, flip=True)
    maps = [p.precision_map for p in plain.points if p.method == "nsga2"]
    assert maps and maps == [p.precision_map for p in flipped.points if p.method == "nsga2"]
    assert search.nsga2_info["evaluated"] == 10
    # NSGA-II's maps are the non-dominated ones in (size, calibration discrepancy) among those it
    # measured, each with its discrepancy as measured directly
    nsga = [p for p in plain.points if p.method == "nsga2"]
    search.weight_cache = None
    direct = search.calibration_proxy([p.precision_map for p in nsga])
    assert [p.provenance["proxy"] for p in nsga] == pytest.approx(direct, rel=1e-9, abs=1e-12)
    front = [p for p in nsga if p.label != "budget"]
    for p in front:
        assert not any(q.cost.size_bytes <= p.cost.size_bytes and q.provenance["proxy"] < p.provenance["proxy"]
                       for q in front if q is not p)
    assert all(PROXY_METRIC not in p.metrics and "accuracy" in p.metrics for p in nsga)


def test_the_points_to_refine_are_chosen_on_the_calibration_proxy(trained_bert, sentiment_file):
    from dataclasses import replace

    from search.local import prepare
    from search.orchestration import SearchHooks, refine_choice
    from search.pipeline import RefineChoice, SearchOptions

    opts = SearchOptions(methods=("kl",), bits=(2, 4, 8), front_points=5, budget=Budget(max_avg_bits=4.0),
                         loop={"rounds": 1, "local_steps": 4, "extra_points": 1}, refine=RefineChoice(points=2, steps=1))
    chosen = []
    for flip in (False, True):
        search = prepare(trained_bert, _data(sentiment_file), replace(opts, refine=None), device="cpu")
        if flip:
            search.evaluation = _flipped(search.evaluation)
        result = search.run()
        search.options = opts
        chosen.append([result.points[i].precision_map for i in refine_choice(search, result, SearchHooks())])
        ranked = sorted((p for p in result.points if p.method != "uniform" and opts.budget.is_feasible(p.cost)),
                        key=lambda p: (p.provenance["proxy"], p.cost.size_bytes))
        assert chosen[-1][0] == ranked[0].precision_map
        assert len(set(chosen[-1])) == len(chosen[-1]) == min(2, len({p.precision_map for p in ranked}))
    assert chosen[0] == chosen[1]


def test_the_weight_cache_changes_no_measurement_and_a_measurement_after_the_table_quantizes_nothing(
    trained_bert, sentiment_file
):
    from search.local import prepare
    from search.pipeline import SearchOptions

    opts = SearchOptions(methods=("kl",), bits=(2, 4, 8), front_points=4)
    search = prepare(trained_bert, _data(sentiment_file), opts, device="cpu")
    search.sensitivity("kl")
    cache = search.weight_cache
    assert cache.blocks and cache.misses == len(cache.blocks)  # every (member, option) quantized once
    maps = [search.space.uniform(o) for o in search.space.options[0]]
    maps.append(search.space.from_choices([i % len(o) for i, o in enumerate(search.space.options)]))
    misses = cache.misses
    cached = search.calibration_proxy(maps)
    assert cache.misses == misses and cache.hits > 0  # the table's blocks served every map
    search.weight_cache = None
    fresh = search.calibration_proxy(maps)
    assert cached == fresh  # bit for bit
    # the model's weights are the originals again after every measurement
    again = prepare(trained_bert, _data(sentiment_file), opts, device="cpu")
    for (n, p), (_, q) in zip(search.model.state_dict().items(), again.model.state_dict().items(), strict=True):
        assert torch.equal(p, q), n


def test_a_full_weight_cache_keeps_nothing_more_and_measures_the_same(trained_bert, sentiment_file):
    from search.adapter import WeightCache
    from search.local import prepare
    from search.pipeline import SearchOptions

    opts = SearchOptions(methods=("kl",), bits=(2, 4, 8), front_points=4)
    search = prepare(trained_bert, _data(sentiment_file), opts, device="cpu")
    maps = [search.space.uniform(o) for o in search.space.options[0]]
    search.weight_cache = WeightCache(limit_bytes=0)
    assert search.calibration_proxy(maps) == search.calibration_proxy(maps)
    assert not search.weight_cache.blocks and search.weight_cache.bytes == 0 and search.weight_cache.hits == 0
    import pickle

    search.weight_cache = WeightCache()
    search.calibration_proxy(maps)
    assert search.weight_cache.blocks
    shipped = pickle.loads(pickle.dumps(search.weight_cache))
    assert not shipped.blocks and shipped.limit_bytes == search.weight_cache.limit_bytes
