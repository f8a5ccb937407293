"""The format registry and its writers: :func:`search.export.export_point` dispatches by name to one
writer per format and says what it wrote; an unknown name is refused with the field.

The compressed-tensors and dense checkpoints are reloaded with plain transformers
(``AutoModelFor*.from_pretrained``, nothing of bitscout) and compared with bitscout's evaluation of the
same map (:meth:`ModelAdapter.quantized`): every weight equal, and the logits equal bit for bit under the
attention the search evaluates with (eager). PyTorch's CPU matmul rounds differently by the memory
alignment of its operands, and transformers maps a checkpoint's tensors at their file offsets, so both
sides run on parameters copied to fresh (aligned) memory (:func:`aligned`)."""

from __future__ import annotations

import json
import re
import sys

import pytest
import torch
import transformers
from safetensors import safe_open
from torch import nn

from bitscout.formats import EXPORT_FORMATS, parse_export_format
from search.adapter import ModelAdapter
from search.cost import CostModel
from search.errors import InvalidInputError
from search.export import ARTIFACT_FILE, WRITERS, export_point, load_artifact
from search.export_cli import export_main
from search.result import ParetoPoint, SearchResult
from search.space import BitOption, Group, Member, PrecisionMap, SearchSpace, space_to_dict
from search.tasks import load_model
from tests.tiny import build_model

IDS = torch.tensor([[2, 5, 7, 9, 11, 3, 4, 8, 20, 21, 6, 30], [12, 13, 14, 15, 16, 17, 18, 19, 22, 23, 24, 25]])


@pytest.fixture(scope="module", autouse=True)
def _quiet():
    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()


def aligned(model):
    """``model`` with every parameter and buffer copied to fresh memory (the allocator aligns it)."""
    for t in [*model.parameters(), *model.buffers()]:
        t.data = t.data.clone()
    return model


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    folder = build_model(tmp_path_factory.mktemp("formats") / "model", "bert", task="sequence_classification")
    return folder, aligned(load_model(folder, "sequence_classification", num_labels=2).model)


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    folder = build_model(tmp_path_factory.mktemp("formats") / "llama", "llama", task="causal_lm", layers=2, hidden=32,
                         heads=4, intermediate=64)
    return folder, aligned(load_model(folder, "causal_lm").model)


def evaluated(model, space, pmap, *, state=None, **inputs):
    """bitscout's evaluation of the map: the logits of the model fake-quantized by the adapter (its
    state dict into ``state`` when given)."""
    with torch.no_grad(), ModelAdapter(model).quantized(pmap, space):
        if state is not None:
            state.update({k: v.clone() for k, v in model.state_dict().items()})
        return model(**inputs).logits


def reloaded(auto, out, *, state=None, **inputs):
    """The logits of the checkpoint loaded by plain transformers, with the search's attention (its state
    dict after the forward, when compressed-tensors has decompressed it, into ``state`` when given)."""
    m = aligned(auto.from_pretrained(out, attn_implementation="eager"))
    with torch.no_grad():
        logits = m(**inputs).logits
    if state is not None:
        state.update(m.state_dict())
    return logits


def same_weights(searched, loaded):
    """Every tensor of the searched model's state dict, equal in the reloaded one."""
    return [k for k, v in searched.items() if not torch.equal(loaded[k], v)]


def per_decision(space, options):
    """A mixed map: the decisions (tied sets, untied groups) take ``options`` in turn."""
    pm = {}
    for k, decision in enumerate(space.decisions):
        for gi in decision:
            pm[space.groups[gi].name] = BitOption.parse(options[k % len(options)])
    return PrecisionMap(pm)


def quantization_config(out):
    return json.loads((out / "config.json").read_text())["quantization_config"]


def stored_keys(out):
    with safe_open(out / "model.safetensors", "pt") as f:
        return {k: f.get_slice(k).get_dtype() for k in f.keys()}


# ------------------------------------------------------------------------------------------- registry


def test_native_export_point_writes_the_artifact_and_reports_its_groups(tiny, tmp_path):
    folder, model = tiny
    space = ModelAdapter(model).build_space(granularity="layer", bits=(4, 8, 16))
    names = [g.name for g in space.groups]
    pmap = PrecisionMap({n: BitOption(4 if i % 3 == 0 else 8 if i % 3 == 1 else 16) for i, n in enumerate(names)})
    report = export_point("Native", model, space, pmap, tmp_path / "out", model_dir=folder)
    assert report.format == "native" and report.path == tmp_path / "out" / ARTIFACT_FILE
    assert ARTIFACT_FILE in report.files and "precision_map.json" in report.files
    assert set(report.quantized) == {n for n, o in pmap.items() if o.bits < 16}
    assert set(report.dense) == set(names) - set(report.quantized)
    with safe_open(report.path, "pt") as f:
        assert f.metadata()["format"] == "bitscout.quant"
    load_artifact(tmp_path / "out", load_model(folder, "sequence_classification", num_labels=2).model)


def test_unknown_format_is_refused_with_the_field(tiny, tmp_path):
    _, model = tiny
    space = ModelAdapter(model).build_space(granularity="layer", bits=(4, 8))
    with pytest.raises(InvalidInputError) as err:
        export_point("onnx", model, space, PrecisionMap({}), tmp_path)
    assert err.value.field == "format" and "native" in err.value.message
    with pytest.raises(ValueError, match="format must be one of"):
        parse_export_format(4)


def test_every_format_has_a_writer():
    assert set(WRITERS) == set(EXPORT_FORMATS)


# ---------------------------------------------------------------------------------- compressed-tensors


def test_llama_with_group_scales_and_ties_reloads_in_plain_transformers_to_the_searched_logits(llama, tmp_path):
    folder, model = llama
    space = ModelAdapter(model).build_space(granularity="layer", bits=("4g32", 8, "4ag32", 16), tie=("qkv", "gate_up"))
    pmap = per_decision(space, ["4g32", "8", "4ag32", "16", "32", "4g32"])
    before = {k: v.clone() for k, v in model.state_dict().items()}
    report = export_point("compressed-tensors", model, space, pmap, tmp_path / "ct", model_dir=folder)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # the model is left as it was

    searched, loaded = {}, {}
    want = evaluated(model, space, pmap, state=searched, input_ids=IDS)
    got = reloaded(transformers.AutoModelForCausalLM, tmp_path / "ct", state=loaded, input_ids=IDS)
    assert same_weights(searched, loaded) == [] and torch.equal(got, want)
    # A load with transformers' defaults (fused attention) differs by float rounding only.
    plain = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "ct")
    with torch.no_grad():
        assert torch.allclose(plain(input_ids=IDS).logits, want, atol=1e-5, rtol=0)

    # One config group per distinct option, targets naming the modules; ties share a group.
    qc = quantization_config(tmp_path / "ct")
    assert qc["quant_method"] == "compressed-tensors" and qc["format"] == "mixed-precision"
    by_option = {}
    for name, opt in pmap.items():
        if opt.is_integer:
            by_option.setdefault(opt.key(), set()).add(name)
    groups = {}
    for cfg in qc["config_groups"].values():
        w = cfg["weights"]
        key = f"{w['num_bits']}{'' if w['symmetric'] else 'a'}" + (f"g{w['group_size']}" if w["strategy"] == "group" else "")
        assert w["strategy"] == ("group" if "g" in key else "channel")
        assert cfg["format"] == ("pack-quantized" if w["symmetric"] else "naive-quantized")
        groups[key] = set(cfg["targets"])
    assert groups == by_option
    for tie in space.ties:
        assert any(set(tie.groups) <= t for t in groups.values()) or all(not pmap[g].is_integer for g in tie.groups)
    floats = {n for n, o in pmap.items() if not o.is_integer}
    assert set(qc["ignore"]) == floats | {"lm_head"}

    keys = stored_keys(tmp_path / "ct")
    q = "model.layers.0.self_attn.q_proj"  # 4g32, symmetric: packed int32 words, a scale per 32 columns
    assert keys[f"{q}.weight_packed"] == "I32" and f"{q}.weight" not in keys and f"{q}.weight_zero_point" not in keys
    with safe_open(tmp_path / "ct" / "model.safetensors", "pt") as f:
        assert tuple(f.get_tensor(f"{q}.weight_packed").shape) == (32, 32 * 4 // 32)
        assert tuple(f.get_tensor(f"{q}.weight_scale").shape) == (32, 1)
    gate = "model.layers.0.mlp.gate_proj"  # 4ag32: int8 codes and int8 zero points
    assert keys[f"{gate}.weight"] == "I8" and keys[f"{gate}.weight_zero_point"] == "I8"

    sym = {n for n, o in pmap.items() if o.is_integer and o.symmetric}
    assert set(report.quantized) == sym
    assert set(report.no_kernel) == {n for n, o in pmap.items() if o.is_integer} - sym
    assert set(report.dense) == floats and not report.pruned and not report.warnings
    assert {"config.json", "model.safetensors", "export.json", "precision_map.json", "tokenizer.json"} <= set(report.files)
    side = json.loads((tmp_path / "ct" / "export.json").read_text())
    assert side["format"] == "compressed-tensors" and side["quantized"] == list(report.quantized)


def test_group_granularity_pruned_heads_and_mixed_modules(llama, tmp_path):
    """Heads pruned inside a quantized module are zero codes; the output projection's column blocks take
    the group strategy at the head's width; a module whose heads take different widths is written
    dense with a warning naming it; a 3-bit module is stored as integers no 4/8-bit kernel runs."""
    folder, model = llama
    space = ModelAdapter(model).build_space(granularity="group", bits=(0, 3, 4, "4a", 8), ffn_block_size=16)
    pm = {}
    for g in space.groups:
        block, index = int(g.name.split(".")[2]), int(re.search(r"(\d+)$", g.name).group(1))
        if block == 0:
            pm[g.name] = BitOption(0) if index == 1 else BitOption(4) if "head" in g.name else BitOption(8, symmetric=False)
        elif "head" in g.name:
            pm[g.name] = BitOption(4 if index % 2 else 8)
        else:
            pm[g.name] = BitOption(3)
    pmap = PrecisionMap(pm)
    report = export_point("compressed-tensors", model, space, pmap, tmp_path / "ct", model_dir=folder)
    searched, loaded = {}, {}
    want = evaluated(model, space, pmap, state=searched, input_ids=IDS)
    got = reloaded(transformers.AutoModelForCausalLM, tmp_path / "ct", state=loaded, input_ids=IDS)
    assert same_weights(searched, loaded) == [] and torch.equal(got, want)
    qc = quantization_config(tmp_path / "ct")
    o_proj = next(c for c in qc["config_groups"].values() if "model.layers.0.self_attn.o_proj" in c["targets"])
    (block,) = [m for m in space.groups[0].members if m.module.endswith("o_proj")]  # the group's columns of o_proj
    assert block.axis == "in" and o_proj["weights"]["strategy"] == "group"
    assert o_proj["weights"]["group_size"] == block.stop - block.start
    mixed = [f"model.layers.1.self_attn.{p}" for p in ("q_proj", "k_proj", "v_proj", "o_proj")]
    assert [w.split(":")[0] for w in report.warnings] == mixed
    assert all("options 4, 8 inside one module" in w for w in report.warnings)
    assert set(mixed) <= set(qc["ignore"])
    assert set(report.pruned) == {n for n, o in pmap.items() if o.pruned}
    assert set(report.quantized) == {"model.layers.0.self_attn/head0"}
    assert set(report.no_kernel) == {n for n, o in pmap.items() if o.bits == 3 or (o.bits == 8 and not o.symmetric)}
    assert set(report.dense) == {n for n in pmap if n.startswith("model.layers.1.self_attn")}


def test_column_blocks_of_different_widths_and_partial_matrices_are_written_dense(llama, tmp_path):
    """A hand-made space: o_proj of block 0 in column blocks of 8 and 24 (per-row scales on blocks of
    different widths), o_proj of block 1 with only its first 16 columns searched."""
    folder, model = llama
    o0, o1 = "model.layers.0.self_attn.o_proj", "model.layers.1.self_attn.o_proj"
    groups = [
        Group(f"{o0}/a", "head", (Member(o0, (32, 32), "in", 0, 8),), block=0, parent=o0, index=0),
        Group(f"{o0}/b", "head", (Member(o0, (32, 32), "in", 8, 32),), block=0, parent=o0, index=1),
        Group(f"{o1}/a", "head", (Member(o1, (32, 32), "in", 0, 16),), block=1, parent=o1, index=0),
        Group("model.layers.0.mlp.down_proj", "layer", (Member("model.layers.0.mlp.down_proj", (32, 64)),), block=0,
              parent="model.layers.0.mlp.down_proj"),
    ]
    opts = (BitOption(4), BitOption(32))
    space = SearchSpace(groups=tuple(groups), options=(opts,) * len(groups), granularity="group", n_blocks=2)
    pmap = PrecisionMap({g.name: BitOption(4) for g in groups})
    report = export_point("compressed-tensors", model, space, pmap, tmp_path / "ct", model_dir=folder)
    assert [w.split(":")[0] for w in report.warnings] == [o0, o1]
    assert "column blocks of different widths" in report.warnings[0] and "part of this matrix" in report.warnings[1]
    assert report.quantized == ("model.layers.0.mlp.down_proj",)
    searched, loaded = {}, {}
    want = evaluated(model, space, pmap, state=searched, input_ids=IDS)
    got = reloaded(transformers.AutoModelForCausalLM, tmp_path / "ct", state=loaded, input_ids=IDS)
    assert same_weights(searched, loaded) == [] and torch.equal(got, want)


def test_bert_classifier_reloads_in_plain_transformers(tiny, tmp_path):
    folder, model = tiny
    space = ModelAdapter(model).build_space(granularity="layer", bits=(4, "4g16", 8))
    pmap = per_decision(space, ["4", "8", "4g16", "32"])
    enc = {"input_ids": IDS, "attention_mask": torch.ones_like(IDS)}
    want = evaluated(model, space, pmap, **enc)
    reports = {}
    for fmt in ("compressed-tensors", "dense"):
        reports[fmt] = export_point(fmt, model, space, pmap, tmp_path / fmt, model_dir=folder)
        assert torch.equal(reloaded(transformers.AutoModelForSequenceClassification, tmp_path / fmt, **enc), want), fmt
    assert "classifier" in quantization_config(tmp_path / "compressed-tensors")["ignore"]
    # Searched without ties, query/key/value took different options: engines that fuse them are warned about.
    assert not reports["dense"].warnings
    fused = [f"bert.encoder.layer.{i}.attention.self.query" for i in range(2)]
    assert [w.split(",")[0] for w in reports["compressed-tensors"].warnings] == fused
    assert all("different schemes" in w and "--tie" in w for w in reports["compressed-tensors"].warnings)


def test_embeddings_and_tied_weights_are_written_dense_with_a_warning(tiny, tmp_path):
    folder, model = tiny
    adapter = ModelAdapter(model, include_embeddings=True)
    space = adapter.build_space(granularity="layer", bits=(8,))
    pmap = PrecisionMap({g.name: BitOption(8) for g in space.groups})
    embeddings = [n for n in adapter.matrices if adapter.matrix_kind(n) == "embedding"]
    report = export_point("compressed-tensors", model, space, pmap, tmp_path / "bert", model_dir=folder)
    assert [w.split(":")[0] for w in report.warnings] == embeddings and set(report.dense) == set(embeddings)
    assert all("Linear modules only" in w for w in report.warnings)
    enc = {"input_ids": IDS, "attention_mask": torch.ones_like(IDS)}
    assert torch.equal(reloaded(transformers.AutoModelForSequenceClassification, tmp_path / "bert", **enc),
                       evaluated(model, space, pmap, **enc))

    tied_dir = build_model(tmp_path / "tied", "llama", task="causal_lm", tie_embeddings=True)
    tied = aligned(load_model(tied_dir, "causal_lm").model)
    space = ModelAdapter(tied, include_head=True).build_space(granularity="layer", bits=(8,))
    pmap = PrecisionMap({g.name: BitOption(8) for g in space.groups})
    report = export_point("compressed-tensors", tied, space, pmap, tmp_path / "llama", model_dir=tied_dir)
    assert [w.split(":")[0] for w in report.warnings] == ["lm_head"]
    assert "tied to model.embed_tokens" in report.warnings[0] and report.dense == ("lm_head",)
    assert torch.equal(reloaded(transformers.AutoModelForCausalLM, tmp_path / "llama", input_ids=IDS),
                       evaluated(tied, space, pmap, input_ids=IDS))


def test_activation_widths_are_written_as_their_weights_with_a_warning(llama, tmp_path):
    folder, model = llama
    space = ModelAdapter(model).build_space(granularity="layer", bits=(4, "4a8"), tie=("qkv", "gate_up"))
    pmap = per_decision(space, ["4a8", "4"])
    report = export_point("compressed-tensors", model, space, pmap, tmp_path / "ct", model_dir=folder)
    rounded = [n for n, o in pmap.items() if o.act_bits == 8]
    assert [w.split(":")[0] for w in report.warnings] == rounded
    assert all("activations not rounded to 8 bits" in w for w in report.warnings)
    weight_only = PrecisionMap({n: o.weight_only for n, o in pmap.items()})
    assert torch.equal(reloaded(transformers.AutoModelForCausalLM, tmp_path / "ct", input_ids=IDS),
                       evaluated(model, space, weight_only, input_ids=IDS))
    assert all(c["input_activations"] is None for c in quantization_config(tmp_path / "ct")["config_groups"].values())


def test_tensor_train_groups_are_written_as_their_dense_matrix(llama, tmp_path):
    folder, model = llama
    space = ModelAdapter(model).build_space(granularity="layer", bits=(4,), tt_ranks=(4,))
    tt_group = "model.layers.0.mlp.down_proj"
    pmap = PrecisionMap({g.name: BitOption.parse("tt4@8" if g.name == tt_group else "4") for g in space.groups})
    want = evaluated(model, space, pmap, input_ids=IDS)
    for fmt in ("compressed-tensors", "dense"):
        report = export_point(fmt, model, space, pmap, tmp_path / fmt, model_dir=folder)
        assert [w.split(":")[0] for w in report.warnings] == [tt_group] and "tensor-train" in report.warnings[0]
        assert tt_group in report.dense
        got = reloaded(transformers.AutoModelForCausalLM, tmp_path / fmt, input_ids=IDS)
        assert torch.allclose(got, want, atol=1e-4, rtol=0)
    unfactorised = PrecisionMap({g: o for g, o in pmap.items() if g != tt_group})
    assert not torch.allclose(evaluated(model, space, unfactorised, input_ids=IDS), want, atol=1e-4, rtol=0)


# --------------------------------------------------------------------------------------------- dense


def test_dense_llama_is_a_plain_checkpoint_with_the_searched_logits(llama, tmp_path):
    folder, model = llama
    space = ModelAdapter(model).build_space(granularity="layer", bits=("4g32", 8, "4ag32", 16), tie=("qkv", "gate_up"))
    pmap = per_decision(space, ["4g32", "8", "4ag32", "16", "32"])
    report = export_point("dense", model, space, pmap, tmp_path / "dense", model_dir=folder)
    assert report.format == "dense" and report.path == tmp_path / "dense" / "model.safetensors"
    assert "quantization_config" not in json.loads((tmp_path / "dense" / "config.json").read_text())
    keys = stored_keys(tmp_path / "dense")
    assert set(keys.values()) == {"F32"} and not any(k.endswith(("_packed", "_scale")) for k in keys)
    searched, loaded = {}, {}
    want = evaluated(model, space, pmap, state=searched, input_ids=IDS)
    got = reloaded(transformers.AutoModelForCausalLM, tmp_path / "dense", state=loaded, input_ids=IDS)
    assert same_weights(searched, loaded) == [] and torch.equal(got, want)
    # A 4g32 matrix holds at most 15 distinct values in each run of 32 columns of a row (the symmetric grid).
    with safe_open(report.path, "pt") as f:
        w = f.get_tensor("model.layers.0.self_attn.q_proj.weight")
    assert max(len(torch.unique(row)) for row in w.reshape(-1, 32)) <= 15
    assert set(report.dense) == {n for n, o in pmap.items() if not o.pruned} and not report.quantized


# ------------------------------------------------------------------------------ half-precision models


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bfloat16", "float16"])
def test_half_precision_llama_reloads_to_the_searched_weights_in_every_format(dtype, tmp_path):
    """A checkpoint saved in bfloat16 (float16) is searched in its dtype; compressed-tensors holds the scales
    in that dtype, and the search's scales are numbers of it (and of float16, the native artifact's), so
    the plain reload of every format has the evaluated weights and logits bit for bit, with no warning."""
    folder = build_model(tmp_path / "llama", "llama", task="causal_lm", layers=2, hidden=32, heads=4, intermediate=64)
    transformers.AutoModelForCausalLM.from_pretrained(str(folder), dtype=dtype).save_pretrained(str(folder))
    model = aligned(load_model(folder, "causal_lm").model)
    assert {p.dtype for p in model.parameters()} == {dtype}
    space = ModelAdapter(model).build_space(granularity="layer", bits=("4g32", 8, "4ag32", 16), tie=("qkv", "gate_up"))
    pmap = per_decision(space, ["4g32", "8", "4ag32", "16", "32", "4"])
    searched = {}
    want = evaluated(model, space, pmap, state=searched, input_ids=IDS)
    for fmt in ("compressed-tensors", "dense"):
        report = export_point(fmt, model, space, pmap, tmp_path / fmt, model_dir=folder)
        assert report.warnings == ()
        loaded = {}
        got = reloaded(transformers.AutoModelForCausalLM, tmp_path / fmt, state=loaded, input_ids=IDS)
        assert got.dtype == dtype and same_weights(searched, loaded) == [] and torch.equal(got, want), fmt
    with safe_open(tmp_path / "compressed-tensors" / "model.safetensors", "pt") as f:
        scale = f.get_tensor("model.layers.0.self_attn.q_proj.weight_scale")
    assert scale.dtype == dtype and torch.equal(scale.to(torch.float16).to(dtype), scale)
    export_point("native", model, space, pmap, tmp_path / "native", model_dir=folder)
    native = aligned(load_artifact(tmp_path / "native", load_model(folder, "causal_lm").model))
    with torch.no_grad():
        assert torch.equal(native(input_ids=IDS).logits, want)


# ------------------------------------------------------------------------------------------ refusals


def test_refusals_name_the_field(llama, tmp_path, monkeypatch):
    folder, model = llama
    space = ModelAdapter(model).build_space(granularity="layer", bits=(4,))
    pmap = PrecisionMap({g.name: BitOption(4) for g in space.groups})

    class Plain(nn.Module):  # the same modules, but not a transformers model
        def __init__(self):
            super().__init__()
            self.model, self.lm_head = model.model, model.lm_head

    for fmt in ("compressed-tensors", "dense"):
        with pytest.raises(InvalidInputError) as err:
            export_point(fmt, Plain(), space, pmap, tmp_path / "x")
        assert err.value.field == "model" and "native" in err.value.message
        with pytest.raises(InvalidInputError) as err:
            export_point(fmt, model, space, PrecisionMap({"nope": BitOption(4)}), tmp_path / "x")
        assert err.value.field == "precision_map"
        with pytest.raises(InvalidInputError) as err:
            export_point(fmt, model, space, pmap, tmp_path / "x", model_dir=tmp_path / "missing")
        assert err.value.field == "model" and "does not exist" in err.value.message
    monkeypatch.setitem(sys.modules, "compressed_tensors", None)
    with pytest.raises(InvalidInputError) as err:
        export_point("compressed-tensors", model, space, pmap, tmp_path / "x")
    assert err.value.field == "format" and "bitscout[compressed-tensors]" in err.value.message


# ----------------------------------------------------------------------------------------------- CLI


def test_cli_exports_a_point_as_compressed_tensors(llama, tmp_path, capsys):
    folder, model = llama
    space = ModelAdapter(model).build_space(granularity="layer", bits=("4g32", 8, 3), tie=("qkv", "gate_up"))
    cm = CostModel(space)
    maps = [space.uniform(8), per_decision(space, ["4g32", "3", "8"])]
    points = [ParetoPoint(p, cm.cost(p), {"perplexity": 1.0 + i}, "kl") for i, p in enumerate(maps)]
    result = SearchResult(front=points, points=points, sensitivities=[], metric="perplexity", higher_is_better=False,
                          space={"space": space_to_dict(space)}, info={"task": "causal_lm", "model_path": str(folder)})
    src = tmp_path / "result.json"
    result.to_json(src)
    out = tmp_path / "out"
    argv = [str(src), "--point", "1", "--format", "compressed-tensors", "--out", str(out)]
    assert export_main(argv) == 0
    said = capsys.readouterr().out
    n_quantized = sum(1 for o in maps[1].values() if o.bits in (4, 8))
    assert "model.safetensors (compressed-tensors" in said and f"{n_quantized} groups an engine" in said
    assert "stored as integers it has no kernel for" in said and not (out / "torchao.json").exists()
    assert torch.equal(reloaded(transformers.AutoModelForCausalLM, out, input_ids=IDS),
                       evaluated(model, space, maps[1], input_ids=IDS))
    assert json.loads((out / "export.json").read_text())["info"]["point"] == "front[1]"
    assert export_main(argv) == 2 and "--force" in capsys.readouterr().err
    assert export_main([*argv, "--force", "--verify"]) == 2 and "--verify" in capsys.readouterr().err
    assert export_main([*argv[:4], "onnx", *argv[5:]]) == 2 and "format must be one of" in capsys.readouterr().err
    assert export_main([str(src), "--point", "0", "--format", "dense", "--out", str(tmp_path / "dense")]) == 0
    assert "(dense" in capsys.readouterr().out
    assert torch.equal(reloaded(transformers.AutoModelForCausalLM, tmp_path / "dense", input_ids=IDS),
                       evaluated(model, space, maps[0], input_ids=IDS))
