"""Group-wise scales: the quantizer against a computation group by group, exact bytes, refused widths,
every method on a ``4g32,8`` space of a tiny model, refinement's step sizes, and the artifact."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from safetensors import safe_open

from search import quant
from search.adapter import ModelAdapter
from search.cost import CostModel, weight_bytes
from search.errors import InvalidInputError
from search.export import export_artifact, load_artifact
from search.export.artifact import ARTIFACT_FILE
from search.local import DataOptions, prepare
from search.pipeline import SearchOptions
from search.refine import RefineConfig, refine
from search.result import Budget
from search.space import BitOption, Group, Member, PrecisionMap, SearchSpace
from search.tasks import evaluate, load_model, reference_outputs
from tests.tiny import build_model

# ------------------------------------------------------------------------------------------ quantizer


def _f16(x: torch.Tensor) -> torch.Tensor:
    return x.clamp(quant.SCALE_EPS, quant.SCALE_MAX).to(torch.float16).to(torch.float32)


def _group_by_hand(v: torch.Tensor, bits: int, symmetric: bool, clip: str, grid: int = 20):
    """Scale, zero point and dequantized values of one group of columns (a 1-d float32 vector),
    straight from the definitions in :mod:`search.quant`: the clip ratio with the least squared error
    (the first on ties) among ``linspace(1, MSE_MIN_RATIO, grid)``, scales rounded to float16."""
    qmin, qmax = quant.code_range(bits, symmetric)
    lo0, hi0 = v.min().reshape(1), v.max().reshape(1)
    ratios = torch.linspace(1.0, quant.MSE_MIN_RATIO, grid, dtype=torch.float64).tolist() if clip == "mse" else [1.0]
    best = None
    for r in ratios:
        if symmetric:
            s = _f16(torch.maximum(hi0, -lo0) * r / qmax)
            z = torch.zeros_like(s)
        else:
            lo, hi = lo0.clamp_max(0.0) * r, hi0.clamp_min(0.0) * r
            s = _f16((hi - lo) / (qmax - qmin))
            z = torch.round(-lo / s).clamp(qmin, qmax)
        q = (torch.round(v / s) + z).clamp(qmin, qmax)
        deq = (q - z) * s
        err = float((v - deq).square().sum(dtype=torch.float64))
        if best is None or err < best[0]:
            best = (err, float(s), int(z), q, deq)
    assert best is not None
    return best[1:]


@pytest.mark.parametrize("bits,symmetric,clip", [(4, True, "mse"), (3, False, "mse"), (8, True, "minmax"), (2, False, "minmax")])
def test_group_wise_quantization_is_per_group_quantization_computed_group_by_group(bits, symmetric, clip):
    g = torch.Generator().manual_seed(bits)
    w = torch.randn(5, 96, generator=g) * torch.linspace(0.1, 3.0, 96)  # groups of very different ranges
    w[2, 32:64] = 0.0  # an all-zero group
    w[4, :32] += 2.0  # a group that does not contain 0
    n = 32
    qp = quant.choose_qparams(w, bits, symmetric=symmetric, clip=clip, group_size=n)
    assert qp.scale.shape == (5, 3) and qp.zero_point.shape == (5, 3) and qp.group_size == n
    codes = quant.quantize(w, qp)
    deq = quant.dequantize(codes, qp)
    assert codes.shape == w.shape and codes.dtype == (torch.int8 if symmetric else torch.uint8)
    for r in range(5):
        for j in range(3):
            cols = slice(j * n, (j + 1) * n)
            s, z, q, d = _group_by_hand(w[r, cols], bits, symmetric, clip)
            assert float(qp.scale[r, j]) == s and int(qp.zero_point[r, j]) == z, (r, j)
            assert torch.equal(codes[r, cols].to(torch.float32), q), (r, j)
            assert torch.equal(deq[r, cols], d), (r, j)
    assert torch.equal(quant.fake_quantize(w, bits, symmetric=symmetric, clip=clip, group_size=n), deq)
    assert torch.count_nonzero(deq[2, 32:64]) == 0
    direct = float((w - deq).square().sum(dtype=torch.float64))
    assert quant.quant_error(w, bits, symmetric=symmetric, clip=clip, group_size=n) == pytest.approx(direct, rel=1e-12)


def test_one_group_per_row_is_the_per_row_quantizer_and_smaller_groups_err_less():
    w = torch.randn(8, 64, generator=torch.Generator().manual_seed(1))
    per_row = quant.fake_quantize(w, 4)
    assert torch.equal(quant.fake_quantize(w, 4, group_size=64), per_row)
    errors = [quant.quant_error(w, 4, group_size=n) for n in (64, 32, 16, 8)]
    assert errors == sorted(errors, reverse=True) and errors[-1] < errors[0]


def test_group_wise_codes_pack_and_unpack_like_per_row_codes():
    w = torch.randn(6, 48, generator=torch.Generator().manual_seed(2))
    qp = quant.choose_qparams(w, 3, symmetric=False, group_size=16)
    codes = quant.quantize(w, qp)
    packed = quant.pack(codes, 3)
    assert packed.numel() == math.ceil(w.numel() * 3 / 8)
    assert torch.equal(quant.unpack(packed, 3, w.numel()).view(6, 48), codes)


def test_group_sizes_that_do_not_divide_the_columns_and_misfit_qparams_are_refused():
    w = torch.randn(4, 48)
    with pytest.raises(InvalidInputError) as e:
        quant.choose_qparams(w, 4, group_size=32)
    assert e.value.field == "group_size"
    with pytest.raises(InvalidInputError) as e:
        quant.fake_quantize(w, 4, group_size=0)
    assert e.value.field == "group_size"
    qp = quant.choose_qparams(w, 4, group_size=16)
    with pytest.raises(InvalidInputError) as e:
        quant.quantize(torch.randn(4, 32), qp)
    assert e.value.field == "qparams"
    per_row = quant.choose_qparams(w, 4)
    with pytest.raises(InvalidInputError):
        quant.dequantize(quant.quantize(w, per_row), quant.QParams(per_row.scale, per_row.zero_point, 4, True, 16))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_group_wise_quantization_on_cuda_matches_the_cpu():
    w = torch.randn(64, 256, generator=torch.Generator().manual_seed(3))
    for bits, sym, n in ((4, True, 128), (3, False, 32), (8, True, 64)):
        qc = quant.choose_qparams(w.cuda(), bits, symmetric=sym, group_size=n)
        assert qc.scale.device.type == "cuda" and qc.scale.shape == (64, 256 // n)
        fq = quant.fake_quantize(w.cuda(), bits, symmetric=sym, group_size=n)
        assert torch.allclose(fq.cpu(), quant.fake_quantize(w, bits, symmetric=sym, group_size=n), atol=1e-6)


# ------------------------------------------------------------------------------------------- options


def test_bit_options_read_write_and_sort_group_sizes():
    assert BitOption.parse("4g128") == BitOption(4, True, 128)
    assert BitOption.parse("4ag128") == BitOption(4, False, 128)
    assert BitOption.parse("4a") == BitOption(4, False)  # the stored key of asymmetric tables
    assert BitOption.parse({"bits": 4, "symmetric": True, "group_size": 128}).key() == "4g128"
    assert BitOption.parse({"bits": 4, "group_size": None}) == BitOption(4)
    assert BitOption.parse("4g64", symmetric=False).key() == "4ag64"  # no grid letter: the space's grid
    assert BitOption.parse("4sg64", symmetric=False).key() == "4g64"
    assert [o.key() for o in (BitOption(4), BitOption(4, False), BitOption(4, False, 32))] == ["4", "4a", "4ag32"]
    assert BitOption(4, group_size=32).to_dict() == {"bits": 4, "symmetric": True, "group_size": 32, "act_bits": None, "tt_rank": None}
    assert BitOption(4).to_dict() == {"bits": 4, "symmetric": True, "group_size": None, "act_bits": None, "tt_rank": None}
    assert BitOption.parse("4a8").to_dict() == {"bits": 4, "symmetric": True, "group_size": None, "act_bits": 8, "tt_rank": None}
    opts = sorted({BitOption.parse(k) for k in ("8", "4g32", "4", "4g128", "4a", "2", "32", "4a16", "4a8")})
    assert [o.key() for o in opts] == ["2", "4a", "4", "4a8", "4a16", "4g128", "4g32", "8", "32"]
    pmap = PrecisionMap({"a": "4g32", "b": 4})
    assert PrecisionMap.from_dict(pmap.to_dict()) == pmap and hash(PrecisionMap(pmap.to_dict())) == hash(pmap)
    assert pmap != PrecisionMap({"a": "4g64", "b": 4}) and pmap != PrecisionMap({"a": 4, "b": 4})
    for bad in ("16g128", "0g32", "4g0", "4a7", "16a8", "tt4@0", "tt4@4g32", "tt4@4a8", "4x", {"bits": 32, "group_size": 64}):
        with pytest.raises(InvalidInputError) as e:
            BitOption.parse(bad)
        assert e.value.field == "bits"


# ------------------------------------------------------------------------------------------ cost


def test_size_counts_one_scale_and_zero_point_per_group_of_columns_exactly():
    full = Member("m", (64, 128), "all")
    cols = Member("o", (16, 128), "in", 32, 64)
    g = Group("g", "head", (full, cols), block=0, parent="p", index=0)
    # codes packed per member slice; 2 bytes a float16 scale (+1 a zero point) per row and group
    assert weight_bytes(g, BitOption(4, True, 32)) == (64 * 128 * 4 // 8 + 2 * 64 * 4) + (16 * 32 * 4 // 8 + 2 * 16 * 1)
    assert weight_bytes(g, BitOption(4, False, 32)) == (4096 + 3 * 256) + (256 + 3 * 16)
    assert weight_bytes(g, BitOption(3, True, 16)) == math.ceil(64 * 128 * 3 / 8) + 2 * 64 * 8 + 16 * 32 * 3 // 8 + 2 * 16 * 2
    assert weight_bytes(g, BitOption(4)) == 4096 + 2 * 64 + 256 + 2 * 16  # per row: unchanged
    space = SearchSpace(
        groups=(g,), options=((BitOption(4), BitOption(4, True, 32), BitOption(32)),), granularity="group",
        other_params=100,
    )
    cm = CostModel(space)
    assert cm.cost(PrecisionMap({"g": "4g32"})).size_bytes == 100 * 4 + 4096 + 512 + 256 + 32
    assert cm.cost(PrecisionMap({"g": "4g32"})).avg_bits == cm.cost(PrecisionMap({"g": "4"})).avg_bits == 4.0


def test_group_widths_that_do_not_fit_a_searched_matrix_are_refused_with_the_field():
    m = Member("model.mlp.down", (32, 96), "all")
    g = Group("model.mlp.down", "layer", (m,), block=0, parent="model.mlp.down")
    with pytest.raises(InvalidInputError) as e:
        SearchSpace(groups=(g,), options=((BitOption(4, True, 64), BitOption(32)),))
    assert e.value.field == "space.bits" and "model.mlp.down" in e.value.message and "96" in e.value.message
    # a column slice must start on a group of the whole matrix
    head = Group("attn/head1", "head", (Member("o", (32, 96), "in", 16, 48),), block=0, parent="attn", index=1)
    with pytest.raises(InvalidInputError) as e:
        SearchSpace(groups=(head,), options=((BitOption(4, True, 32), BitOption(32)),), granularity="group")
    assert e.value.field == "space.bits" and "start" in e.value.message


def test_the_adapter_refuses_a_width_at_build_time_and_layer_or_group_granularity_say_where(tmp_path):
    folder = build_model(tmp_path / "llama", "llama", task="causal_lm", hidden=32, heads=4, intermediate=48)
    model = load_model(folder, "causal_lm").model
    adapter = ModelAdapter(model)
    with pytest.raises(InvalidInputError) as e:
        adapter.build_space(bits=("4g32", 8))  # down_proj has 48 input columns
    assert e.value.field == "space.bits" and "down_proj" in e.value.message
    space = adapter.build_space(bits=("4g16", 8))
    assert all(BitOption(4, True, 16) in opts for opts in space.options)
    # group granularity: a head's columns of o_proj are 16 wide (GQA: 2 query heads of 8 per group)
    with pytest.raises(InvalidInputError) as e:
        adapter.build_space(granularity="group", bits=(0, "4g32", 8), ffn_block_size=16)
    assert e.value.field == "space.bits"
    lenient = adapter.build_space(bits=("4g32", 8), strict=False)
    assert {g.name for g, o in zip(lenient.groups, lenient.options, strict=True) if BitOption(4, True, 32) not in o} == {
        n for n in adapter.matrices if n.endswith("down_proj")
    }
    # the search refuses it before any work, naming the field
    with pytest.raises(InvalidInputError) as e:
        SearchOptions(bits=("4g", 8))
    assert e.value.field == "bits"


# ------------------------------------------------------------------- every method on a 4g32,8 space


@pytest.fixture(scope="module")
def gw_search(trained_bert, sentiment_file):
    data = DataOptions(source=str(sentiment_file), label_field="label", calibration=32, evaluation=32,
                       max_length=16, batch_size=16)
    opts = SearchOptions(methods=("kl", "hessian", "dnas", "nsga2"), bits=("4g32", 8), front_points=4,
                         budget=Budget(max_avg_bits=6.0), method_options={
                             "hessian": {"max_probes": 4, "min_probes": 2, "calibrate": False},
                             "dnas": {"steps": 4, "steps_next": 2, "target_fractions": [0.5]},
                             "nsga2": {"n_evaluations": 8, "population_size": 4},
                         })
    return prepare(trained_bert, data, opts, device="cpu")


def test_every_method_searches_a_group_wise_space(gw_search):
    s = gw_search
    g32 = BitOption(4, True, 32)
    assert all(opts == (g32, BitOption(8), BitOption(32)) for opts in s.space.options)
    result = s.run()
    by_method = {m: [p for p in result.points if p.method == m] for m in ("kl", "hessian", "dnas", "nsga2", "uniform")}
    assert all(by_method.values()), {m: len(v) for m, v in by_method.items()}
    assert any("uniform 4g32" == p.label for p in by_method["uniform"])
    for t in result.sensitivities:
        assert all(t.scores[g.name]["4g32"] > t.scores[g.name]["8"] >= 0.0 for g in s.space.groups), t.method
    assert any(o == g32 for p in result.points if p.method != "uniform" for o in p.precision_map.values())
    for p in result.points:
        assert p.cost == s.cost_model.cost(p.precision_map)
    # the evaluation is of the group-wise quantizer: every matrix quantized by hand, group by group
    direct = copy.deepcopy(s.model)
    ad = ModelAdapter(direct)
    with torch.no_grad():
        for g in s.space.groups:
            for m in g.members:
                w = ad.member_slice(m)
                w.copy_(quant.fake_quantize(w, 4, group_size=32))
    uniform = next(p for p in by_method["uniform"] if p.label == "uniform 4g32")
    assert evaluate(direct, s.evaluation, s.task, reference=s.reference()) == uniform.metrics
    per_row = s.adapter.build_space(bits=(4, 8))
    with s.adapter.quantized(per_row.uniform(4), per_row):
        assert evaluate(s.model, s.evaluation, s.task, reference=s.reference()) != uniform.metrics


def test_refinement_starts_at_the_group_wise_point_and_learns_one_step_size_per_group(gw_search, tmp_path):
    s = gw_search
    pmap = s.space.uniform("4g32")
    still = RefineConfig(steps=1, lr_weights=1e-30, lr_scales=1e-30, kd_hidden=0.0, kd_attention=0.0, eval_every=1)
    assert refine(s, pmap, config=still).metrics == s.evaluate(pmap)
    res = refine(s, pmap, config=RefineConfig(steps=4, eval_every=2, lr_scales=1e-3, patience=None),
                 train_batches=s.calibration, validation_batches=s.calibration[:1])
    moved = 0
    for key, qp in res.qparams.items():
        group, i = key.split("::")
        m = s.space.groups[s.space.index(group)].members[int(i)]
        assert qp.group_size == 32 and qp.scale.shape == (m.out_channels, m.in_features // 32), key
        start = quant.choose_qparams(s.adapter.member_slice(m).detach(), 4, group_size=32)
        moved += int(not torch.equal(start.scale, qp.scale))
    assert moved > 0
    path = export_artifact(res.model, s.space, pmap, tmp_path, qparams=res.qparams)
    loaded = load_artifact(path.parent, load_model(s.model_path, "sequence_classification", num_labels=2).model)
    want = res.model.state_dict()
    for k, v in loaded.state_dict().items():
        assert torch.equal(v, want[k]), k


def test_a_group_wise_artifact_round_trips_bit_exactly_in_the_bytes_the_cost_model_counts(tmp_path, trained_bert):
    lm = load_model(trained_bert, "sequence_classification", num_labels=2)
    model = lm.model
    adapter = ModelAdapter(model)
    space = adapter.build_space(granularity="group", bits=(0, "4g8", "3ag4", 8, "2a"), ffn_block_size=16)
    cycle = ["4g8", "3ag4", "8", "2a", "32", "0"]
    pmap = PrecisionMap({g.name: (cycle[i % len(cycle)] if g.kind != "layer" else "4g8")
                         for i, g in enumerate(space.groups)})
    kept = [g for g in space.groups if g.kind == "head" and g.index == 0]
    pmap = pmap.replace(**{g.name: BitOption(4, True, 8) for g in kept})
    assert {"4g8", "3ag4", "8", "2a", "32", "0"} <= {o.key() for o in pmap.values()}
    from search.data import TextData, TextExample, tokenize

    batches = tokenize(TextData([TextExample("good movie very nice", 1), TextExample("bad dull plot", 0)], ["n", "p"]),
                       lm.tokenizer, max_length=16, batch_size=2)
    ref = reference_outputs(model, batches, "sequence_classification")
    with adapter.quantized(pmap, space) as q:
        want = {k: v.clone() for k, v in q.state_dict().items()}
        want_metrics = evaluate(q, batches, "sequence_classification", reference=ref)
    export_artifact(model, space, pmap, tmp_path, verify=True)
    with safe_open(str(tmp_path / ARTIFACT_FILE), framework="pt") as f:
        nbytes = {k: f.get_tensor(k).numel() * f.get_tensor(k).element_size() for k in f.keys()}  # noqa: SIM118
        scale_shapes = {k: tuple(f.get_tensor(k).shape) for k in f.keys() if k.endswith("::scale")}  # noqa: SIM118
    for g in space.groups:
        opt = pmap[g.name]
        stored = sum(v for k, v in nbytes.items() if k.startswith(f"quant::{g.name}::"))
        assert stored == weight_bytes(g, opt), g.name
        if opt.group_size:
            for i, m in enumerate(g.members):
                assert scale_shapes[f"quant::{g.name}::{i}::scale"] == (m.out_channels, m.in_features // opt.group_size)
    loaded = load_artifact(tmp_path, load_model(trained_bert, "sequence_classification", num_labels=2).model)
    for k, v in loaded.state_dict().items():
        assert torch.equal(v, want[k]), k
    assert evaluate(loaded, batches, "sequence_classification", reference=ref) == want_metrics


@pytest.mark.parametrize("lsq", [False, True], ids=["stacked", "lsq"])
def test_the_dnas_mixture_of_a_tied_group_wise_space_is_the_quantized_model(tmp_path, sentiment_file, lsq):
    """One-hot architecture weights (one per decision: q/k/v and gate/up tied) give the model the pipeline
    evaluates for that map, group-wise scales included, whether the quantized versions are stacked
    constants or recomputed from learned (LSQ) step sizes."""
    import numpy as np

    from search.dnas import DNAS, DNASOptions
    from search.tasks import model_output

    folder = build_model(tmp_path / "llama", "llama", task="causal_lm", hidden=32, heads=4, intermediate=64)
    data = DataOptions(source=str(sentiment_file), calibration=8, evaluation=8, max_length=16, batch_size=8)
    s = prepare(folder, data, SearchOptions(bits=(2, "4g16", 8)), task="causal_lm", device="cpu")
    space = s.space
    assert len(space.ties) == 4 and len(space.decisions) == len(space.groups) - 6
    rng = np.random.default_rng(1)
    choices = [int(rng.integers(len(o))) for o in space.decision_options]
    choices[0] = space.decision_options[0].index(BitOption(4, True, 16))  # q/k/v of block 0 group-wise at least
    pmap = space.from_choices(choices)
    batch = s.calibration[0]
    with DNAS(s.model, s.adapter, space, s.cost_model, s.task, s.calibration, metric="size_bytes",
              options=DNASOptions(batch_size=None, loss="kd", lsq=lsq)) as dn:
        assert len(dn.logits) == len(space.decisions)
        ys = [torch.nn.functional.one_hot(torch.tensor(c), len(o)).float()
              for c, o in zip(choices, space.decision_options, strict=True)]
        with torch.no_grad():
            mixed = torch.func.functional_call(dn._forward, dn._overrides(ys), (batch,))
    with s.adapter.quantized(pmap, space), torch.no_grad():
        expected = model_output(s.model, batch, s.task)
    with torch.no_grad():
        full = model_output(s.model, batch, s.task)
    changed = float((full - expected).abs().max())
    assert changed > 0 and float((mixed - expected).abs().max()) <= 1e-3 * changed
