"""Activation quantization (``4a8``), BOPs at the searched activation widths, measured latency
tables driving the allocator, and ``bitscout profile``."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from search.actquant import fake_quantize_activation
from search.adapter import ModelAdapter
from search.cost import CostModel, LatencyTable
from search.errors import InvalidInputError
from search.local import DataOptions, prepare
from search.pipeline import SearchOptions
from search.plan import resolve
from search.profile import profile_main
from search.space import BitOption, Group, Member, PrecisionMap, SearchSpace, space_to_dict
from search.tasks import load_model
from tests.tiny import build_model


def _direct_a8(x: torch.Tensor) -> torch.Tensor:
    """Per-token symmetric 8-bit rounding, written out."""
    out = torch.empty_like(x)
    flat, res = x.reshape(-1, x.shape[-1]), out.view(-1, x.shape[-1])
    for t in range(flat.shape[0]):
        s = max(float(flat[t].abs().max()) / 127, 2.0**-24)
        res[t] = torch.clamp(torch.round(flat[t] / s), -127, 127) * s
    return out


def test_the_activation_grid_against_a_direct_computation():
    x = torch.randn(3, 5, 16, generator=torch.Generator().manual_seed(0)) * 3
    assert torch.allclose(fake_quantize_activation(x, 8), _direct_a8(x), atol=1e-6)
    assert torch.equal(fake_quantize_activation(x, None), x)
    h = fake_quantize_activation(x, 16)
    assert torch.equal(h, x.half().float()) and float((h - x).abs().max() / x.abs().max()) < 1e-3
    static = fake_quantize_activation(x, 4, amax=float(x.abs().max()))
    s = float(x.abs().max()) / 7
    assert torch.allclose(static, torch.clamp(torch.round(x / s), -7, 7) * s)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    folder = build_model(tmp_path_factory.mktemp("act") / "bert", "bert", layers=1, hidden=32, heads=4, intermediate=64)
    model = load_model(folder, "sequence_classification").model
    return folder, model


def _inputs(model):
    return {"input_ids": torch.tensor([[2, 7, 9, 11, 13, 3], [2, 8, 8, 30, 3, 0]]),
            "attention_mask": torch.tensor([[1] * 6, [1] * 5 + [0]])}  # fmt: skip




@torch.no_grad()
def test_a8_in_a_model_matches_the_direct_computation_whole_matrices_and_slices(tiny):
    _, model = tiny
    adapter = ModelAdapter(model)
    for granularity in ("layer", "group"):
        space = adapter.build_space(granularity=granularity, bits=("8a8", 4), ffn_block_size=32)
        for module in ("bert.encoder.layer.0.intermediate.dense", "bert.encoder.layer.0.output.dense"):
            groups = [g for g in space.groups if module in g.modules]
            # one group of the matrix at 8a8, the others (slices at group granularity) weight-only 4
            pmap = PrecisionMap({g.name: ("8a8" if i == 0 else 4) for i, g in enumerate(groups)})
            seen: dict[str, torch.Tensor] = {}
            mod = adapter.module(module)
            # the input as the model makes it (a pre-hook that runs before the quantizer's), and the
            # output after every hook of the quantizer (a hook registered after them)
            hx = mod.register_forward_pre_hook(lambda m, a, seen=seen: seen.update(x=a[0].clone()))
            try:
                with adapter.quantized(pmap, space, clip="minmax"):
                    hy = mod.register_forward_hook(lambda m, a, o, seen=seen: seen.update(y=o.clone()))
                    model(**_inputs(model))
                    hy.remove()
                    w = adapter.weight(module).clone()
                    b = adapter.bias(module).clone()
            finally:
                hx.remove()
            x = seen["x"]  # the input before the hook's quantization (the model's own activations)
            first = next(m for m in groups[0].members if m.module == module)
            expect = F.linear(x, w, b)
            if first.axis == "all":
                expect = F.linear(_direct_a8(x), w, b)
            elif first.axis == "out":
                expect[..., first.start:first.stop] = F.linear(_direct_a8(x), w[first.start:first.stop], b[first.start:first.stop])
            else:  # a column block: its columns' part of the product with their own per-token scales
                cols = slice(first.start, first.stop)
                expect = expect + F.linear(_direct_a8(x[..., cols]) - x[..., cols], w[:, cols])
            assert torch.allclose(seen["y"], expect, atol=1e-5), (granularity, module)


@torch.no_grad()
def test_a16_changes_nothing_measurable(tiny):
    _, model = tiny
    adapter = ModelAdapter(model)
    space = adapter.build_space(bits=(8, "8a16"))
    ref = model(**_inputs(model)).logits
    with adapter.quantized(space.uniform(8), space):
        w8 = model(**_inputs(model)).logits
    with adapter.quantized(space.uniform("8a16"), space):
        a16 = model(**_inputs(model)).logits
    assert float((a16 - w8).abs().max()) < 1e-3 * float(ref.abs().max())
    with adapter.quantized(space.uniform("8a8"), space):
        a8 = model(**_inputs(model)).logits
    assert not torch.equal(a8, w8)  # the hooks do act
    assert torch.equal(model(**_inputs(model)).logits, ref)  # and are gone on exit


def _space() -> SearchSpace:
    g = lambda name: Group(name, "layer", (Member(name, (64, 32)),), 0, name, macs_per_token=64 * 32)  # noqa: E731
    opts = tuple(BitOption.parse(o) for o in ("4", "8a8", "4a8", "4a16", "32"))
    return SearchSpace((g("a"), g("b")), (tuple(sorted(opts)),) * 2, other_params=10)


def test_bops_count_the_searched_activation_bits():
    space = _space()
    cm = CostModel(space, seq_len=7, batch=3, act_bits=8)
    t, c = 21, 64 * 32
    other = t * 0 * 32 * 32
    assert cm.cost(PrecisionMap({"a": "4a16", "b": "4a8"})).bops == other + t * c * (4 * 16 + 4 * 8)
    assert cm.cost(PrecisionMap({"a": "8a8", "b": "32"})).bops == t * c * (8 * 8 + 32 * 32)
    # a weight-only option takes the cost model's act_bits
    assert CostModel(space, seq_len=7, batch=3, act_bits=4).cost(PrecisionMap({"a": "4", "b": "4"})).bops == t * c * 2 * 16
    lat = CostModel(space, seq_len=4096, profile="a100")  # compute-bound: the activation width picks the kernel
    assert lat.cost(PrecisionMap({"a": "4a16", "b": "4a16"})).latency_ms > lat.cost(PrecisionMap({"a": "4a8", "b": "4a8"})).latency_ms


def _table(ms: dict[str, float], tokens: int = 16) -> dict:
    return {"format": "bitscout-latency-table/1", "device": "test",
            "entries": [{"tokens": tokens, "shape": [64, 32], "option": k, "ms": v} for k, v in ms.items()]}  # fmt: skip


def test_a_measured_table_drives_the_allocator_against_the_roofline():
    space = _space()
    # scores: weight-only 4 is the most accurate quantized option; 8a8 the least
    scores = {n: {"32": 0.0, "4": 0.1, "4a16": 0.2, "4a8": 0.3, "8a8": 0.5} for n in ("a", "b")}
    table = {"method": "kl", "scores": scores, "samples": 8}
    roof = CostModel(space, seq_len=16, profile="a100")
    # the roofline (memory-bound at 16 tokens) says 4-bit weights are the fast ones
    assert roof.cost(space.uniform("4")).latency_ms < roof.cost(space.uniform("8a8")).latency_ms
    base = {"seq_len": 16, "act_bits": 8, "batch": 1, "profile": roof.profile.to_dict()}
    limit = roof.cost(space.uniform("4")).latency_ms * 1.001
    by_roof = resolve({"space": space_to_dict(space), "cost_model": base}, table, {"max_latency_ms": limit})
    assert {e["bits"] for e in by_roof["precision_map"].values()} == {4}
    # a measured table that contradicts it: dequantize + matmul (4) is slow, the int8 kernel (8a8) fast
    measured = _table({"4": 5.0, "4a16": 4.0, "4a8": 3.0, "8a8": 1.0, "32": 2.0})
    cm = {**base, "latency_table": measured}
    got = resolve({"space": space_to_dict(space), "cost_model": cm}, table, {"max_latency_ms": 2.5})
    # within 2.5 ms only 8a8 + 8a8 (2 ms) fits: 4 (5 ms), 4a8 (3 ms), 32 (2 ms) + 8a8 (1 ms) do not
    assert {k: (v["bits"], v["act_bits"]) for k, v in got["precision_map"].items()} == {"a": (8, 8), "b": (8, 8)}
    assert got["cost"]["latency_ms"] == 2.0 and got["predicted"] == 1.0
    assert CostModel(space, seq_len=16, latency_table=measured).cost(PrecisionMap({"a": "4", "b": "8a8"})).latency_ms == 6.0


def test_a_table_that_lacks_a_shape_or_a_token_count_is_refused_naming_it():
    space = _space()
    with pytest.raises(InvalidInputError) as e:
        CostModel(space, seq_len=16, latency_table=_table({"4": 1.0}))
    assert e.value.field == "latency_table" and "at option 4a8 over 16 tokens" in e.value.message
    full = {"4": 1.0, "4a16": 1.0, "4a8": 1.0, "8a8": 1.0, "32": 1.0}
    with pytest.raises(InvalidInputError) as e:
        CostModel(space, seq_len=32, latency_table=_table(full))
    assert "32 tokens" in e.value.message
    bad = _table(full)
    bad["entries"][2]["shape"] = [64]
    with pytest.raises(InvalidInputError) as e:
        LatencyTable(bad)
    assert e.value.field == "latency_table.entries.2.shape"


def test_profile_writes_a_valid_table_that_prices_the_model(tiny, tmp_path, capsys):
    folder, model = tiny
    out = tmp_path / "table.json"
    code = profile_main(["--model", str(folder), "--out", str(out), "--bits", "4,8,32", "--act-bits", "8",
                         "--tokens", "8", "--repeats", "2", "--warmup", "1", "--quiet"])  # fmt: skip
    assert code == 0
    data = json.loads(out.read_text())
    table = LatencyTable(data)  # passes every check
    shapes = {tuple(e["shape"]) for e in data["entries"]}
    assert shapes == {(32, 32), (64, 32), (32, 64)}
    assert {e["option"] for e in data["entries"]} == {"4", "4a8", "8", "8a8", "32"}
    assert {e["kernel"] for e in data["entries"] if e["option"] == "8a8"} <= {"int8 _int_mm", "dequant+fp32 matmul"}
    space = ModelAdapter(model).build_space(bits=(4, "4a8", "8a8"))
    cm = CostModel(space, seq_len=8, latency_table=table)
    assert cm.cost(space.uniform("8a8")).latency_ms > 0
    assert profile_main(["--model", str(folder), "--out", str(out), "--bits", "7"]) == 2


def test_a_search_with_activation_bits_and_static_scales(tiny, tmp_path):
    from tests.tiny import sentiment_rows, write_jsonl

    folder, _ = tiny
    data = write_jsonl(tmp_path / "s.jsonl", sentiment_rows(64, seed=3))
    opts = SearchOptions(methods=("kl",), bits=(4, 8), activation_bits=(8,), act_scales="static", front_points=4)
    search = prepare(folder, DataOptions(source=str(data), label_field="label", calibration=8, evaluation=8, max_length=12), opts)
    assert {o.key() for row in search.space.options for o in row} == {"4a8", "8a8", "32"}
    name = search.space.groups[0].modules[0]
    assert search.act_static is not None and search.act_static.get(name) > 0
    table = search.sensitivity("kl")
    assert all(row["32"] == 0.0 and row["4a8"] > 0 for row in table.scores.values())
    # every method scores activation widths now; the guard still names the field for any other
    SearchOptions(methods=("hessian", "fisher", "dnas"), bits=(4, 8), activation_bits=(8,))
    from bitscout.methods import activation_problem

    assert "method other" in str(activation_problem(["kl", "other"], ["4", "4a8"]))
    assert activation_problem(["other"], ["4", "8"]) is None
    with pytest.raises(InvalidInputError) as e:
        SearchOptions(bits=(4,), activation_bits=(7,))
    assert e.value.field == "space.act_bits"


def test_refinement_learns_activation_steps(tiny, tmp_path):
    from search.refine import RefineConfig, refine
    from tests.tiny import sentiment_rows, write_jsonl

    folder, _ = tiny
    data = write_jsonl(tmp_path / "s.jsonl", sentiment_rows(64, seed=4))
    opts = SearchOptions(methods=("kl",), bits=(4,), activation_bits=(8,), front_points=4)
    search = prepare(folder, DataOptions(source=str(data), label_field="label", calibration=8, evaluation=8, max_length=12), opts)
    res = refine(search, search.space.uniform("4a8"), config=RefineConfig(steps=3, patience=None, eval_every=3))
    assert res.metrics  # evaluated with the learned activation steps in place
    assert res.precision_map == search.space.uniform("4a8")


def test_tensor_train_options_take_no_activation_width_and_the_refusal_names_the_field(tiny, tmp_path, capsys):
    from search.cli import search_main
    from tests.tiny import sentiment_rows, write_jsonl

    folder, _ = tiny
    for make in (lambda: SearchOptions(bits=("tt16@4a8",)), lambda: BitOption(4, True, None, 8, 16),
                 lambda: PrecisionMap.from_dict({"g": {"bits": 4, "tt_rank": 16, "act_bits": 8}})):
        with pytest.raises(InvalidInputError) as e:
            make()
        assert e.value.field == "bits" and "activation bits do not apply to tensor-train options" in str(e.value)
    # --tt-ranks with --act-bits: the plain widths are crossed, the tensor-train options stay weight-only
    data = write_jsonl(tmp_path / "s.jsonl", sentiment_rows(32, seed=2))
    opts = SearchOptions(methods=("kl",), bits=(4,), activation_bits=(8,), tt_ranks=(4,), front_points=4)
    search = prepare(folder, DataOptions(source=str(data), label_field="label", calibration=8, evaluation=8,
                                         max_length=12), opts)
    keys = {o.key() for row in search.space.options for o in row}
    assert "4a8" in keys and "tt4@4" in keys and not any(k.startswith("tt") and "a8" in k for k in keys)
    with pytest.raises(SystemExit) as ex:
        search_main(["--model", str(folder), "--data", str(data), "--label-field", "label",
                     "--bits", "tt16@4a8", "--out", str(tmp_path / "r.json"), "--quiet"])
    assert ex.value.code == 2
    assert "argument --bits: activation bits do not apply to tensor-train options" in capsys.readouterr().err
