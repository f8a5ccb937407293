"""Refinement (KD + learned step sizes) on a real tiny classifier, the LSQ estimator, checkpoints."""

from __future__ import annotations

import inspect
import json

import pytest
import torch

from search import quant
from search.errors import CanceledError, InvalidInputError
from search.local import DataOptions, prepare
from search.pipeline import SearchOptions
from search.plan import Candidate
from search.refine import (
    CHECKPOINT_STATE,
    RefineConfig,
    RefineParts,
    lsq_fake_quantize,
    lsq_grad_scale,
    refine,
)
from search.space import BitOption, PrecisionMap

PRUNED = BitOption(0)


@pytest.fixture(scope="module")
def search(trained_bert, sentiment_file):
    data = DataOptions(
        source=str(sentiment_file), label_field="label", calibration=96, evaluation=96, max_length=16, batch_size=16
    )
    opts = SearchOptions(granularity="group", bits=(0, 2, 3, 4, 8), ffn_block_size=16)
    s = prepare(trained_bert, data, opts, device="cpu")
    s.baseline()  # the reference outputs are those of the full-precision model
    return s


def _hurting_map(search) -> PrecisionMap:
    """2 bits everywhere and 3 of the 4 heads of every block pruned: post-training quantization loses
    several points of accuracy on the tiny classifier."""
    space = search.space
    pruned = {g.name: PRUNED for g in space.groups if g.kind == "head" and g.index < 3}
    return space.uniform(2).replace(**pruned)


def _validation(search):
    # early stopping selects on other batches than the ones the result is reported on
    return search.calibration[: len(search.calibration) // 2]


def _train(search):
    return search.calibration[len(search.calibration) // 2 :]


def _weights(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


# ------------------------------------------------------------------------------------- accuracy
def test_refinement_beats_post_training_quantization_and_keeps_map_and_costs(search):
    pmap = _hurting_map(search)
    point = search.evaluate_candidate(Candidate(pmap, "kl", label="budget"))
    ptq = point.metrics["accuracy"]
    assert ptq < search.baseline()["accuracy"] - 0.03  # the map clearly hurts
    teacher_before = _weights(search.model)

    cfg = RefineConfig(steps=30, lr_weights=1e-3, lr_scales=1e-3, eval_every=10, patience=None, seed=3)
    res = refine(search, pmap, config=cfg, train_batches=_train(search), validation_batches=_validation(search))

    assert res.metrics["accuracy"] > ptq
    # the map and the costs never change; the point is marked refined
    assert res.precision_map == pmap
    refined = res.point(point)
    assert refined.refined and refined.label == "refined" and refined.method == point.method
    assert refined.precision_map == pmap
    assert refined.cost == point.cost == search.cost_model.cost(res.precision_map)
    assert refined.metrics == res.metrics
    # the teacher is untouched
    after = _weights(search.model)
    assert all(torch.equal(teacher_before[k], after[k]) for k in teacher_before)
    # pruned slices and their biases are exactly zero; integer slices lie on the learned grids
    sd = res.state_dict
    n_pruned = n_int = 0
    for g in search.space.groups:
        opt = pmap[g.name]
        for i, m in enumerate(g.members):
            w = sd[f"{m.module}.weight"]
            block = w[m.start : m.stop] if m.axis == "out" else (w[:, m.start : m.stop] if m.axis == "in" else w)
            if opt.pruned:
                n_pruned += 1
                assert torch.count_nonzero(block) == 0
                if m.axis == "out":
                    assert torch.count_nonzero(sd[f"{m.module}.bias"][m.start : m.stop]) == 0
            elif opt.is_integer:
                n_int += 1
                qp = res.qparams[f"{g.name}::{i}"]
                assert torch.equal(qp.scale, qp.scale.half().float())
                assert torch.equal(quant.dequantize(quant.quantize(block, qp), qp), block)
    assert n_pruned and n_int
    # the step sizes moved away from the post-training scales
    moved = False
    for g in search.space.groups:
        if pmap[g.name].is_integer:
            m = g.members[0]
            w0 = search.adapter.member_slice(m).detach()
            ptq_scale = quant.choose_qparams(w0, 2, symmetric=True, clip="mse").scale
            moved |= not torch.equal(ptq_scale, res.qparams[f"{g.name}::0"].scale)
    assert moved
    # the refined model in the result is the state dict, and evaluates to the reported metrics
    from search.tasks import evaluate

    again = evaluate(res.model, search.evaluation, search.task, reference=search.reference())
    assert again == res.metrics


def test_step_zero_is_exactly_the_post_training_point(search):
    """The learned step sizes start from the post-training scales: with nothing trained (a learning rate
    too small to move a float16 scale or a weight), the student evaluates exactly like the search."""
    pmap = search.space.uniform(3)
    cfg = RefineConfig(steps=1, lr_weights=1e-30, lr_scales=1e-30, kd_hidden=0.0, kd_attention=0.0, eval_every=1)
    res = refine(search, pmap, config=cfg)
    assert res.initial_metrics == search.evaluate(pmap)
    assert res.metrics == search.evaluate(pmap)


def test_attention_distillation_switches_to_eager_and_back(search):
    model = search.model
    model.set_attn_implementation("sdpa")
    try:
        cfg = RefineConfig(steps=2, eval_every=2, kd_attention=1.0, lr_weights=1e-4)
        res = refine(search, _hurting_map(search), config=cfg)
        assert model.config._attn_implementation == "sdpa"
        assert not any("attention" in n for n in res.notes)
    finally:
        model.set_attn_implementation("eager")


# --------------------------------------------------------------------------------------- LSQ
def _lsq_case(symmetric: bool, bits: int):
    g = torch.Generator().manual_seed(0)
    w = torch.randn(4, 9, generator=g, dtype=torch.float64)
    w[0, 0], w[1, 1], w[2, 2] = 4.0, -4.0, 3.5  # clamped codes at both ends
    qp = quant.choose_qparams(w.float(), bits, symmetric=symmetric, clip="mse")
    step = qp.scale.double() * 0.9 + 1e-3  # away from float16 values and ties
    return w, step, qp.zero_point, qp.qmin, qp.qmax


@pytest.mark.parametrize("symmetric,bits", [(True, 3), (False, 2), (True, 2)])
def test_lsq_gradients_match_the_formula_and_finite_differences(symmetric, bits):
    w, step, zp, qmin, qmax = _lsq_case(symmetric, bits)
    n_per_row = w.shape[1]
    g = lsq_grad_scale(n_per_row, qmax)
    assert g == pytest.approx(1.0 / (n_per_row * qmax) ** 0.5)
    c = torch.randn(w.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)

    w_ = w.clone().requires_grad_(True)
    s_ = step.clone().requires_grad_(True)
    out = lsq_fake_quantize(w_, s_, zp, qmin, qmax, g, half_scales=False)
    (out * c).sum().backward()

    z = zp.double()[:, None]
    v = w / step[:, None]
    code = torch.round(v) + z
    low, high = code < qmin, code > qmax
    inside = ~(low | high)
    assert low.any() and high.any() and inside.any()
    # forward: the quantizer of search.quant with these scales
    expect = (code.clamp(qmin, qmax) - z) * step[:, None]
    torch.testing.assert_close(out.detach(), expect)
    # analytical LSQ gradients
    d_s = torch.where(inside, torch.round(v) - v, torch.where(low, qmin - z, qmax - z))
    torch.testing.assert_close(s_.grad, g * (c * d_s).sum(1))
    torch.testing.assert_close(w_.grad, c * inside.double())

    # finite differences of the straight-through surrogate: rounding offsets and clamped codes frozen
    # at the point (codes equal to qmin / qmax after rounding count as not clamped, as in LSQ)
    delta = torch.round(v) - v
    bound = torch.where(low, qmin - z, qmax - z)

    def surrogate(w_in, s_in):
        return torch.where(inside, w_in / s_in[:, None] + delta, bound) * s_in[:, None]

    eps = 1e-6
    for r in range(w.shape[0]):
        e = torch.zeros_like(step)
        e[r] = eps
        fd = ((surrogate(w, step + e) - surrogate(w, step - e)) * c).sum() / (2 * eps)
        assert float(s_.grad[r]) == pytest.approx(g * float(fd), rel=1e-6, abs=1e-9)
    for r, col in [(0, 0), (1, 1), (3, 4), (2, 5)]:
        e = torch.zeros_like(w)
        e[r, col] = eps
        fd = ((surrogate(w + e, step) - surrogate(w - e, step)) * c).sum() / (2 * eps)
        assert float(w_.grad[r, col]) == pytest.approx(float(fd), rel=1e-6, abs=1e-9)

    # the true quantizer is piecewise linear in s where no code flips: its derivative is the code
    # (q - z); LSQ adds the -w/s term of the rounding straight-through
    def true_q(s_in):
        return ((torch.round(w / s_in[:, None]) + z).clamp(qmin, qmax) - z) * s_in[:, None]

    for r in range(w.shape[0]):
        e = torch.zeros_like(step)
        e[r] = 1e-9
        fd = ((true_q(step + e) - true_q(step - e)) * c).sum() / 2e-9
        lsq = float(fd) - float((c * torch.where(inside, v, torch.zeros_like(v)))[r].sum())
        assert float(s_.grad[r]) == pytest.approx(g * lsq, rel=1e-5, abs=1e-9)


def test_lsq_forward_matches_the_post_training_quantizer():
    w = torch.randn(16, 24, generator=torch.Generator().manual_seed(2))
    for bits, sym in [(2, True), (3, False), (4, True)]:
        qp = quant.choose_qparams(w, bits, symmetric=sym)
        out = lsq_fake_quantize(w, qp.scale, qp.zero_point, qp.qmin, qp.qmax, 0.5)
        torch.testing.assert_close(out, quant.fake_quantize(w, bits, symmetric=sym), rtol=0, atol=1e-6)


def test_lsq_forward_rounds_the_steps_as_the_quantizer_rounds_those_of_the_weights_dtype():
    # A bfloat16 weight's steps are rounded to bfloat16 and float16 numbers (quant.round_scale), others to float16.
    w = torch.randn(16, 24, generator=torch.Generator().manual_seed(3))
    step = 0.3 / 7 + torch.linspace(0.0, 1e-3, 16)  # off both grids
    zero = torch.zeros(16, dtype=torch.int32)
    assert not torch.equal(quant.round_scale(step, torch.bfloat16), quant.round_scale(step))
    for dtype in (None, torch.float16, torch.bfloat16):
        qp = quant.QParams(quant.round_scale(step, dtype), zero, 4, True)
        out = lsq_fake_quantize(w, step, zero, qp.qmin, qp.qmax, 0.5, scale_dtype=dtype)
        torch.testing.assert_close(out, quant.dequantize(quant.quantize(w, qp), qp), rtol=0, atol=1e-6)


# ---------------------------------------------------------------------------------- checkpoints
def test_resuming_from_a_checkpoint_is_bit_identical_to_an_uninterrupted_run(search, tmp_path):
    pmap = _hurting_map(search)
    cfg = RefineConfig(steps=8, lr_weights=1e-3, lr_scales=1e-3, eval_every=2, checkpoint_every=3, patience=None, seed=5)
    kw = dict(config=cfg, train_batches=_train(search), validation_batches=_validation(search))
    straight = refine(search, pmap, **kw)
    assert straight.steps == 8 and straight.resumed_from is None

    folder = tmp_path / "ckpt"
    calls = {"n": 0}

    def stop_before_step_8() -> bool:
        calls["n"] += 1
        return calls["n"] > 7

    progress: list[tuple[str, float]] = []
    with pytest.raises(CanceledError):
        refine(search, pmap, checkpoint_dir=folder, should_stop=stop_before_step_8,
               on_progress=lambda stage, f, m: progress.append((stage, f)), **kw)
    assert [p[0] for p in progress] == ["refine"] * 7
    assert [p[1] for p in progress] == sorted(p[1] for p in progress)
    saved = sorted(p.name for p in folder.iterdir())
    assert saved == ["step-00000003", "step-00000006"]
    state = json.loads((folder / "step-00000006" / CHECKPOINT_STATE).read_text())
    assert state["step"] == 6 and "fingerprint" in state
    assert not list(folder.rglob("*.pt")) and not list(folder.rglob("*.bin"))

    resumed = refine(search, pmap, checkpoint_dir=folder, **kw)
    assert resumed.resumed_from == 6 and resumed.steps == 8
    assert resumed.metrics == straight.metrics
    assert resumed.best_step == straight.best_step
    assert resumed.history == straight.history
    assert resumed.state_dict.keys() == straight.state_dict.keys()
    for k, v in straight.state_dict.items():
        assert torch.equal(v, resumed.state_dict[k]), k
    for k, qp in straight.qparams.items():
        assert torch.equal(qp.scale, resumed.qparams[k].scale)

    # a checkpoint of another map is refused
    with pytest.raises(InvalidInputError) as err:
        refine(search, search.space.uniform(4), checkpoint_dir=folder, **kw)
    assert err.value.field == "checkpoint_dir"


def test_early_stopping_keeps_the_best_state(search):
    pmap = _hurting_map(search)
    cfg = RefineConfig(steps=40, lr_weights=3e-2, lr_scales=3e-2, eval_every=2, patience=2, seed=1)
    res = refine(search, pmap, config=cfg, train_batches=_train(search), validation_batches=_validation(search))
    keys = [(h["metrics"]["accuracy"], -h["metrics"]["kl"]) for h in res.history]
    best = max(range(len(keys)), key=lambda i: (keys[i], -i))
    assert res.history[best]["step"] == res.best_step
    if res.stopped_early:
        assert res.steps < 40
        later = [k for h, k in zip(res.history, keys, strict=True) if h["step"] > res.best_step]
        assert len(later) == 2 and all(k <= keys[best] for k in later)


# ------------------------------------------------------------------------------------- inputs
@pytest.mark.parametrize(
    "kwargs,field",
    [
        ({"steps": 0}, "steps"),
        ({"steps": 2.5}, "steps"),
        ({"lr_weights": 0.0}, "lr_weights"),
        ({"lr_scales": float("nan")}, "lr_scales"),
        ({"temperature": -1.0}, "temperature"),
        ({"kd_hidden": -0.1}, "kd_hidden"),
        ({"kd_logits": 0.0, "kd_hidden": 0.0, "kd_attention": 0.0, "task": 0.0}, "kd_logits"),
        ({"patience": 0}, "patience"),
        ({"eval_every": True}, "eval_every"),
        ({"checkpoint_every": -3}, "checkpoint_every"),
        ({"seed": -1}, "seed"),
        ({"schedule": "cosine"}, "schedule"),
        ({"float_groups": "drop"}, "float_groups"),
        ({"accumulate": 0}, "accumulate"),
    ],
)
def test_bad_configs_name_the_field(kwargs, field):
    with pytest.raises(InvalidInputError) as err:
        RefineConfig(**kwargs)
    assert err.value.field == field


def test_bad_maps_and_parts_are_refused(search):
    with pytest.raises(InvalidInputError) as err:
        refine(search, {"no.such/group": 2}, config=RefineConfig(steps=1))
    assert err.value.field == "precision_map"
    head = next(g for g in search.space.groups if g.kind == "head")
    with pytest.raises(InvalidInputError) as err:
        refine(search, {head.name: 6}, config=RefineConfig(steps=1))
    assert err.value.field == "precision_map"
    with pytest.raises(InvalidInputError) as err:
        refine(object(), {}, config=RefineConfig(steps=1))
    assert err.value.field == "search"
    with pytest.raises(InvalidInputError) as err:
        RefineConfig.from_dict({"stepz": 3})
    assert err.value.field == "refine"
    parts = RefineParts(search.model, search.space, search.task, search.evaluation)
    with pytest.raises(InvalidInputError) as err:
        refine(parts, {}, config=RefineConfig(steps=1))
    assert err.value.field == "train_batches"


# ------------------------------------------------------------------------------------- export
def test_export_of_a_refined_point_reloads_to_the_same_metric(search, tmp_path):
    export = pytest.importorskip("search.export")
    if "qparams" not in inspect.signature(export.export_artifact).parameters:
        pytest.skip("search.export.export_artifact takes no learned qparams yet")
    from search.tasks import evaluate, load_model

    pmap = _hurting_map(search)
    cfg = RefineConfig(steps=6, lr_weights=1e-3, lr_scales=1e-3, eval_every=3, patience=None)
    res = refine(search, pmap, config=cfg)
    path = export.export_artifact(res.model, search.space, pmap, tmp_path / "art", qparams=res.qparams)
    fresh = load_model(search.model_path, search.task).model
    loaded = export.load_artifact(path, fresh)
    got = evaluate(loaded, search.evaluation, search.task, reference=search.reference())
    assert got == res.metrics
    for k, v in res.state_dict.items():
        assert torch.equal(loaded.state_dict()[k], v), k


def test_export_qparams_override_is_checked_and_post_training_qparams_change_nothing(search, tmp_path):
    export = pytest.importorskip("search.export")
    if "qparams" not in inspect.signature(export.export_artifact).parameters:
        pytest.skip("search.export.export_artifact takes no learned qparams yet")
    from safetensors.torch import load_file

    space, model = search.space, search.model
    pmap = _hurting_map(search)
    ptq = {}
    for g in space.groups:
        if pmap[g.name].is_integer:
            for i, m in enumerate(g.members):
                ptq[f"{g.name}::{i}"] = quant.choose_qparams(search.adapter.member_slice(m).detach(), 2, symmetric=True)
    plain = load_file(str(export.export_artifact(model, space, pmap, tmp_path / "plain")))
    same = load_file(str(export.export_artifact(model, space, pmap, tmp_path / "same", qparams=ptq)))
    assert plain.keys() == same.keys() and all(torch.equal(plain[k], same[k]) for k in plain)

    key = next(iter(ptq))
    qp = ptq[key]
    bad = {
        "no.such/group::0": qp,
        key: quant.QParams(qp.scale, qp.zero_point, 3, True),
    }
    for k, v in bad.items():
        with pytest.raises(InvalidInputError) as err:
            export.export_artifact(model, space, pmap, tmp_path / "bad", qparams={k: v})
        assert err.value.field == "qparams"
    with pytest.raises(InvalidInputError) as err:
        export.export_artifact(model, space, pmap, tmp_path / "bad", qparams={key: quant.QParams(qp.scale + 1e-4, qp.zero_point, 2, True)})
    assert err.value.field == "qparams"
    pruned = next(g.name for g in space.groups if pmap[g.name].pruned)
    with pytest.raises(InvalidInputError) as err:
        export.export_artifact(model, space, pmap, tmp_path / "bad", qparams={f"{pruned}::0": qp})
    assert err.value.field == "qparams"
    with pytest.raises(InvalidInputError) as err:
        export.export_artifact(model, space, pmap, tmp_path / "bad", qparams=ptq, verify=True)
    assert err.value.field == "verify"


def test_tied_weights_in_the_space_are_refused(tmp_path, sentiment_file):
    from tests.tiny import build_model

    folder = build_model(tmp_path / "gpt2", "gpt2", task="causal_lm")
    data = DataOptions(source=str(sentiment_file), calibration=8, evaluation=8, max_length=12, batch_size=8)
    s = prepare(folder, data, SearchOptions(bits=(2, 4), include_embeddings=True), task="causal_lm", device="cpu")
    with pytest.raises(InvalidInputError) as err:
        refine(s, s.space.uniform(4), config=RefineConfig(steps=1))
    assert err.value.field == "include_embeddings"
    # without the tied embedding the causal LM refines (its perplexity is the metric)
    s = prepare(folder, data, SearchOptions(bits=(2, 4)), task="causal_lm", device="cpu")
    res = refine(s, s.space.uniform(2), config=RefineConfig(steps=2, eval_every=1, lr_weights=1e-3, lr_scales=1e-3))
    assert res.metric == "perplexity" and res.steps == 2 and "perplexity" in res.metrics
