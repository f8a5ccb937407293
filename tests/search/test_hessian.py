"""Hessian-trace sensitivity: Hutchinson traces against exact Hessians, the per-group stop rule,
reproducibility, the model left as found (attention implementation included), and the scores."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from search.adapter import ModelAdapter
from search.data import TextData, TextExample, load_text_data, tokenize
from search.errors import CanceledError, InvalidInputError
from search.hessian import HessianSensitivity
from search.methods import sensitivity_method
from search.quant import quant_error
from search.sensitivity import SensitivityContext, calibration_factors
from search.tasks import evaluate, load_model, reference_outputs
from tests.tiny import build_model, sentiment_rows, train_classifier

TINY = {"layers": 1, "hidden": 8, "heads": 2, "intermediate": 16}


@pytest.fixture(scope="session")
def tiny_cls(tiny_root) -> Path:
    """A one-layer, hidden-8 BERT classifier trained part way (mean loss about 0.14 on the test rows):
    an untrained one sits at log 2 with near-zero curvature, a converged one at near-zero loss."""
    folder = build_model(tiny_root / "hess-bert-cls", "bert", **TINY)
    return train_classifier(folder, sentiment_rows(200, seed=3), steps=30, lr=1e-2)


def _train_lm(folder: Path, *, steps: int = 60, lr: float = 1e-2) -> Path:
    """A few next-token steps on the synthetic sentences (a random LM's curvature is near 0)."""
    torch.manual_seed(0)
    lm = load_model(folder, "causal_lm")
    data = TextData([TextExample(str(r["text"]), None) for r in sentiment_rows(200, seed=3)], None)
    batches = tokenize(data, lm.tokenizer, max_length=16, batch_size=16)
    model = lm.model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    for step in range(steps):
        b = batches[step % len(batches)]
        labels = b.input_ids.masked_fill(b.attention_mask == 0, -100)
        loss = model(input_ids=b.input_ids, attention_mask=b.attention_mask, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval().save_pretrained(str(folder))
    return folder


@pytest.fixture(scope="session")
def tiny_models(tiny_root, tiny_cls) -> dict[tuple[str, str], Path]:
    return {
        ("bert", "sequence_classification"): tiny_cls,
        ("bert", "embeddings"): build_model(tiny_root / "hess-bert-emb", "bert", task="embeddings", **TINY),
        ("llama", "causal_lm"): _train_lm(
            build_model(tiny_root / "hess-llama", "llama", task="causal_lm", **TINY)
        ),
        ("gpt2", "causal_lm"): _train_lm(
            build_model(tiny_root / "hess-gpt2", "gpt2", task="causal_lm", **TINY)
        ),
    }


def _ctx(folder, task, data_file, granularity, *, include=None, n=16, batch_size=8, seed=0, **load_kw):
    lm = load_model(folder, task, num_labels=2, **load_kw)
    labelled = task == "sequence_classification"
    data = load_text_data(data_file, label_field="label" if labelled else None, limit=n)
    batches = tokenize(data, lm.tokenizer, max_length=12, batch_size=batch_size)
    ad = ModelAdapter(lm.model, include=include)
    space = ad.build_space(granularity=granularity, bits=(0, 2, 3, 4, 8, 16), ffn_block_size=8)
    return SensitivityContext(lm.model, ad, space, task, batches, seed=seed)


# ------------------------------------------------------------------------------ exact Hessian


def _exact_block_traces(ctx: SensitivityContext) -> dict[str, float]:
    """Exact trace of every group's diagonal Hessian block, with torch.autograd.functional.hessian
    over the flattened group parameters, of the loss written here independently of search.hessian."""
    H, ids = _exact_hessian(ctx)
    out = {}
    for g in ctx.space.groups:
        out[g.name] = sum(float(H[i, i].sum()) for i in (ids(p, idx).reshape(-1) for p, idx in ctx.adapter.group_params(g)))
    return out


def _exact_hessian(ctx: SensitivityContext):
    """The exact Hessian over the groups' parameters and ``ids(p, idx)``: the flat indices of
    ``p[idx]`` (in ``p``'s own layout, the shape of the block)."""
    model, ad, task = ctx.model, ctx.adapter, ctx.task
    params: list[torch.nn.Parameter] = []
    for g in ctx.space.groups:
        for p, _ in ad.group_params(g):
            if all(p is not q for q in params):
                params.append(p)
    name_of = {id(p): n for n, p in model.named_parameters()}
    offsets, off = {}, 0
    for p in params:
        offsets[id(p)] = off
        off += p.numel()
    assert off <= 600, "keep the exact Hessian small"
    flat0 = torch.cat([p.detach().reshape(-1) for p in params])
    model.eval()
    with torch.no_grad():
        refs = [model(input_ids=b.input_ids, attention_mask=b.attention_mask) for b in ctx.batches]

    def loss(flat: torch.Tensor) -> torch.Tensor:
        weights, o = {}, 0
        for p in params:
            weights[name_of[id(p)]] = flat[o : o + p.numel()].view(p.shape)
            o += p.numel()
        total, count = flat.new_zeros(()), 0
        for b, ref in zip(ctx.batches, refs, strict=True):
            kw = {"input_ids": b.input_ids, "attention_mask": b.attention_mask}
            if task == "causal_lm":
                kw["use_cache"] = False
            out = torch.func.functional_call(model, weights, args=(), kwargs=kw)
            if task == "sequence_classification":
                total = total + F.cross_entropy(out.logits, b.labels, reduction="sum")
                count += len(b)
            elif task == "causal_lm":
                logits, target, mask = out.logits[:, :-1], b.input_ids[:, 1:], b.attention_mask[:, 1:]
                nll = F.cross_entropy(
                    logits.reshape(-1, logits.shape[-1]), target.reshape(-1), reduction="none"
                )
                total = total + (nll * mask.reshape(-1)).sum()
                count += int(mask.sum())
            else:  # embeddings: 1 - cosine of the mean-pooled embedding to the fixed reference
                m = b.attention_mask.unsqueeze(-1).float()
                emb = (out.last_hidden_state * m).sum(1) / m.sum(1)
                ref_emb = (ref.last_hidden_state * m).sum(1) / m.sum(1)
                total = total + (1 - F.cosine_similarity(ref_emb.double(), emb.double(), dim=-1)).sum()
                count += len(b)
        return total / count

    H = torch.autograd.functional.hessian(loss, flat0)

    def ids(p: torch.Tensor, idx) -> torch.Tensor:
        return torch.arange(p.numel()).view(p.shape)[idx] + offsets[id(p)]

    return H, ids


@pytest.mark.parametrize(
    "arch,task,granularity,include,tol",
    [
        ("bert", "sequence_classification", "layer", ["*attention*"], 0.1),
        ("bert", "sequence_classification", "group", None, 0.05),
        ("bert", "embeddings", "layer", ["*attention*"], 0.05),
        ("llama", "causal_lm", "group", None, 0.05),
        ("gpt2", "causal_lm", "layer", None, 0.05),
    ],
)
def test_traces_match_the_exact_hessian(tiny_models, sentiment_file, arch, task, granularity, include, tol):
    ctx = _ctx(tiny_models[(arch, task)], task, sentiment_file, granularity, include=include)
    if granularity == "group":
        assert {g.kind for g in ctx.space.groups} == {"head", "ffn"}
    exact = _exact_block_traces(ctx)
    table = HessianSensitivity(tolerance=tol, max_probes=400).compute(ctx)
    traces, se = table.extra["traces"], table.extra["trace_se"]
    assert set(traces) == set(exact) == set(table.errors)
    for name, ex in exact.items():
        est = traces[name]
        # the reported standard error is honest: the exact trace lies within ~3 of them
        assert abs(est - ex) <= 3.5 * se[name] + 1e-9, (name, est, ex, se[name])
        assert table.errors[name] == pytest.approx(se[name] / abs(est))
        if table.errors[name] < tol:
            # and where the stop rule was met, the relative error is small
            assert abs(est - ex) <= 3.5 * tol * abs(ex), (name, est, ex)
    if task == "sequence_classification":
        # a trained classifier: every group reached the tolerance (within max_probes)
        assert table.extra["stopped"] == "tolerance", (
            list(table.errors.values()),
            table.extra["probes_per_batch"],
        )
        assert max(table.errors.values()) < tol
    if task == "embeddings":
        # self-distillation: the Hessian at the reference is the Gauss-Newton matrix, PSD
        assert all(v > 0 for v in exact.values())


# ------------------------------------------------------------------------------ stop rule


def test_stop_rule_per_group(tiny_cls, sentiment_file):
    ctx = _ctx(tiny_cls, "sequence_classification", sentiment_file, "layer", include=["*attention*"])
    loose = HessianSensitivity(tolerance=0.3, min_probes=4, max_probes=1000).compute(ctx)
    tight = HessianSensitivity(tolerance=0.1, min_probes=4, max_probes=1000).compute(ctx)
    for t, tol in ((loose, 0.3), (tight, 0.1)):
        e = t.extra
        assert e["stopped"] == "tolerance"
        assert all(err < tol for err in t.errors.values())
        assert all(n >= 4 for n in e["probes_per_batch"])
        assert e["hvps"] == sum(e["probes_per_batch"]) == t.samples
        assert e["graph_builds"] >= len(ctx.batches)
        assert e["seconds_hvp"] > 0 and e["seconds"] >= e["seconds_hvp"]
    assert tight.extra["hvps"] > 2 * loose.extra["hvps"]
    # unreachable: stops at max_probes on every batch, and says so
    capped = HessianSensitivity(tolerance=1e-4, min_probes=3, max_probes=10).compute(ctx)
    assert capped.extra["stopped"] == "max_probes"
    assert capped.extra["probes_per_batch"] == [10] * len(ctx.batches)
    assert capped.extra["graph_builds"] == len(ctx.batches)  # one graph per batch, reused by all its probes
    assert max(capped.errors.values()) >= 1e-4
    # min_probes is a floor even when the tolerance is met at once
    easy = HessianSensitivity(tolerance=1e6, min_probes=5, max_probes=10).compute(ctx)
    assert easy.extra["probes_per_batch"] == [5] * len(ctx.batches)
    assert easy.extra["stopped"] == "tolerance"


def test_seeded_runs_are_identical(tiny_cls, sentiment_file):
    ctx = _ctx(tiny_cls, "sequence_classification", sentiment_file, "group")
    a = HessianSensitivity(tolerance=0.2, max_probes=30).compute(ctx).to_dict()
    b = HessianSensitivity(tolerance=0.2, max_probes=30).compute(ctx).to_dict()
    for t in (a, b):
        for k in [k for k in t["extra"] if k.startswith("seconds")]:
            del t["extra"][k]
    assert a == b
    ctx.seed = 1
    c = HessianSensitivity(tolerance=0.2, max_probes=30).compute(ctx)
    assert c.extra["traces"] != a["extra"]["traces"]


# ------------------------------------------------------------------------------ model left as found


def test_model_left_as_found_and_user_attention_restored(tiny_cls, sentiment_file):
    ctx = _ctx(tiny_cls, "sequence_classification", sentiment_file, "group", attn_implementation="sdpa")
    model = ctx.model
    assert model.config._attn_implementation == "sdpa"
    # a user's own flags and modes: part of the model frozen, train mode with one module in eval
    for n, p in model.named_parameters():
        p.requires_grad_(not ("key" in n or "embeddings" in n))
    model.train()
    model.bert.encoder.layer[0].attention.eval()
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    modes = {n: m.training for n, m in model.named_modules()}
    before = {k: v.clone() for k, v in model.state_dict().items()}

    table = HessianSensitivity(tolerance=0.2, max_probes=20).compute(ctx)
    assert table.extra["switched_to_eager"] is True
    assert table.extra["attn_implementation"] == "sdpa"
    assert model.config._attn_implementation == "sdpa"
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert {n: m.training for n, m in model.named_modules()} == modes
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(p.grad is None for p in model.parameters())

    # the same after a cancellation mid-way
    calls = {"n": 0}

    def stop() -> bool:
        calls["n"] += 1
        return calls["n"] > 5

    with pytest.raises(CanceledError):
        HessianSensitivity(tolerance=0.01).compute(ctx, should_stop=stop)
    assert model.config._attn_implementation == "sdpa"
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert {n: m.training for n, m in model.named_modules()} == modes
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())

    # eager models are not touched, and give the same traces as the switched sdpa model
    eager = _ctx(tiny_cls, "sequence_classification", sentiment_file, "group")
    assert eager.model.config._attn_implementation == "eager"
    t2 = HessianSensitivity(tolerance=0.2, max_probes=20).compute(eager)
    assert t2.extra["switched_to_eager"] is False
    for name, v in t2.extra["traces"].items():
        assert table.extra["traces"][name] == pytest.approx(v, rel=1e-4, abs=1e-9)


def test_model_that_cannot_switch_attention_runs_on_the_math_sdpa_backend(
    tiny_cls, sentiment_file, monkeypatch
):
    ctx = _ctx(tiny_cls, "sequence_classification", sentiment_file, "layer", attn_implementation="sdpa")
    monkeypatch.setattr(ctx.model, "set_attn_implementation", lambda *a, **k: None)  # a model that refuses
    table = HessianSensitivity(tolerance=0.2, max_probes=20).compute(ctx)
    assert table.extra["sdpa_math"] is True and table.extra["switched_to_eager"] is False
    assert ctx.model.config._attn_implementation == "sdpa"
    eager = _ctx(tiny_cls, "sequence_classification", sentiment_file, "layer")
    ref = HessianSensitivity(tolerance=0.2, max_probes=20).compute(eager)
    for name, v in ref.extra["traces"].items():
        assert table.extra["traces"][name] == pytest.approx(v, rel=1e-4, abs=1e-9)


# ------------------------------------------------------------------------------ scores


def test_scores_grow_as_bits_shrink(tiny_cls, sentiment_file):
    ctx = _ctx(tiny_cls, "sequence_classification", sentiment_file, "group")
    table = HessianSensitivity(tolerance=0.2, max_probes=40, weighting="trace", calibrate=False).compute(ctx)
    assert table.method == "hessian"
    assert table.extra["calibration"] == {"applied": False}
    rows = HessianSensitivity(tolerance=0.2, max_probes=40).compute(ctx)
    assert rows.extra["weighting"] == "rows"  # the default
    assert rows.extra["traces"] == table.extra["traces"]  # the same probes, only the weighting differs
    for g in ctx.space.groups:
        chain = [rows.scores[g.name][k] for k in ("0", "2", "3", "4", "8", "16", "32")]
        assert all(a > b for a, b in zip(chain, chain[1:], strict=False)), (g.name, chain)
    for g, opts in zip(ctx.space.groups, ctx.space.options, strict=True):
        row = table.scores[g.name]
        assert set(row) == {o.key() for o in opts}
        assert row["32"] == 0.0
        assert all(v >= 0 for v in row.values())
        mean_trace = table.extra["mean_traces"][g.name]
        assert mean_trace == max(0.0, table.extra["traces"][g.name]) / g.n_params
        chain = [row[k] for k in ("0", "2", "3", "4", "8", "16", "32")]
        if mean_trace > 0:
            assert all(a > b for a, b in zip(chain, chain[1:], strict=False)), (g.name, chain)
        else:
            assert all(v == 0 for v in chain)
        # HAWQ-V2: mean trace x squared quantization error of the group's slices
        err4 = sum(quant_error(ctx.adapter.member_slice(m), 4, clip=ctx.clip) for m in g.members)
        assert row["4"] == pytest.approx(mean_trace * err4, rel=1e-9)
        w2 = sum(float(ctx.adapter.member_slice(m).detach().double().square().sum()) for m in g.members)
        assert row["0"] == pytest.approx(mean_trace * w2, rel=1e-6)


def test_progress_registry_and_options(tiny_cls, sentiment_file):
    ctx = _ctx(tiny_cls, "sequence_classification", sentiment_file, "layer", include=["*attention*"])
    seen = []
    method = sensitivity_method("hessian", {"tolerance": 0.2, "max_probes": 30})
    assert isinstance(method, HessianSensitivity)
    method.compute(ctx, on_progress=lambda s, f, m: seen.append((s, f)))
    assert seen[-1] == ("sensitivity:hessian", 1.0)
    fractions = [f for _, f in seen]
    assert fractions == sorted(fractions) and all(0 <= f <= 1 for f in fractions)
    for bad in ({"tolerance": 0}, {"min_probes": 1}, {"max_probes": 4, "min_probes": 8}, {"margin": 0.5}):
        with pytest.raises(InvalidInputError):
            HessianSensitivity(**bad)
    assert np.isfinite(list(method.compute(ctx).errors.values())).all()


def test_reducers_sum_every_layout_into_its_groups():
    from search.hessian import _reducer

    p = torch.zeros(6, 4)
    full = _reducer(p, [(3, (slice(None), slice(None)))], 5)
    assert (full.kind, full.group) == ("full", 3)
    rows = _reducer(p, [(0, (slice(0, 2), slice(None))), (2, (slice(4, 6), slice(None)))], 5)
    assert rows.kind == "rows" and rows.index.tolist() == [0, 0, 5, 5, 2, 2]
    cols = _reducer(p, [(1, (slice(None), slice(1, 3))), (1, (slice(None), slice(3, 4)))], 5)
    assert cols.kind == "cols" and cols.index.tolist() == [5, 1, 1, 1]
    overlapping = _reducer(p, [(0, (slice(0, 3), slice(None))), (1, (slice(2, 4), slice(None)))], 5)
    mixed = _reducer(p, [(0, (slice(0, 3), slice(None))), (1, (slice(None), slice(0, 2)))], 5)
    assert overlapping.kind == mixed.kind == "blocks" and len(mixed.blocks) == 2


def test_block_by_block_reduction_gives_the_same_traces(tiny_cls, sentiment_file, monkeypatch):
    import search.hessian as hessian

    ctx = _ctx(tiny_cls, "sequence_classification", sentiment_file, "group")
    fast = HessianSensitivity(tolerance=0.5, min_probes=6, max_probes=6).compute(ctx)
    monkeypatch.setattr(
        hessian, "_reducer", lambda p, blocks, n: hessian._Reducer("blocks", blocks=tuple(blocks))
    )
    slow = HessianSensitivity(tolerance=0.5, min_probes=6, max_probes=6).compute(ctx)
    for name, v in fast.extra["traces"].items():
        assert slow.extra["traces"][name] == pytest.approx(v, rel=1e-5, abs=1e-12)


def test_a_negative_or_zero_trace_never_makes_a_group_free_to_quantize(tmp_path, sentiment_file):
    import numpy as np

    from search.hessian import TRACE_FLOOR
    from tests.search.test_sensitivity import _ctx
    from tests.tiny import build_model

    ctx = _ctx(build_model(tmp_path / "b", "bert", layers=1), "sequence_classification", sentiment_file, "layer")
    n = len(ctx.space.groups)
    trace = np.array([float(g.n_params) for g in ctx.space.groups])  # mean trace 1 everywhere
    trace[0], trace[1] = -5.0, 0.0
    method = sensitivity_method("hessian")
    scores = method._scores(ctx, trace)
    unit = method._scores(ctx, np.array([float(g.n_params) for g in ctx.space.groups]))
    assert n >= 3
    for name in (ctx.space.groups[0].name, ctx.space.groups[1].name):
        row = scores[name]
        assert row["2"] > row["4"] > row["8"] > 0  # floored at TRACE_FLOOR x the median (1 here), not 0
        for k, v in row.items():
            assert v == pytest.approx(TRACE_FLOOR * unit[name][k], rel=1e-9, abs=0)


# ------------------------------------------------------------------------------ finer weighting


@pytest.mark.parametrize(
    "arch,task,granularity",
    [("bert", "sequence_classification", "group"), ("gpt2", "causal_lm", "layer")],
)
def test_member_and_row_curvatures_match_the_exact_hessian_diagonal(tiny_models, sentiment_file, arch, task, granularity):
    """weighting="members"/"rows": the member traces (and rows) estimated from the same probes sum to the
    group's trace and match the exact diagonal of the Hessian (GPT-2 covers the transposed Conv1D layout)."""
    import search.hessian as hessian

    ctx = _ctx(tiny_models[(arch, task)], task, sentiment_file, granularity)
    H, ids = _exact_hessian(ctx)
    diag = torch.diagonal(H)
    captured = {}
    real = hessian.HessianSensitivity._scores

    def spy(self, ctx_, trace, plan=None, row_trace=None):
        captured.update(plan=plan, rows=row_trace)
        return real(self, ctx_, trace, plan, row_trace)

    method = HessianSensitivity(tolerance=0.05, max_probes=400, weighting="rows")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(hessian.HessianSensitivity, "_scores", spy)
        table = method.compute(ctx)
    members = table.extra["member_traces"]
    plan, rows = captured["plan"], captured["rows"]
    worst = 0.0
    for gi, g in enumerate(ctx.space.groups):
        assert len(members[g.name]) == len(g.members)
        assert sum(members[g.name]) == pytest.approx(table.extra["traces"][g.name], rel=1e-6, abs=1e-12)
        segs = [seg for seg in plan.segments if seg.group == gi]
        for m, (p, idx), seg in zip(g.members, ctx.adapter.group_params(g), segs, strict=True):
            block = diag[ids(p, idx)]  # the slice's diagonal, in the parameter's layout
            exact_rows = block.sum(dim=1) if ctx.adapter.weight(m.module) is p else block.sum(dim=0)
            assert seg.length == exact_rows.numel() == ctx.adapter.member_slice(m).shape[0]
            est = torch.from_numpy(rows[seg.offset : seg.offset + seg.length])
            scale = float(exact_rows.abs().sum())
            worst = max(worst, float((est - exact_rows.double()).abs().sum()) / scale)
    assert worst < 0.5, worst  # 400 probes: per-row estimates within half the slice's mass
    # the member traces, which average over more entries, are closer: within the group's tolerance
    # scale (their noise is of the order of the group trace's, whatever the member's own size)
    for g in ctx.space.groups:
        exact = [float(diag[ids(p, idx)].sum()) for p, idx in ctx.adapter.group_params(g)]
        mass = sum(abs(e) for e in exact)
        for tr, ex in zip(members[g.name], exact, strict=True):
            bound = max(0.15 * mass, 3.5 * table.extra["trace_se"][g.name])  # where the stop rule was not met
            assert abs(tr - ex) <= bound, (g.name, tr, ex, mass)


def test_weightings_score_the_same_under_uniform_curvature_and_differ_by_rows(tiny_cls, sentiment_file):
    """With every row's mean curvature 1, the three weightings give the same scores (the trace ones with
    mean trace 1); raising one row's curvature adds exactly that row's extra weighted error."""
    from search.hessian import _plan, _row_errors

    ctx = _ctx(tiny_cls, "sequence_classification", sentiment_file, "group")
    plan = _plan(ctx, rows=True)
    trace = np.array([float(g.n_params) for g in ctx.space.groups])
    ones = np.zeros(plan.n_rows)
    for seg in plan.segments:
        ones[seg.offset : seg.offset + seg.length] = seg.cols
    base = HessianSensitivity(weighting="trace")._scores(ctx, trace)
    for w in ("members", "rows"):
        got = HessianSensitivity(weighting=w)._scores(ctx, trace, plan, ones)
        for name, row in base.items():
            for k, v in row.items():
                assert got[name][k] == pytest.approx(v, rel=1e-6), (w, name, k)
    seg = plan.segments[1]
    bumped = ones.copy()
    bumped[seg.offset] += 4 * seg.cols  # curvature 5 on the first row of that slice
    got = HessianSensitivity(weighting="rows")._scores(ctx, trace, plan, bumped)
    g = ctx.space.groups[seg.group]
    m = g.members[[s for s in plan.segments if s.group == seg.group].index(seg)]
    extra = 4 * _row_errors(ctx.adapter.member_slice(m), 2, True, ctx.clip)[0]
    assert extra > 0
    assert got[g.name]["2"] == pytest.approx(base[g.name]["2"] + extra, rel=1e-6)
    members = HessianSensitivity(weighting="members")._scores(ctx, trace, plan, bumped)
    assert members[g.name]["2"] != pytest.approx(got[g.name]["2"], rel=1e-6)  # spread over the slice instead
    with pytest.raises(InvalidInputError) as exc:
        HessianSensitivity(weighting="diag")
    assert exc.value.field == "method_options.hessian.weighting"


def test_groups_below_the_floor_at_their_upper_bound_do_not_hold_the_stop_rule():
    """A group whose trace is ~0 has an unbounded relative error; once even its upper confidence bound is
    below the scores' floor it is settled (scored at the floor whatever more probes say)."""
    from search.hessian import TRACE_FLOOR, _Stats

    rng = np.random.default_rng(0)
    n_params = np.array([10.0, 10.0, 10.0])
    stats = _Stats(2, 3)
    for b in range(2):
        for _ in range(50):
            stats.add(b, np.array([50.0, 25.0, 0.0]) + rng.normal(0, [1.0, 1.0, 0.5]))
    trace, se = stats.totals()
    floor = TRACE_FLOOR * float(np.median((trace / n_params)[trace > 0]))
    assert (trace[2] + 3 * se[2]) / 10 < floor < trace[1] / 10
    assert stats.settled(n_params).tolist() == [False, False, True]
    assert stats.relative_errors()[2] > 0.05  # the plain rule would never stop
    assert stats.required(0.05) > 1000
    assert stats.required(0.05, ignore=stats.settled(n_params)) < 50
    # early, with few probes and a wide bound, nothing is settled
    early = _Stats(1, 3)
    for x in ([1.0, 2.0, 3.0], [100.0, 50.0, -3.0]):
        early.add(0, np.array(x))
    assert not early.settled(n_params).any()


# -------------------------------------------------------------------------------- calibration


def test_calibration_factors_algebra():
    # MiniLM's ratios of measured to predicted discrepancy of the uniform maps: 2 bits compound
    measured = {2: 0.25, 3: 0.056, 4: 0.06, 8: 0.03}
    predicted = dict.fromkeys(measured, 1.0)
    f = calibration_factors(measured, predicted)
    ref = float(np.median([0.25, 0.056, 0.06, 0.03]))
    assert f[8] == 1.0  # below the median ratio: never scaled down
    assert f[4] == pytest.approx(0.06 / ref)
    assert f[3] == pytest.approx(0.06 / ref)  # a narrower width never gets less than a wider one
    assert f[2] == pytest.approx(0.25 / ref)
    assert f[0] == f[2]  # pruning: the narrowest integer width's factor
    # nothing to compare against: no scaling
    assert calibration_factors({2: 0.3, 4: 0.0}, {2: 1.0, 4: 1.0}) == {2: 1.0, 4: 1.0, 0: 1.0}
    assert calibration_factors({}, {}) == {0: 1.0}


def test_calibration_rescales_by_measured_uniform_maps(tiny_cls, sentiment_file):
    ctx = _ctx(tiny_cls, "sequence_classification", sentiment_file, "group")
    raw = HessianSensitivity(tolerance=0.2, max_probes=20, calibrate=False).compute(ctx)
    cal = HessianSensitivity(tolerance=0.2, max_probes=20).compute(ctx)
    info = cal.extra["calibration"]
    assert info["applied"] is True and cal.extra["traces"] == raw.extra["traces"]  # same probes
    # the measured discrepancy of each uniform map, recomputed independently on the calibration batches
    ref = reference_outputs(ctx.model, ctx.batches, ctx.task)
    for bits in (2, 3, 4, 8):
        pmap = ctx.space.uniform(bits)
        with ctx.adapter.quantized(pmap, ctx.space, clip=ctx.clip):
            kl = evaluate(ctx.model, ctx.batches, ctx.task, reference=ref)["kl"]
        assert info["measured"][str(bits)] == pytest.approx(kl, rel=1e-6)
        assert info["predicted"][str(bits)] == pytest.approx(sum(raw.scores[g.name][str(bits)] for g in ctx.space.groups))
    factors = {int(k): v for k, v in info["factors"].items()}
    assert factors == calibration_factors(
        {int(k): v for k, v in info["measured"].items()}, {int(k): v for k, v in info["predicted"].items()}
    )
    assert min(factors.values()) >= 1.0
    for g in ctx.space.groups:
        for key, v in raw.scores[g.name].items():
            f = factors.get(int(key), 1.0) if key not in ("16", "32") else 1.0
            assert cal.scores[g.name][key] == pytest.approx(v * f, rel=1e-12)
