"""Fisher sensitivity: scores against a direct computation from single-example backward passes, the
cost (one forward and one backward per micro-batch), the model left as found, cancellation, options,
and a whole search with ``--method fisher``."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from search import methods
from search.adapter import ModelAdapter
from search.cli import search_main
from search.data import TextData, TextExample, TokenizedBatch, load_text_data, tokenize
from search.errors import CanceledError, InvalidInputError
from search.fisher import FisherSensitivity
from search.methods import sensitivity_method
from search.quant import fake_quantize
from search.result import SearchResult
from search.sensitivity import SensitivityContext
from search.tasks import load_model, model_output
from tests.tiny import build_model, sentiment_rows, train_classifier

TINY = {"layers": 2, "hidden": 8, "heads": 2, "intermediate": 16}


def _train_lm(folder: Path, *, steps: int = 40, lr: float = 1e-2) -> Path:
    torch.manual_seed(0)
    lm = load_model(folder, "causal_lm")
    data = TextData([TextExample(str(r["text"]), None) for r in sentiment_rows(120, seed=3)], None)
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
def fisher_models(tiny_root) -> dict[str, Path]:
    cls = build_model(tiny_root / "fisher-bert-cls", "bert", **TINY)
    return {
        "bert-cls": train_classifier(cls, sentiment_rows(200, seed=3), steps=30, lr=1e-2),
        "bert-emb": build_model(tiny_root / "fisher-bert-emb", "bert", task="embeddings", **TINY),
        "llama": _train_lm(build_model(tiny_root / "fisher-llama", "llama", task="causal_lm", **TINY)),
        "gpt2": _train_lm(build_model(tiny_root / "fisher-gpt2", "gpt2", task="causal_lm", **TINY)),
    }


TASK = {"bert-cls": "sequence_classification", "bert-emb": "embeddings", "llama": "causal_lm", "gpt2": "causal_lm"}


def _ctx(folder: Path, task: str, data_file: Path, granularity: str = "group", *, n: int = 12, batch_size: int = 5,
         seed: int = 0, bits=(0, 2, 3, 4, 8, 16), **adapter_kw) -> SensitivityContext:
    lm = load_model(folder, task, num_labels=2)
    labelled = task == "sequence_classification"
    data = load_text_data(data_file, label_field="label" if labelled else None, limit=n)
    batches = tokenize(data, lm.tokenizer, max_length=12, batch_size=batch_size)
    ad = ModelAdapter(lm.model, **adapter_kw)
    space = ad.build_space(granularity=granularity, bits=bits, ffn_block_size=8)
    return SensitivityContext(lm.model, ad, space, task, batches, seed=seed)


# ---------------------------------------------------------------------------- direct computation


def _example_objective(out: torch.Tensor, b: TokenizedBatch, task: str, labels: str, target) -> torch.Tensor:
    """``l_i`` of the module docstring for a single example (``out`` of batch size 1)."""
    if task == "embeddings":
        ref = out.detach()[0]
        u = ref / ref.norm()
        r = target - (target @ u) * u
        return (r @ out[0]) / ref.norm()
    logp = F.log_softmax(out.float(), dim=-1)[0]
    if task == "causal_lm":
        if labels == "data":
            m = b.attention_mask[0, 1:].double()
            ll = logp[:-1].gather(-1, b.input_ids[0, 1:, None])[:, 0]
        else:
            m = b.attention_mask[0].double()
            ll = logp.gather(-1, target[:, None])[:, 0]
        return (ll * m).sum() / m.sum().clamp_min(1.0).sqrt()
    y = b.labels[0] if labels == "data" else target
    return logp[y]


def _direct_scores(ctx: SensitivityContext, labels: str = "sampled", weighting: str = "elements", draws: int = 1
                   ) -> dict[str, dict[str, float]]:
    """The documented score from a loop of single-example backward passes with autograd on the weights."""
    model, adapter, task = ctx.model, ctx.adapter, ctx.task
    modules = list(dict.fromkeys(m.module for g in ctx.space.groups for m in g.members))
    params = {n: adapter.module(n).weight for n in modules}
    biases = {n: adapter.bias(n) for n in modules}
    wanted = [*params.values(), *[b for b in biases.values() if b is not None]]
    fis = {id(p): torch.zeros(p.shape, dtype=torch.float64) for p in wanted}
    gen = torch.Generator().manual_seed(ctx.seed)
    flags = [(p, p.requires_grad) for p in model.parameters()]
    model.eval()
    for p, _ in flags:
        p.requires_grad_(False)
    for p in wanted:
        p.requires_grad_(True)
    try:
        for b in ctx.batches:
            with torch.no_grad():
                out = model_output(model, b, task)
            for _ in range(draws):
                if task == "embeddings":
                    targets = torch.randn(out.shape, generator=gen)
                elif labels == "sampled":
                    u = torch.rand(out.shape, generator=gen).clamp_min(torch.finfo(torch.float32).tiny)
                    targets = (F.log_softmax(out, -1) - torch.log(-torch.log(u))).argmax(-1)
                else:
                    targets = out.argmax(-1)
                for i in range(len(b)):
                    one = TokenizedBatch(b.input_ids[i : i + 1], b.attention_mask[i : i + 1],
                                         None if b.labels is None else b.labels[i : i + 1])
                    loss = _example_objective(model_output(model, one, task), one, task, labels, targets[i])
                    grads = torch.autograd.grad(loss, wanted, allow_unused=True)
                    for p, g in zip(wanted, grads, strict=True):
                        if g is not None:
                            fis[id(p)] += g.double().square()
    finally:
        for p, f in flags:
            p.requires_grad_(f)
    n = ctx.n_samples * draws
    scores: dict[str, dict[str, float]] = {}
    with torch.no_grad():
        for g, opts in zip(ctx.space.groups, ctx.space.options, strict=True):
            row = {}
            for opt in opts:
                total = 0.0
                for m in g.members:
                    w = adapter.member_slice(m).detach().double()
                    fw = fis[id(params[m.module])]
                    if adapter.matrices[m.module].kind == "conv1d":  # GPT-2's Conv1D: the [out, in] view
                        fw = fw.t()
                    fw = fw[m.start : m.stop] if m.axis == "out" else fw[:, m.start : m.stop] if m.axis == "in" else fw
                    d2 = (w - fake_quantize(adapter.member_slice(m).detach(), opt.bits, symmetric=opt.symmetric,
                                            clip="mse", group_size=opt.group_size).double()).square()
                    if weighting == "elements":
                        total += float((fw * d2).sum())
                    elif weighting == "rows":
                        total += float((fw.mean(1) * d2.sum(1)).sum())
                    else:
                        total += float(fw.mean() * d2.sum())
                    bias = biases[m.module]
                    if opt.pruned and bias is not None and m.axis in ("out", "all"):
                        sl = slice(m.start, m.stop) if m.axis == "out" else slice(None)
                        total += float((fis[id(bias)][sl] * bias.detach()[sl].double().square()).sum())
                row[opt.key()] = 0.5 * total / n
            scores[g.name] = row
    return scores


def _assert_close(got: dict[str, dict[str, float]], want: dict[str, dict[str, float]], rel: float = 1e-4) -> None:
    assert got.keys() == want.keys()
    top = max(v for row in want.values() for v in row.values())
    for g in want:
        assert got[g].keys() == want[g].keys()
        for k in want[g]:
            assert got[g][k] == pytest.approx(want[g][k], rel=rel, abs=1e-7 * top), (g, k)


CASES = [
    ("bert-cls", "group", {}),
    ("bert-cls", "layer", {"include_head": True}),
    ("bert-emb", "group", {}),
    ("llama", "group", {}),
    ("gpt2", "group", {}),
    ("gpt2", "layer", {"include_head": True}),  # lm_head is tied to the input embedding: two uses of one weight
]


@pytest.mark.parametrize(("model", "granularity", "adapter_kw"), CASES, ids=[f"{m}-{g}-{len(k)}" for m, g, k in CASES])
def test_scores_equal_a_direct_computation(fisher_models, sentiment_file, model, granularity, adapter_kw):
    task = TASK[model]
    bits = (2, 3, 4, 8, 16) if granularity == "layer" else (0, 2, 4, 8, 16)
    ctx = _ctx(fisher_models[model], task, sentiment_file, granularity, seed=3, bits=bits, **adapter_kw)
    table = FisherSensitivity().compute(ctx)
    want = _direct_scores(ctx)
    _assert_close(table.scores, want)
    assert table.method == "fisher" and table.samples == ctx.n_samples
    assert table.extra["forwards"] == len(ctx.batches) == table.extra["backwards"]
    assert table.extra["forward_units"] == pytest.approx(3 * len(ctx.batches))
    for g, opts in zip(ctx.space.groups, ctx.space.options, strict=True):
        row = table.scores[g.name]
        assert row["32"] == 0.0
        assert all(v >= 0 for v in row.values())
        assert row["2"] >= row["4"] >= row["8"] >= row["16"], (g.name, row)
        assert row["2"] > 0
        if any(o.pruned for o in opts):
            assert row["0"] > 0


def test_group_wise_options_are_scored_with_their_group_scales(fisher_models, sentiment_file):
    # 4g4: a scale per 4 input columns of each row; its error is that of the group-wise quantizer
    ctx = _ctx(fisher_models["llama"], "causal_lm", sentiment_file, "layer", bits=(2, "2g4", 4, "4g4"))
    table = FisherSensitivity().compute(ctx)
    _assert_close(table.scores, _direct_scores(ctx))
    per_row = sum(row["2"] for row in table.scores.values())
    grouped = sum(row["2g4"] for row in table.scores.values())
    assert 0 < grouped < per_row  # finer scales: a smaller error, so the per-row score is not reused


@pytest.mark.parametrize("labels", ["model", "data"])
def test_model_and_data_labels_equal_a_direct_computation(fisher_models, sentiment_file, labels):
    for model in ("bert-cls", "llama"):
        ctx = _ctx(fisher_models[model], TASK[model], sentiment_file, "group")
        _assert_close(FisherSensitivity(labels=labels).compute(ctx).scores, _direct_scores(ctx, labels))


@pytest.mark.parametrize("weighting", ["rows", "members"])
def test_row_and_member_weightings_equal_a_direct_computation(fisher_models, sentiment_file, weighting):
    ctx = _ctx(fisher_models["bert-cls"], "sequence_classification", sentiment_file, "group")
    table = FisherSensitivity(weighting=weighting, labels="model").compute(ctx)
    _assert_close(table.scores, _direct_scores(ctx, "model", weighting))
    assert table.extra["weighting"] == weighting


def test_draws_average_several_label_samples(fisher_models, sentiment_file):
    ctx = _ctx(fisher_models["bert-emb"], "embeddings", sentiment_file, "layer", bits=(2, 4, 8))
    table = FisherSensitivity(draws=3).compute(ctx)
    _assert_close(table.scores, _direct_scores(ctx, draws=3))
    assert table.extra["forwards"] == len(ctx.batches) and table.extra["backwards"] == 3 * len(ctx.batches)
    assert table.extra["forward_units"] == pytest.approx(7 * len(ctx.batches))


def test_micro_batches_change_nothing_but_the_passes(fisher_models, sentiment_file):
    ctx = _ctx(fisher_models["gpt2"], "causal_lm", sentiment_file, "group")
    whole = FisherSensitivity(labels="model").compute(ctx)
    micro = FisherSensitivity(labels="model", micro_batch=2).compute(ctx)
    _assert_close(micro.scores, whole.scores, rel=1e-5)
    assert micro.extra["forwards"] == sum(-(-len(b) // 2) for b in ctx.batches) > whole.extra["forwards"]


def test_a_causal_lms_micro_batches_fit_the_fixed_pass_budget(fisher_models, sentiment_file):
    from search.memory import PASS_BUDGET_BYTES, rows_per_pass

    ctx = _ctx(fisher_models["llama"], "causal_lm", sentiment_file, "group")
    b = ctx.batches[0]
    vocab = ctx.model.get_output_embeddings().weight.shape[0]
    want = rows_per_pass(b.input_ids.shape[1] * vocab * 4, PASS_BUDGET_BYTES)
    assert FisherSensitivity().micro_rows(ctx, b) == want >= len(b)  # a tiny vocabulary: whole batches
    assert FisherSensitivity(micro_batch=2).micro_rows(ctx, b) == 2
    cls = _ctx(fisher_models["bert-cls"], "sequence_classification", sentiment_file, "group")
    assert FisherSensitivity().micro_rows(cls, cls.batches[0]) is None
    # a 49,152-token vocabulary at 128 tokens: 24 MiB of logits a row, one row per pass
    assert rows_per_pass(128 * 49152 * 4, PASS_BUDGET_BYTES) == 1


def test_seeded_draws_are_reproducible(fisher_models, sentiment_file):
    ctx = _ctx(fisher_models["bert-cls"], "sequence_classification", sentiment_file, "layer", bits=(2, 4, 8))
    a = FisherSensitivity().compute(ctx).scores
    assert FisherSensitivity().compute(ctx).scores == a
    ctx.seed = 11
    b = FisherSensitivity().compute(ctx).scores
    assert b != a


# ---------------------------------------------------------------------------------------- cost


def test_one_forward_and_one_backward_per_micro_batch(fisher_models, sentiment_file):
    """Counted with hooks on the model: forward calls of the whole model and of every block, and
    backward passes through the model's output."""
    ctx = _ctx(fisher_models["bert-cls"], "sequence_classification", sentiment_file, "group", n=12, batch_size=5)
    model = ctx.model
    counts = {"forward": 0, "backward": 0, "blocks": 0}

    def on_forward(module, args, output):
        counts["forward"] += 1
        output.logits.register_hook(lambda g: counts.__setitem__("backward", counts["backward"] + 1))

    handles = [model.register_forward_hook(on_forward)]
    handles += [model.get_submodule(b).register_forward_pre_hook(
        lambda m, a: counts.__setitem__("blocks", counts["blocks"] + 1)) for b in ctx.adapter.blocks]
    try:
        table = FisherSensitivity(micro_batch=3).compute(ctx)
    finally:
        for h in handles:
            h.remove()
    micro = sum(-(-len(b) // 3) for b in ctx.batches)  # 5 + 5 + 2 examples -> 2 + 2 + 1
    assert micro == 5
    assert counts == {"forward": micro, "backward": micro, "blocks": micro * len(ctx.adapter.blocks)}
    assert table.extra["forwards"] == micro and table.extra["backwards"] == micro
    assert table.extra["seconds"] > 0 and table.extra["seconds_backward"] > 0


# ------------------------------------------------------------------------------------ model state


def test_the_model_is_left_exactly_as_found(fisher_models, sentiment_file):
    ctx = _ctx(fisher_models["gpt2"], "causal_lm", sentiment_file, "group", include_head=True)
    model = ctx.model
    model.train()
    model.get_submodule(ctx.adapter.blocks[0]).eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    params = list(model.parameters())
    for i, p in enumerate(params):
        p.requires_grad_(i % 3 == 0)
    flags = [p.requires_grad for p in params]
    modes = [m.training for m in model.modules()]
    FisherSensitivity(calibrate=True).compute(ctx)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert [p.requires_grad for p in params] == flags
    assert [m.training for m in model.modules()] == modes
    assert all(p.grad is None for p in params)
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())


def test_should_stop_cancels_and_restores_the_model(fisher_models, sentiment_file):
    ctx = _ctx(fisher_models["bert-cls"], "sequence_classification", sentiment_file, "layer", bits=(2, 4, 8))
    flags = [p.requires_grad for p in ctx.model.parameters()]
    calls = {"n": 0}

    def stop() -> bool:
        calls["n"] += 1
        return calls["n"] > 1

    with pytest.raises(CanceledError):
        FisherSensitivity().compute(ctx, should_stop=stop)
    assert calls["n"] == 2
    assert [p.requires_grad for p in ctx.model.parameters()] == flags
    assert not any(m._forward_hooks for m in ctx.model.modules())


def test_progress_reaches_one(fisher_models, sentiment_file):
    ctx = _ctx(fisher_models["bert-cls"], "sequence_classification", sentiment_file, "layer", bits=(4, 8))
    seen: list[tuple[str, float]] = []
    FisherSensitivity().compute(ctx, on_progress=lambda s, f, m: seen.append((s, f)))
    assert seen and seen[-1] == ("sensitivity:fisher", 1.0)
    assert all(s == "sensitivity:fisher" for s, _ in seen)


def test_calibration_rescales_like_the_hessian(fisher_models, sentiment_file):
    ctx = _ctx(fisher_models["bert-cls"], "sequence_classification", sentiment_file, "layer", bits=(2, 4, 8))
    raw = FisherSensitivity().compute(ctx)
    cal = FisherSensitivity(calibrate=True).compute(ctx)
    info = cal.extra["calibration"]
    assert info["applied"] and raw.extra["calibration"] == {"applied": False}
    for g in raw.scores:
        for k, v in raw.scores[g].items():
            f = info["factors"][k] if k in info["factors"] else 1.0
            assert cal.scores[g][k] == pytest.approx(v * f, rel=1e-9)


# ------------------------------------------------------------------------------------- options


def test_registered_under_its_name_everywhere():
    from bitscout.schemas import Method

    assert isinstance(sensitivity_method("fisher"), FisherSensitivity)
    assert methods.get("fisher").load() is FisherSensitivity
    assert methods.is_sensitivity("fisher") and Method("fisher") is Method.fisher
    m = sensitivity_method("fisher", {"labels": "data", "weighting": "rows", "micro_batch": 4, "calibrate": True})
    assert (m.labels, m.weighting, m.micro_batch, m.calibrate, m.draws) == ("data", "rows", 4, True, 1)


@pytest.mark.parametrize(
    ("options", "field"),
    [
        ({"bogus": 1}, "method_options.fisher.bogus"),
        ({"labels": "gold"}, "method_options.fisher.labels"),
        ({"weighting": "trace"}, "method_options.fisher.weighting"),
        ({"micro_batch": 0}, "method_options.fisher.micro_batch"),
        ({"micro_batch": True}, "method_options.fisher.micro_batch"),
        ({"draws": 0}, "method_options.fisher.draws"),
        ({"draws": 2, "labels": "model"}, "method_options.fisher.draws"),
        ({"calibrate": "yes"}, "method_options.fisher.calibrate"),
    ],
)
def test_bad_options_are_refused_naming_the_field(options, field):
    with pytest.raises(InvalidInputError) as exc:
        sensitivity_method("fisher", options)
    assert exc.value.field == field


def test_labels_that_do_not_apply_are_refused_before_any_pass(fisher_models, sentiment_file):
    emb = _ctx(fisher_models["bert-emb"], "embeddings", sentiment_file, "layer", bits=(4, 8))
    with pytest.raises(InvalidInputError) as exc:
        FisherSensitivity(labels="model").compute(emb)
    assert exc.value.field == "method_options.fisher.labels"
    cls = _ctx(fisher_models["bert-cls"], "sequence_classification", sentiment_file, "layer", bits=(4, 8))
    cls.batches = [TokenizedBatch(b.input_ids, b.attention_mask, None) for b in cls.batches]
    with pytest.raises(InvalidInputError) as exc:
        FisherSensitivity(labels="data").compute(cls)
    assert exc.value.field == "method_options.fisher.labels" and "label" in str(exc.value)
    cls.batches = []
    with pytest.raises(InvalidInputError) as exc:
        FisherSensitivity().compute(cls)
    assert exc.value.field == "calibration"


# ------------------------------------------------------------------------------------ end to end


def test_search_command_with_method_fisher_gives_a_front(tmp_path, trained_bert, sentiment_file, capsys):
    out = tmp_path / "result.json"
    rc = search_main([
        "--model", str(trained_bert), "--data", str(sentiment_file), "--label-field", "label",
        "--method", "fisher", "--option", "fisher.weighting=rows", "--granularity", "group", "--bits", "0,2,4,8",
        "--max-avg-bits", "5", "--calibration", "16", "--evaluation", "32", "--max-length", "16",
        "--front-points", "4", "--out", str(out), "--quiet",
    ])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "fisher" in printed
    result = SearchResult.from_json(out)
    assert [t.method for t in result.sensitivities] == ["fisher"]
    assert result.sensitivities[0].extra["weighting"] == "rows"
    assert any(p.method == "fisher" for p in result.front)
    data = json.loads(out.read_text())
    assert data["sensitivities"][0]["extra"]["forwards"] >= 1
