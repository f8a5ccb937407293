"""W/A points (``4a8``) taken away and brought back: the native artifact carries the activation
rounding (per token, static ranges, learned steps of a refined point), and ``load_artifact`` /
``apply_precision_map`` put it back, so the reloaded model measures exactly what the search did."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

from search.errors import InvalidInputError
from search.export.activations import ActivationSteps, install_activation_hooks, remove_activation_hooks
from search.export.apply import apply_precision_map
from search.export.artifact import artifact_info, export_artifact, load_artifact
from search.local import DataOptions, prepare
from search.pipeline import SearchOptions
from search.space import PrecisionMap
from search.tasks import evaluate, load_model
from tests.tiny import build_model, sentiment_rows, train_classifier, write_jsonl


@pytest.fixture(scope="module")
def setup(tiny_root):
    folder = build_model(tiny_root / "act-export-bert", "bert", layers=2, hidden=16, heads=2, intermediate=32)
    folder = train_classifier(folder, sentiment_rows(200, seed=5), steps=30, lr=1e-2)
    data = write_jsonl(tiny_root / "act-export.jsonl", sentiment_rows(48, seed=6))
    return folder, data


def _search(folder, data, granularity="layer", scales="dynamic", bits=(4, 8), act=(8,)):
    opts = SearchOptions(methods=("kl",), granularity=granularity, bits=bits, activation_bits=act,
                         act_scales=scales, ffn_block_size=16, front_points=4)
    return prepare(folder, DataOptions(source=str(data), label_field="label", calibration=16, evaluation=16,
                                       max_length=12, batch_size=8), opts)


def _fresh(folder):
    return load_model(folder, "sequence_classification", num_labels=2).model.eval()


def _measure(model, search):
    with torch.no_grad():
        return evaluate(model, search.evaluation, search.task, reference=search.reference())


def _mixed_map(space):
    """A map with weight-only and W/A options: every other group at 4a8, the rest at 8."""
    return PrecisionMap({g.name: ("4a8" if i % 2 == 0 else "8a8") for i, g in enumerate(space.groups)})


@pytest.mark.parametrize(("granularity", "scales"), [("layer", "dynamic"), ("group", "dynamic"), ("layer", "static"),
                                                     ("group", "static")])
def test_export_load_evaluate_equals_the_search_evaluation(setup, tmp_path, granularity, scales):
    folder, data = setup
    search = _search(folder, data, granularity, scales)
    pmap = _mixed_map(search.space)
    want = search.evaluate(pmap)
    weights_only = search.evaluate(PrecisionMap({k: v.weight_only for k, v in pmap.items()}))
    assert want != weights_only  # the activations matter in this model
    path = export_artifact(search.model, search.space, pmap, tmp_path / "art", clip=search.options.clip,
                           act_static=search.act_static)
    info = artifact_info(path)
    assert bool(info.activations) == (scales == "static")
    if scales == "static":
        assert info.activations.amax == search.act_static.to_dict()
    model = load_artifact(path, _fresh(folder))
    assert _measure(model, search) == want
    # loading again onto the same model replaces the hooks (the inputs are not rounded twice)
    load_artifact(path, model)
    assert _measure(model, search) == want
    remove_activation_hooks(model)
    assert _measure(model, search) == weights_only
    # bitscout.apply of the artifact directory: the map, its space and its activation scales
    applied = apply_precision_map(_fresh(folder), tmp_path / "art")
    assert _measure(applied, search) == want
    # packed in memory (what bitscout.apply does by default): the hooks move with the packed modules
    assert _measure(load_artifact(path, _fresh(folder), materialize=False), search) == want
    def from_map(**kw):
        return _measure(apply_precision_map(_fresh(folder), pmap, space=search.space, clip=search.options.clip, **kw),
                        search)

    assert from_map(materialize=False) == from_map()


def test_group_wise_weight_scales_with_activations_end_to_end(setup, tmp_path):
    """``4g8a8``: a scale per 8 input columns of each row and 8-bit inputs, searched, exported and
    reloaded to the search's metrics."""
    folder, data = setup
    search = _search(folder, data, "layer", bits=("4g8", "4g8a8", "8a8"), act=())
    keys = {o.key() for row in search.space.options for o in row}
    assert "4g8a8" in keys and "8a8" in keys
    table = search.sensitivity("kl")
    assert all(row["4g8a8"] > 0 for row in table.scores.values())
    pmap = search.space.uniform("4g8a8")
    opt = next(iter(pmap.values()))
    assert (opt.bits, opt.group_size, opt.act_bits) == (4, 8, 8)
    want = search.evaluate(pmap)
    weights_only = PrecisionMap({k: v.weight_only for k, v in pmap.items()})
    # both at 4 x 8 bits (a weight-only option counts the cost model's 8-bit activations) ...
    assert search.cost_model.cost(pmap).bops == search.cost_model.cost(weights_only).bops
    assert want != search.evaluate(weights_only)  # ... but only one rounds the inputs
    path = export_artifact(search.model, search.space, pmap, tmp_path / "g", clip=search.options.clip)
    with safe_open(str(path), "pt") as f:
        name = search.space.groups[0].name
        assert f.get_tensor(f"quant::{name}::0::scale").shape[-1] == search.space.groups[0].members[0].shape[1] // 8
    assert _measure(load_artifact(path, _fresh(folder)), search) == want


def test_a_refined_w4a8_point_reloads_to_its_refined_metrics(setup, tmp_path):
    from search.refine import RefineConfig, refine

    folder, data = setup
    search = _search(folder, data, "layer", bits=(4,))
    pmap = search.space.uniform("4a8")
    res = refine(search, pmap, config=RefineConfig(steps=4, patience=None, eval_every=2))
    steps = {n: float(p.detach()) for n, p in res.model.named_parameters() if n.endswith("act_step")}
    assert steps and all(v > 0 for v in steps.values())
    path = export_artifact(res.model, search.space, pmap, tmp_path / "r", clip=search.options.clip,
                           qparams=res.qparams)
    info = artifact_info(path)
    assert set(info.activations.steps) == {n.removesuffix(".act_step") for n in steps}
    with safe_open(str(path), "pt") as f:
        assert not [k for k in f.keys() if k.endswith("act_step")]  # metadata, not parameters
    model = load_artifact(path, _fresh(folder))
    assert _measure(model, search) == res.metrics


def test_bad_activation_metadata_is_refused_naming_the_field(setup):
    with pytest.raises(InvalidInputError) as e:
        ActivationSteps.from_dict({"steps": {"a": -1.0}})
    assert e.value.field == "artifact"
    with pytest.raises(InvalidInputError) as e:
        ActivationSteps.from_dict({"scales": {}})
    assert e.value.field == "artifact"
    folder, data = setup
    search = _search(folder, data, "layer", "static")
    pmap = _mixed_map(search.space)
    with pytest.raises(InvalidInputError) as e:  # static ranges that lack an input the map rounds
        install_activation_hooks(_fresh(folder), search.space, pmap, ActivationSteps(amax={"nothing": 1.0}))
    assert e.value.field == "artifact"
    assert json.loads(json.dumps(ActivationSteps({"m": 0.1}, {"k": 2.5}).to_dict())) == {"steps": {"m": 0.1}, "amax": {"k": 2.5}}


def test_bitscout_search_then_export_of_a_static_w4a8_point_reloads_to_its_metrics(setup, tmp_path, capsys):
    """The command-line path: ``bitscout search --act-bits 8 --act-scales static --method fisher``,
    then ``bitscout export`` of a front point with activation widths; the reloaded model measures the
    point's metrics on the search's evaluation rows."""
    from search.cli import search_main
    from search.export_cli import export_main
    from search.result import SearchResult
    from search.tasks import reference_outputs

    folder, data = setup
    out = tmp_path / "result.json"
    rc = search_main([
        "--model", str(folder), "--data", str(data), "--label-field", "label", "--method", "fisher",
        "--bits", "4,8", "--act-bits", "8", "--act-scales", "static", "--calibration", "16", "--evaluation", "16",
        "--max-length", "12", "--front-points", "4", "--out", str(out), "--quiet",
    ])  # fmt: skip
    assert rc == 0
    result = SearchResult.from_json(out)
    assert result.info["act_scales"] == "static" and result.info["act_static"]
    where = next(i for i, p in enumerate(result.front) if any(o.act_bits == 8 and o.bits == 4
                                                              for o in p.precision_map.values()))
    art = tmp_path / "art"
    assert export_main([str(out), "--point", str(where), "--out", str(art)]) == 0
    capsys.readouterr()
    assert artifact_info(art).activations.amax == result.info["act_static"]
    model = load_artifact(art, _fresh(folder))
    lm = load_model(folder, "sequence_classification", num_labels=2)
    # the search's evaluation rows, split from the data as the command split them
    search = _search(folder, data, "layer", "static")
    ref = reference_outputs(lm.model, search.evaluation, "sequence_classification")
    with torch.no_grad():
        got = evaluate(model, search.evaluation, "sequence_classification", reference=ref)
    assert got == result.front[where].metrics
