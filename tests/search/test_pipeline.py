"""The whole search on real tiny models: end to end, against the exhaustive front, and bad input."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest

from search.errors import DataError, InfeasibleBudgetError, InvalidInputError, ModelLoadError
from search.local import DataOptions, prepare, run_local
from search.pareto import hypervolume_2d, pareto_mask
from search.pipeline import SearchOptions
from search.plan import resolve
from search.result import Budget, SearchResult
from tests.tiny import build_model, sentiment_rows, write_jsonl

FAMILIES = [
    ("bert", "sequence_classification"),
    ("roberta", "sequence_classification"),
    ("distilbert", "sequence_classification"),
    ("llama", "causal_lm"),
    ("gpt2", "causal_lm"),
    ("bert", "embeddings"),
]


def _data(sentiment_file, **kw):
    base = dict(source=str(sentiment_file), label_field="label", calibration=16, evaluation=32, max_length=16, batch_size=16)
    base.update(kw)
    return DataOptions(**base)


@pytest.mark.parametrize("arch,task", FAMILIES, ids=[f"{a}-{t}" for a, t in FAMILIES])
def test_end_to_end_every_family(tmp_path, sentiment_file, arch, task):
    folder = build_model(tmp_path / arch, arch, task=task)
    label = "label" if task == "sequence_classification" else None
    opts = SearchOptions(methods=("kl",), granularity="group", bits=(0, 2, 4, 8), front_points=4, ffn_block_size=32)
    result = run_local(folder, _data(sentiment_file, label_field=label), opts, task=task, device="cpu")
    assert result.front and result.points
    methods = {p.method for p in result.points}
    assert {"kl", "uniform"} <= methods
    metric = {"sequence_classification": "accuracy", "causal_lm": "perplexity", "embeddings": "cosine"}[task]
    assert result.metric == metric
    assert all(metric in p.metrics for p in result.points)
    sizes = [p.cost.size_bytes for p in result.front]
    assert sizes == sorted(sizes)
    again = SearchResult.from_json(result.to_json())
    assert again.to_dict() == json.loads(result.to_json())
    assert result.info["task"] == task and result.info["model_path"]


def test_kl_front_reaches_95_percent_of_the_exhaustive_hypervolume(tmp_path, trained_bert, sentiment_file):
    # 5 groups x {2, 4, 8, 32}: every one of the 4^5 maps is evaluated
    opts = SearchOptions(
        methods=("kl",), granularity="layer", bits=(2, 4, 8), front_points=24, metric="kl",
        include=("*.layer.0.*",), exclude=("*.output.dense",), uniform_baselines=(),
    )
    search = prepare(trained_bert, _data(sentiment_file, calibration=64, evaluation=64), opts, device="cpu")
    assert len(search.space.groups) == 4 or len(search.space.groups) == 5
    result = search.run()
    space = search.space
    all_maps = [space.from_choices(c) for c in itertools.product(*[range(len(o)) for o in space.options])]
    exhaustive = np.array([[search.cost_model.cost(m).size_bytes, search.evaluate(m)["kl"]] for m in all_maps])
    ref = (exhaustive[:, 0].max() * 1.01, exhaustive[:, 1].max() * 1.01 + 1e-12)
    hv_all = hypervolume_2d(exhaustive[pareto_mask(exhaustive, (True, True))], ref)
    found = np.array([[p.cost.size_bytes, p.metrics["kl"]] for p in result.points if p.method == "kl"])
    hv_kl = hypervolume_2d(found, ref)
    assert hv_all > 0
    assert hv_kl / hv_all >= 0.95, (hv_kl, hv_all)


def test_resolve_from_stored_tables_matches_the_search(tmp_path, trained_bert, sentiment_file):
    opts = SearchOptions(methods=("kl",), budget=Budget(max_avg_bits=5.0), front_points=4)
    search = prepare(trained_bert, _data(sentiment_file), opts, device="cpu")
    table = search.sensitivity("kl")
    cand = search.candidates(table)[0]
    assert cand.label == "budget"
    stored = json.loads(json.dumps(search.space_dict()))
    answer = resolve(stored, json.loads(json.dumps(table.to_dict())), {"max_avg_bits": 5.0})
    assert answer["precision_map"] == cand.precision_map.to_dict()
    assert answer["cost"]["avg_bits"] <= 5.0 + 1e-9
    assert answer["exact"] is True
    with pytest.raises(InfeasibleBudgetError) as e:
        resolve(stored, table.to_dict(), {"max_avg_bits": 1.0})
    assert e.value.field == "max_avg_bits" and e.value.smallest == pytest.approx(2.0)


def test_bad_input_fails_fast_with_the_field(tmp_path, trained_bert, sentiment_file):
    opts = SearchOptions()
    not_model = tmp_path / "empty"
    not_model.mkdir()
    with pytest.raises(ModelLoadError) as e:
        prepare(not_model, _data(sentiment_file), opts, task="sequence_classification", device="cpu")
    assert "config.json" in str(e.value) and e.value.field == "model"
    bad_rows = write_jsonl(tmp_path / "bad.jsonl", [{"txt": "x", "label": "a"}] * 5)
    with pytest.raises(DataError) as e:
        prepare(trained_bert, _data(bad_rows), opts, device="cpu")
    assert "text" in str(e.value)
    with pytest.raises(DataError) as e:
        prepare(trained_bert, _data(write_jsonl(tmp_path / "few.jsonl", sentiment_rows(10))), opts, device="cpu")
    assert "not enough rows" in str(e.value)
    with pytest.raises(InvalidInputError) as e:
        prepare(trained_bert, _data(sentiment_file), SearchOptions(bits=(7,)), device="cpu")
    assert e.value.field == "bits"
    with pytest.raises(InfeasibleBudgetError) as e:
        prepare(trained_bert, _data(sentiment_file), SearchOptions(budget=Budget(max_size_mb=0.001)), device="cpu")
    assert e.value.field == "max_size_mb" and e.value.smallest > 0.001
    assert "smallest achievable size" in str(e.value)
    with pytest.raises(InvalidInputError) as e:
        prepare(trained_bert, _data(sentiment_file), SearchOptions(include=("nope.*",)), device="cpu")
    assert e.value.field == "include"
    with pytest.raises(InvalidInputError) as e:
        prepare(trained_bert, _data(sentiment_file), SearchOptions(methods=("magic",)), device="cpu")
    assert e.value.field == "methods"


def test_a_selection_that_leaves_nothing_is_refused_before_any_model_is_loaded():
    for include, exclude, field in [
        (None, ("*",), "exclude"),
        (None, ("*.query", "?*"), "exclude"),
        (("*.query",), ("*.query",), "exclude"),
        (("*.[qk",), None, "include"),
        (None, ("*. dense",), "exclude"),
    ]:
        with pytest.raises(InvalidInputError) as e:
            SearchOptions(include=include, exclude=exclude)
        assert e.value.field == field, (include, exclude)
    SearchOptions(include=("*.[qk]*",), exclude=("*.0.*",))  # can match


def test_group_front_at_least_as_good_as_layer_front(trained_bert, sentiment_file):
    data = _data(sentiment_file, calibration=48, evaluation=64)
    fronts = {}
    for gran in ("layer", "group"):
        opts = SearchOptions(methods=("kl",), granularity=gran, bits=(0, 2, 3, 4, 8), front_points=16, metric="kl",
                             ffn_block_size=16, uniform_baselines=())
        result = prepare(trained_bert, data, opts, device="cpu").run()
        fronts[gran] = np.array([[p.cost.size_bytes, p.metrics["kl"]] for p in result.points])
    allpts = np.vstack(list(fronts.values()))
    ref = (allpts[:, 0].max() * 1.01, allpts[:, 1].max() * 1.01 + 1e-12)
    hv = {k: hypervolume_2d(v, ref) for k, v in fronts.items()}
    assert hv["group"] >= 0.98 * hv["layer"], hv


def test_evaluate_before_anything_else_measures_against_full_precision(trained_bert, sentiment_file):
    search = prepare(trained_bert, _data(sentiment_file), SearchOptions(), device="cpu")
    m = search.evaluate(search.space.uniform(2))  # first call: the reference must still be full precision
    assert m["kl"] > 0
    assert search.evaluate(search.space.full_precision())["kl"] == pytest.approx(0.0, abs=1e-12)


def test_a_sweep_with_pruning_spends_most_points_above_the_narrowest_grid(trained_bert, sentiment_file):
    """With 0 bits allowed the cheapest maps prune almost everything: the sweep gives that end a
    quarter of its points and the rest to the range from every group at 2 bits up."""
    from search.plan import _narrowest_cost, build_problem, candidates_from_table
    from search.result import SensitivityTable

    opts = SearchOptions(methods=("kl",), granularity="group", bits=(0, 2, 4, 8), front_points=12,
                         ffn_block_size=8)
    s = prepare(trained_bert, _data(sentiment_file), opts, device="cpu")
    rng = np.random.default_rng(0)
    scores = {}
    for g, gopts in zip(s.space.groups, s.space.options, strict=True):
        base = rng.random() + 0.1
        scores[g.name] = {o.key(): (0.0 if o.bits == 32 else base * 4.0 ** (-o.bits / 2) * (3 if o.bits == 0 else 1))
                          for o in gopts}
    table = SensitivityTable(method="kl", scores=scores, samples=1, errors={}, extra={})
    problem, _ = build_problem(s.space, s.cost_model, table)
    narrow = _narrowest_cost(s.space, problem, "avg_bits")
    assert narrow == pytest.approx(2.0)
    cands = candidates_from_table(s.space, s.cost_model, table, Budget(max_avg_bits=8), n_points=12)
    bits = [s.cost_model.cost(c.precision_map).avg_bits for c in cands]
    below = [b for b in bits if b < narrow - 1e-9]
    assert below and min(bits) < 0.5  # the pruned end is still swept
    assert len(below) <= 3, sorted(bits)  # a quarter of the points; a geometric sweep from ~0 spends half there
    assert len(bits) - len(below) >= 8, sorted(bits)
