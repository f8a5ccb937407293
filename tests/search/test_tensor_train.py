"""Tensor-train options: TT-SVD, the factorised forward, their costs, scores, evaluation, refinement
and export, compared with direct computations."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from search import quant
from search import tensor_train as tt
from search.adapter import ModelAdapter
from search.cost import CostModel, tt_core_bytes, weight_bytes
from search.errors import InvalidInputError
from search.local import DataOptions, prepare
from search.pipeline import SearchOptions
from search.space import BitOption, Group, Member, PrecisionMap, SearchSpace
from search.tasks import evaluate, load_model, reference_outputs
from search.tt_layout import factorize, layout


def _random_tt(shape: tuple[int, int], rank: int, seed: int = 0) -> tuple[torch.Tensor, list[torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    lay = layout(*shape)
    cores = [torch.randn(s, generator=g, dtype=torch.float64) for s in lay.core_shapes(rank)]
    return tt.tt_full(cores, lay), cores


# ------------------------------------------------------------------------------------ layout


def test_factorisations_are_near_equal_and_pad_a_prime_dimension_a_little():
    assert factorize(384, 3) == (6, 8, 8) and factorize(1536, 3) == (8, 12, 16) and factorize(32, 3) == (2, 4, 4)
    f = factorize(30522, 3)  # 30522 = 2 * 3 * 5087 (a prime): padded to a near-equal factorisation
    assert 30522 <= math.prod(f) <= 30522 * 1.01 and max(f) <= 47
    lay = layout(384, 1536)
    assert lay.out_factors == (6, 8, 8) and lay.in_factors == (8, 12, 16)
    assert lay.bond_max() == (48, 128) and lay.full_rank() == 128 and lay.ranks(64) == (1, 48, 64, 1)


# ------------------------------------------------------------------------------------ TT-SVD


@pytest.mark.parametrize("shape,rank", [((32, 32), 3), ((64, 32), 5), ((48, 96), 8)])
def test_tt_svd_reconstructs_a_random_low_tt_rank_matrix_exactly_at_its_rank(shape, rank):
    w, _ = _random_tt(shape, rank)
    lay = layout(*shape)
    cores = tt.tt_svd(w, rank, lay)
    assert [tuple(c.shape) for c in cores] == list(lay.core_shapes(rank))
    err = (tt.tt_full(cores, lay) - w).norm() / w.norm()
    assert err < 1e-12
    # one rank less loses something: the matrix's TT rank is exactly ``rank``
    lower = tt.tt_full(tt.tt_svd(w, rank - 1, lay), lay)
    assert (lower - w).norm() / w.norm() > 1e-3


def test_tt_svd_at_full_rank_is_exact_for_any_matrix_even_padded():
    w = torch.randn(37, 20, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    lay = layout(37, 20)
    assert lay.padded != (37, 20)
    cores = tt.tt_svd(w, lay.full_rank(), lay)
    assert (tt.tt_full(cores, lay) - w).abs().max() < 1e-12


@pytest.mark.parametrize("shape", [(32, 32), (37, 20), (384, 96)])
def test_the_tt_forward_equals_the_reconstructed_matrix_forward(shape):
    w = torch.randn(*shape, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    lay = layout(*shape)
    cores = tt.tt_svd(w, 6, lay)
    full = tt.tt_full(cores, lay)
    x = torch.randn(3, 5, shape[1], dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    assert torch.allclose(tt.tt_matmul(x, cores, lay), x @ full.T, atol=1e-12, rtol=0)
    idx = torch.tensor([[0, shape[0] - 1, 3], [7, 7, 1]])
    assert torch.allclose(tt.tt_rows(idx, cores, lay), full[idx], atol=1e-12, rtol=0)
    bias = torch.randn(shape[0], dtype=torch.float64)
    lin = tt.TTLinear(cores, lay, bias)
    assert torch.allclose(lin(x), x @ full.T + bias, atol=1e-12, rtol=0)


def test_quantized_cores_are_each_core_quantized_per_row_of_its_matrix():
    w = torch.randn(32, 64, generator=torch.Generator().manual_seed(4))
    cores = tt.tt_svd(w, 8)
    q = tt.quantize_cores(cores, 4, symmetric=False)
    for c, qc in zip(cores, q, strict=True):
        r0, m, n, r1 = c.shape
        assert torch.equal(qc.reshape(r0 * m, n * r1), quant.fake_quantize(c.reshape(r0 * m, n * r1), 4, symmetric=False))
    assert all(torch.equal(a, b) for a, b in zip(tt.quantize_cores(cores, 32), cores, strict=True))
    with pytest.raises(InvalidInputError):
        tt.quantize_cores(cores, 0)


# ------------------------------------------------------------------------------------ cost


def _one_matrix_space(shape: tuple[int, int], opts: tuple[BitOption, ...]) -> SearchSpace:
    m = Member("lin", shape, "all")
    g = Group("lin", "layer", (m,), 0, "lin", None, shape[0] * shape[1], shape[0])
    return SearchSpace((g,), (tuple(sorted(set(opts) | {BitOption(32)})),))


def test_the_cost_model_counts_the_cores_exact_bytes_scales_and_tt_macs():
    shape = (384, 1536)
    lay = layout(*shape)  # (6, 8, 8) x (8, 12, 16); rank 16: ranks (1, 16, 16, 1)
    shapes = [(1, 6, 8, 16), (16, 8, 12, 16), (16, 8, 16, 1)]
    assert list(lay.core_shapes(16)) == shapes
    params = [math.prod(s) for s in shapes]
    rows = [s[0] * s[1] for s in shapes]
    o4, o3a, o16 = BitOption(4, True, None, tt_rank=16), BitOption(3, False, None, tt_rank=16), BitOption(16, True, None, tt_rank=16)
    assert tt_core_bytes(shape, o4) == sum(math.ceil(p * 4 / 8) + 2 * r for p, r in zip(params, rows, strict=True))
    assert tt_core_bytes(shape, o3a) == sum(math.ceil(p * 3 / 8) + 3 * r for p, r in zip(params, rows, strict=True))
    assert tt_core_bytes(shape, o16) == 2 * sum(params)
    space = _one_matrix_space(shape, (o4, o3a, o16, BitOption(4)))
    cm = CostModel(space, seq_len=10, act_bits=8)
    g = space.groups[0]
    c4 = cm.option_cost(g, o4)
    assert c4["size_bytes"] == weight_bytes(g, o4) == tt_core_bytes(shape, o4)
    assert c4["avg_bits"] == pytest.approx(sum(params) * 4 / (384 * 1536))
    # the last core first: (n1 n2) n3 r3 r2 m3, then n1 n2 r2 r1 m2 (m3), then n1 r1 r0 m1 (m2 m3)
    macs = (8 * 12) * 16 * 1 * 16 * 8 + 8 * 12 * 16 * 16 * 8 * 8 + 8 * 16 * 1 * 6 * (8 * 8)
    assert lay.macs_per_token(16) == macs
    assert c4["bops"] == 10 * macs * 4 * 8
    assert cm.option_cost(g, o16)["bops"] == 10 * macs * 16 * 16


def test_a_rank_above_the_full_tt_rank_or_on_a_slice_is_refused_with_the_field():
    with pytest.raises(InvalidInputError) as e:
        _one_matrix_space((32, 32), (BitOption(4, True, None, tt_rank=17),))
    assert e.value.field == "space.tt_ranks" and "full TT rank 16" in e.value.message
    m = Member("lin", (32, 32), "out", 0, 16)
    g = Group("lin/head0", "head", (m,), 0, "lin", 0, 512, 0)
    with pytest.raises(InvalidInputError) as e:
        SearchSpace((g,), ((BitOption(4, True, None, tt_rank=4), BitOption(32)),))
    assert e.value.field == "space.tt_ranks" and "whole matri" in e.value.message
    with pytest.raises(InvalidInputError) as e:
        SearchOptions(tt_ranks=(8, 0))
    assert e.value.field == "space.tt_ranks.1"
    with pytest.raises(InvalidInputError) as e:
        SearchOptions(methods=("dnas",), tt_ranks=(8,))
    assert e.value.field == "space.tt_ranks"


def test_tt_options_read_write_and_name_their_rank():
    o = BitOption.parse("tt16@4a")
    assert o == BitOption(4, False, None, tt_rank=16) and o.key() == "tt16@4a" and o.is_tt and not o.is_integer
    assert o.to_dict() == {"bits": 4, "symmetric": False, "group_size": None, "act_bits": None, "tt_rank": 16}
    assert BitOption.parse({"bits": 4, "symmetric": False, "tt_rank": 16}) == o
    assert BitOption.parse({"bits": 4, "tt_rank": None}) == BitOption(4)
    assert not BitOption(32, True, None, tt_rank=8).unchanged and BitOption(32).unchanged
    pmap = PrecisionMap({"a": "tt8@32", "b": 4})
    assert PrecisionMap.from_dict(pmap.to_dict()) == pmap and pmap["a"].tt_rank == 8


# ------------------------------------------------------------------------------------ the search


@pytest.fixture(scope="module")
def tt_search(trained_bert, sentiment_file):
    data = DataOptions(source=str(sentiment_file), label_field="label", calibration=32, evaluation=32,
                       max_length=16, batch_size=16)
    opts = SearchOptions(methods=("kl", "hessian", "fisher"), bits=(2, 4, 8), tt_ranks=(4, 8), front_points=6,
                         method_options={"hessian": {"max_probes": 4, "min_probes": 2, "calibrate": False}})
    return prepare(trained_bert, data, opts, device="cpu")


def test_tt_options_join_every_whole_matrix_group_whose_rank_fits(tt_search):
    s = tt_search
    want_tt = {BitOption(b, True, None, tt_rank=r) for r in (4, 8) for b in (2, 4, 8)}
    for g, opts in zip(s.space.groups, s.space.options, strict=True):
        assert {o for o in opts if o.is_tt} == want_tt, g.name
        assert {o for o in opts if not o.is_tt} == {BitOption(2), BitOption(4), BitOption(8), BitOption(32)}


def test_a_32_bit_full_rank_tt_option_scores_zero_and_others_score_their_reconstruction(tt_search):
    s = tt_search
    g = s.space.groups[0]
    full = layout(*g.members[0].shape).full_rank()
    opts = (BitOption(4), BitOption(4, True, None, tt_rank=2), BitOption(32, True, None, tt_rank=full))
    space = SearchSpace((g,), (tuple(sorted(set(opts) | {BitOption(32)})),))
    from search.methods import sensitivity_method
    from search.sensitivity import SensitivityContext

    ctx = SensitivityContext(s.model, s.adapter, space, s.task, s.calibration, s.device, 0, "mse")
    for method in ("kl", "fisher"):
        table = sensitivity_method(method, None).compute(ctx)
        row = table.scores[g.name]
        assert row["32"] == 0.0 and 0.0 <= row[f"tt{full}@32"] < 1e-6 * row["4"], method  # zero up to rounding
        assert row["tt2@4"] > row["4"] > 0, method  # rank 2 of a 32 x 32 matrix loses far more than 4 bits


def test_a_search_with_tt_ranks_gives_a_front_and_evaluates_tt_points_with_the_factorised_forward(tt_search):
    s = tt_search
    result = s.run()
    assert result.front
    tt_points = [p for p in result.points if any(o.is_tt for o in p.precision_map.values())]
    assert tt_points, "the allocator picked no tensor-train option"
    for p in result.points:
        assert p.cost == s.cost_model.cost(p.precision_map)
    p = tt_points[0]
    # inside the evaluation the TT groups are TT modules, and the model is restored afterwards
    seen = []
    with s.adapter.quantized(p.precision_map, s.space):
        for g in s.space.groups:
            if p.precision_map[g.name].is_tt:
                seen.append(isinstance(s.model.get_submodule(g.name), tt.TTLinear))
    assert seen and all(seen)
    assert all(isinstance(s.model.get_submodule(g.name), torch.nn.Linear) for g in s.space.groups)
    # the point's metrics are those of the model with the TT modules built by hand
    direct = copy.deepcopy(s.model)
    ad = ModelAdapter(direct)
    with torch.no_grad():
        for g in s.space.groups:
            opt = p.precision_map[g.name]
            w = ad.weight(g.name)
            if opt.is_tt:
                lay = layout(*w.shape)
                cores = tt.quantize_cores(tt.tt_svd(w, opt.tt_rank, lay), opt.bits, symmetric=opt.symmetric)
                ad.swap_module(g.name, tt.TTLinear(cores, lay, ad.bias(g.name)))
            elif not opt.unchanged:
                w.copy_(quant.fake_quantize(w, opt.bits, symmetric=opt.symmetric))
    assert evaluate(direct, s.evaluation, s.task, reference=s.reference()) == p.metrics


# ------------------------------------------------------------------------------------ export


@pytest.mark.parametrize("bits,symmetric", [(4, True), (3, False), (16, True), (32, True)])
def test_a_tt_artifact_round_trips_exactly_in_the_bytes_the_cost_model_counts(tmp_path, trained_bert, bits, symmetric):
    from safetensors import safe_open

    from search.export import (
        ARTIFACT_FILE,
        apply_precision_map,
        export_artifact,
        load_artifact,
        to_torchao_config,
    )
    from search.export.torchao import torchao_unsupported

    lm = load_model(trained_bert, "sequence_classification", num_labels=2)
    model = lm.model
    adapter = ModelAdapter(model, include_embeddings=True)
    space = adapter.build_space(bits=(4, 3, 16, 32), symmetric=symmetric, tt_ranks=(4, 8))
    emb = next(g for g in space.groups if g.block < 0)
    assert any(o.is_tt for o in space.options[space.index(emb.name)])
    tt_opt = BitOption(bits, symmetric, None, tt_rank=8)
    names = [g.name for g in space.groups]
    pmap = PrecisionMap({n: (tt_opt if i % 2 == 0 else BitOption(4)) for i, n in enumerate(names)})
    pmap = pmap.replace(**{emb.name: BitOption(bits, symmetric, None, tt_rank=4)})
    from search.data import TextData, TextExample, tokenize

    batches = tokenize(TextData([TextExample("good movie very nice", 1), TextExample("bad dull plot", 0)], ["n", "p"]),
                       lm.tokenizer, max_length=16, batch_size=2)
    ref = reference_outputs(model, batches, "sequence_classification")
    with adapter.quantized(pmap, space) as q:
        want_logits = q(**batches[0].model_inputs()).logits.clone()
        want_metrics = evaluate(q, batches, "sequence_classification", reference=ref)
        assert isinstance(q.get_submodule(emb.name), tt.TTEmbedding)
    export_artifact(model, space, pmap, tmp_path, verify=True)
    with safe_open(str(tmp_path / ARTIFACT_FILE), framework="pt") as f:
        nbytes = {k: f.get_tensor(k).numel() * f.get_tensor(k).element_size() for k in f.keys()}  # noqa: SIM118
    for g in space.groups:
        stored = sum(v for k, v in nbytes.items() if k.startswith(f"quant::{g.name}::"))
        assert stored == weight_bytes(g, pmap[g.name]), g.name
    loaded = load_artifact(tmp_path, load_model(trained_bert, "sequence_classification", num_labels=2).model)
    for g in space.groups:
        if pmap[g.name].is_tt:
            assert isinstance(loaded.get_submodule(g.name), (tt.TTLinear, tt.TTEmbedding)), g.name
    assert torch.equal(loaded(**batches[0].model_inputs()).logits, want_logits)
    assert evaluate(loaded, batches, "sequence_classification", reference=ref) == want_metrics
    # bitscout.apply of the map builds the same TT modules; torchao refuses the TT groups by name
    applied = apply_precision_map(load_model(trained_bert, "sequence_classification", num_labels=2).model, pmap,
                                  space=space)
    assert torch.equal(applied(**batches[0].model_inputs()).logits, want_logits)
    why = {line.split(": ", 1)[0]: line for line in torchao_unsupported(pmap, space)}
    assert all("tensor-train" in why[g.name] for g in space.groups if pmap[g.name].is_tt)
    assert not any(pmap[n].is_tt for n in to_torchao_config(pmap, space, build=False))


# ------------------------------------------------------------------------------------ TT-QAT


def test_tt_qat_starts_at_the_search_point_trains_cores_and_steps_and_exports_them_exactly(tt_search, tmp_path):
    from search.export import export_artifact, load_artifact
    from search.refine import RefineConfig, RefineParts, refine

    s = tt_search
    names = [g.name for g in s.space.groups]
    pmap = PrecisionMap({n: (BitOption(2, True, None, tt_rank=4) if i % 2 == 0 else BitOption(4)) for i, n in enumerate(names)})
    still = RefineConfig(steps=1, lr_weights=1e-30, lr_scales=1e-30, lr_cores=1e-30, kd_hidden=0.0, kd_attention=0.0,
                         eval_every=1)
    assert refine(s, pmap, config=still).metrics == s.evaluate(pmap)
    parts = RefineParts(s.model, s.space, s.task, s.evaluation, s.calibration, metric="kl")  # keep the best KL
    res = refine(parts, pmap, config=RefineConfig(steps=4, eval_every=2, patience=None, lr_cores=1e-2, lr_scales=1e-2),
                 train_batches=s.calibration, validation_batches=s.calibration[:1])
    assert res.best_step > 0 and res.history[-1]["loss"] < res.history[1]["loss"]
    assert set(res.tt_cores) == set(names[0::2])
    g0 = s.space.groups[0]
    start = tt.stored_cores(s.adapter.weight(g0.name).detach(), 4, 2)
    got = res.tt_cores[g0.name]
    assert got.qparams is not None and len(got.cores) == len(start.cores)
    assert any(not torch.equal(a, b) for a, b in zip(got.cores, start.cores, strict=True))  # the cores moved
    assert isinstance(res.model.get_submodule(g0.name), tt.TTLinear)
    # the result's cores are its model's cores, each exactly on its learned grid
    for a, qp, p in zip(got.cores, got.qparams, res.model.get_submodule(g0.name).cores, strict=True):
        mat = tt.core_matrix(a)
        assert torch.equal(a, p.detach()) and torch.equal(quant.dequantize(quant.quantize(mat, qp), qp), mat)
    path = export_artifact(res.model, s.space, pmap, tmp_path, qparams=res.qparams, tt_cores=res.tt_cores)
    loaded = load_artifact(path.parent, load_model(s.model_path, "sequence_classification", num_labels=2).model)
    b = s.evaluation[0]
    res.model.eval()
    with torch.no_grad():
        assert torch.equal(loaded(**b.model_inputs()).logits, res.model(**b.model_inputs()).logits)
    assert evaluate(loaded, s.evaluation, s.task, reference=s.reference()) == res.metrics
    # the refined artifact as a dense checkpoint plain transformers loads: the cores' dense matrices
    import transformers

    from search.export import export_stored

    export_stored("dense", path.parent, load_model(s.model_path, "sequence_classification", num_labels=2).model,
                  tmp_path / "dense")  # fmt: skip
    plain = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path / "dense",
                                                                              attn_implementation="eager")
    with torch.no_grad():
        torch.testing.assert_close(plain(**b.model_inputs()).logits, res.model(**b.model_inputs()).logits,
                                   rtol=1e-4, atol=1e-5)  # fmt: skip
