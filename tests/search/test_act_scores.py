"""Activation widths (``4a8``) scored by the curvature methods: the ``fisher`` and ``hessian``
activation terms against a direct computation (single-example gradients of each matrix's output,
the exact Hessian of the loss in the matrices' inputs), and ``dnas`` searching activation options."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from search.actquant import fake_quantize_activation
from search.adapter import ModelAdapter
from search.data import TokenizedBatch, load_text_data, tokenize
from search.fisher import FisherSensitivity
from search.sensitivity import SensitivityContext
from search.tasks import load_model, model_output
from tests.tiny import build_model, sentiment_rows, train_classifier

TINY = {"layers": 2, "hidden": 8, "heads": 2, "intermediate": 16}
BITS = (4, "4a8", 8, "8a4", "8a16")


@pytest.fixture(scope="module")
def classifier(tiny_root):
    folder = build_model(tiny_root / "act-scores-bert", "bert", **TINY)
    return train_classifier(folder, sentiment_rows(200, seed=3), steps=30, lr=1e-2)


def _ctx(folder, data_file, granularity, *, n=6, batch_size=3, max_length=8, bits=BITS, eager=False):
    lm = load_model(folder, "sequence_classification", num_labels=2)
    model = lm.model
    if eager:
        model.set_attn_implementation("eager")
    data = load_text_data(data_file, label_field="label", limit=n)
    batches = tokenize(data, lm.tokenizer, max_length=max_length, batch_size=batch_size)
    ad = ModelAdapter(model)
    space = ad.build_space(granularity=granularity, bits=bits, ffn_block_size=8)
    return SensitivityContext(model, ad, space, "sequence_classification", batches, seed=0)


def _member_input_grad(g_out: torch.Tensor, w: torch.Tensor, m) -> torch.Tensor:
    """``d l / d x`` of the input a member reads, from the gradient of the matrix's output, written out."""
    if m.axis == "out":
        return g_out[..., m.start : m.stop] @ w[m.start : m.stop]
    gx = g_out @ w
    return gx[..., m.start : m.stop] if m.axis == "in" else gx


def _direct_fisher_act(ctx) -> dict[tuple[int, int], float]:
    """``1/(2N) sum_i sum_e (d l_i / d x_e)^2 (Q_A(x) - x)_e^2`` per (group, width), one example at a
    time, with the labels the model predicts."""
    model, ad = ctx.model, ctx.adapter
    modules = {m.module for g in ctx.space.groups for m in g.members}
    emb = model.get_input_embeddings().weight
    flag = emb.requires_grad
    emb.requires_grad_(True)
    total: dict[tuple[int, int], float] = {}
    try:
        for b in ctx.batches:
            for i in range(len(b)):
                one = TokenizedBatch(b.input_ids[i : i + 1], b.attention_mask[i : i + 1], None)
                seen: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
                hs = [ad.module(n).register_forward_hook(lambda mod, a, o, n=n, seen=seen: seen.__setitem__(n, (a[0].detach(), o)))
                      for n in modules]
                try:
                    out = model_output(model, one, "sequence_classification")
                finally:
                    for h in hs:
                        h.remove()
                logp = F.log_softmax(out.float(), -1)[0]
                loss = logp[int(logp.argmax())]
                names = sorted(seen)
                grads = dict(zip(names, torch.autograd.grad(loss, [seen[n][1] for n in names]), strict=True))
                for gi, (g, opts) in enumerate(zip(ctx.space.groups, ctx.space.options, strict=True)):
                    for a in {o.act_bits for o in opts if o.act_bits is not None}:
                        for m in g.members:
                            x = seen[m.module][0]
                            xm = x[..., m.start : m.stop] if m.axis == "in" else x
                            d2 = (fake_quantize_activation(xm, a) - xm).double().square()
                            gx = _member_input_grad(grads[m.module], ad.weight(m.module).detach(), m).double()
                            total[(gi, a)] = total.get((gi, a), 0.0) + float((gx.square() * d2).sum())
    finally:
        emb.requires_grad_(flag)
    n = ctx.n_samples
    return {k: 0.5 * v / n for k, v in total.items()}


@pytest.mark.parametrize("granularity", ["layer", "group"])
def test_fisher_scores_activation_widths_as_a_direct_computation(classifier, sentiment_file, granularity):
    ctx = _ctx(classifier, sentiment_file, granularity)
    table = FisherSensitivity(labels="model").compute(ctx)
    act = _direct_fisher_act(ctx)
    assert act and all(v > 0 for v in act.values())
    for gi, g in enumerate(ctx.space.groups):
        row = table.scores[g.name]
        assert row["4a8"] == pytest.approx(row["4"] + act[(gi, 8)], rel=1e-4, abs=1e-12)
        assert row["8a4"] == pytest.approx(row["8"] + act[(gi, 4)], rel=1e-4, abs=1e-12)
        assert row["8a16"] == pytest.approx(row["8"] + act[(gi, 16)], rel=1e-4, abs=1e-12)
        # 4-bit activations cost more than 8-bit ones, 16-bit almost nothing
        assert act[(gi, 4)] > act[(gi, 8)] > act[(gi, 16)] * 100


def _probed_calls(ctx):
    """Every (group, member) whose input a probe perturbs, in the order the probes are called:
    modules in forward order, the members of one module in group order."""
    order: list[str] = []
    names = {m.module for g, opts in zip(ctx.space.groups, ctx.space.options, strict=True)
             if any(o.act_bits is not None for o in opts) for m in g.members}
    hs = [ctx.adapter.module(n).register_forward_pre_hook(lambda mod, a, n=n: order.append(n)) for n in names]
    with torch.no_grad():
        model_output(ctx.model, ctx.batches[0], ctx.task)
    for h in hs:
        h.remove()
    by_module: dict[str, list] = {}
    for gi, (g, opts) in enumerate(zip(ctx.space.groups, ctx.space.options, strict=True)):
        if any(o.act_bits is not None for o in opts):
            for m in g.members:
                by_module.setdefault(m.module, []).append((gi, m))
    return [c for n in order for c in by_module[n]]


def _exact_input_hessian(ctx, batch, calls):
    """The loss (mean cross-entropy over the calibration rows) as a function of perturbations added
    to every member's input, written out per member; returns its exact Hessian at 0, the members'
    inputs and the perturbations' shapes."""
    ad, n_total = ctx.adapter, ctx.n_samples
    seen: dict[int, torch.Tensor] = {}
    shapes: list[torch.Size] = []

    def hooks(eps_list):
        hs = []
        for k, (_gi, m) in enumerate(calls):
            mod = ad.module(m.module)
            w = ad.weight(m.module)
            if m.axis == "all":
                def pre(mod, a, k=k):
                    seen[k] = a[0].detach()
                    return (a[0] + eps_list[k],) if eps_list is not None else None
                hs.append(mod.register_forward_pre_hook(pre))
            else:
                def post(mod, a, out, k=k, m=m, w=w):
                    x = a[0]
                    seen[k] = (x[..., m.start : m.stop] if m.axis == "in" else x).detach()
                    if eps_list is None:
                        return None
                    e = eps_list[k]
                    if m.axis == "out":
                        add = torch.zeros_like(out)
                        add[..., m.start : m.stop] = e @ w[m.start : m.stop].t()
                        return out + add
                    return out + e @ w[:, m.start : m.stop].t()
                hs.append(mod.register_forward_hook(post))
        return hs

    hs = hooks(None)
    with torch.no_grad():
        model_output(ctx.model, batch, ctx.task)
    for h in hs:
        h.remove()
    shapes = [seen[k].shape for k in range(len(calls))]
    sizes = [int(torch.Size(s).numel()) for s in shapes]

    def loss_of(flat):
        parts = list(torch.split(flat, sizes))
        eps_list = [p.view(s) for p, s in zip(parts, shapes, strict=True)]
        hs = hooks(eps_list)
        try:
            out = model_output(ctx.model, batch, ctx.task)
        finally:
            for h in hs:
                h.remove()
        return F.cross_entropy(out.float(), batch.labels, reduction="sum") / n_total

    flat = torch.zeros(sum(sizes))
    h = torch.autograd.functional.hessian(loss_of, flat)
    return h, [seen[k] for k in range(len(calls))], shapes, sizes


@pytest.mark.parametrize(("granularity", "probes"), [("layer", 64), ("group", 4)])
def test_hessian_scores_activation_widths_from_the_exact_input_hessian(classifier, sentiment_file, granularity, probes):
    from search.hessian import HessianSensitivity, Rademacher

    ctx = _ctx(classifier, sentiment_file, granularity, n=4, batch_size=2, max_length=6, bits=(4, "4a8", "8a4"),
               eager=True)
    table = HessianSensitivity(calibrate=False, min_probes=probes, max_probes=probes).compute(ctx)
    calls = _probed_calls(ctx)
    gen = torch.Generator().manual_seed(ctx.seed)
    act: dict[tuple[int, int], float] = {}
    for b, batch in enumerate(ctx.batches):
        h, xs, shapes, sizes = _exact_input_hessian(ctx, batch, calls)
        m = table.extra["probes_per_batch"][b]
        draws = Rademacher([torch.zeros(s) for s in shapes], gen, torch.device("cpu"))
        diag = torch.zeros(h.shape[0], dtype=torch.float64)
        exact = torch.diagonal(h).double()
        for _ in range(m):
            v = torch.cat([t.reshape(-1) for t in draws.draw()]).double()
            diag += v * (h.double() @ v)
        diag /= m
        for (gi, _m), x, s, d, e in zip(calls, xs, shapes, torch.split(diag, sizes), torch.split(exact, sizes),
                                         strict=True):
            for a in (4, 8):
                d2 = (fake_quantize_activation(x, a) - x).double().square()
                c = d.view(s)
                # the default ``rows`` weighting: per token, the mean curvature of its columns
                act[(gi, a)] = act.get((gi, a), 0.0) + float((c.mean(-1) * d2.sum(-1)).sum())
                act[("exact", gi, a)] = act.get(("exact", gi, a), 0.0) + float((e.view(s) * d2).sum())
    for gi, g in enumerate(ctx.space.groups):
        row = table.scores[g.name]
        assert row["4a8"] == pytest.approx(row["4"] + max(0.0, act[(gi, 8)]), rel=1e-3, abs=1e-9)
        assert row["8a4"] >= 0.0
    assert table.extra["activation_hvps"] == probes * len(ctx.batches)
    if probes >= 64:  # Hutchinson's estimate near the exact curvature-weighted error, summed over groups
        est = sum(v for k, v in act.items() if len(k) == 2 and k[1] == 4)
        exact = sum(v for k, v in act.items() if len(k) == 3 and k[2] == 4)
        assert exact > 0 and 0.7 < est / exact < 1.4


# -------------------------------------------------------------------------------------------- dnas


def _dnas_search(model_dir, data_file, granularity, bits=(4, 8), act=(4, 8), **opts):
    from search.local import DataOptions, prepare
    from search.pipeline import SearchOptions

    o = SearchOptions(methods=("dnas",), granularity=granularity, bits=bits, activation_bits=act,
                      ffn_block_size=8, front_points=4, **opts)
    data = DataOptions(source=str(data_file), label_field="label", calibration=8, evaluation=8, max_length=8,
                       batch_size=4)
    return prepare(model_dir, data, o, device="cpu")


@pytest.mark.parametrize("granularity", ["layer", "group"])
def test_dnas_one_hot_mixture_with_activation_widths_is_the_evaluated_model(classifier, sentiment_file, granularity):
    from search.dnas import DNAS, DNASOptions

    search = _dnas_search(classifier, sentiment_file, granularity)
    space = search.space
    assert {o.key() for row in space.options for o in row} >= {"4a4", "4a8", "8a4", "8a8"}
    gen = torch.Generator().manual_seed(1)
    choices = [int(torch.randint(len(o), (1,), generator=gen)) for o in space.options]
    pmap = space.from_choices(choices)
    assert any(o.act_bits is not None for o in pmap.values())
    batch = search.calibration[0]
    with DNAS(search.model, search.adapter, space, search.cost_model, search.task, search.calibration,
              metric="size_bytes", options=DNASOptions(batch_size=None, loss="kd")) as dn:
        ys = [F.one_hot(torch.tensor(c), len(o)).float() for c, o in zip(choices, space.options, strict=True)]
        with torch.no_grad():
            mixed = dn._mixed_forward(ys, batch)
            weights_only = torch.func.functional_call(dn._forward, dn._overrides(ys), (batch,))
    with search.adapter.quantized(pmap, space):
        with torch.no_grad():
            expected = model_output(search.model, batch, search.task)
    assert float((weights_only - expected).abs().max()) > 0  # the activations do change the output ...
    assert torch.allclose(mixed, expected, rtol=1e-4, atol=1e-5)  # ... and the mixture changes it the same way


def test_dnas_start_scores_add_the_activation_change_to_the_weight_change(classifier, sentiment_file):
    """The start scores ``sum_b (g_w . d + g_x . dx)^2 / (2 n)`` against a direct computation: the
    derivatives of the drawn-label log-likelihood in two scalars per group, ``s`` moving the weights
    toward ``Q_4(w)`` and ``t`` the inputs toward ``Q_8(x)``."""
    from search.dnas import DNAS, DNASOptions
    from search.quant import fake_quantize

    search = _dnas_search(classifier, sentiment_file, "layer", bits=(4, "4a8", 8), act=())
    space = search.space
    with DNAS(search.model, search.adapter, space, search.cost_model, search.task, search.calibration,
              metric="size_bytes", options=DNASOptions(batch_size=None, loss="kd"), seed=5) as dn:
        got = dn.sensitivity_scores(1)
        gen = torch.Generator().manual_seed(5)
        ad = search.adapter
        names = [g.members[0].module for g in space.groups]
        w = {n: ad.weight(n).detach() for n in names}
        want4, want48 = torch.zeros(len(names), dtype=torch.float64), torch.zeros(len(names), dtype=torch.float64)
        n_ex = 0
        for b in dn.batches:
            s = torch.zeros(len(names), requires_grad=True)
            t = torch.zeros(len(names), requires_grad=True)
            over = {f"inner.{n}.weight": w[n] + s[i] * (fake_quantize(w[n], 4, clip=search.options.clip) - w[n])
                    for i, n in enumerate(names)}

            def pre(mod, a, i, t=t):
                x = a[0]
                return (x + t[i] * (fake_quantize_activation(x.detach(), 8) - x.detach()),)

            hs = [ad.module(n).register_forward_pre_hook(lambda mod, a, i=i, pre=pre: pre(mod, a, i))
                  for i, n in enumerate(names)]
            try:
                with torch.enable_grad():
                    out = torch.func.functional_call(dn._forward, over, (b,), strict=False)
                    ds, dt = torch.autograd.grad(dn._fisher_loss(out, b, gen), [s, t])
            finally:
                for h in hs:
                    h.remove()
            want4 += ds.double().square()
            want48 += (ds + dt).double().square()
            n_ex += len(b)
    for i, opts in enumerate(space.options):
        keys = [o.key() for o in opts]
        assert got[i][keys.index("4")] == pytest.approx(0.5 * float(want4[i]) / n_ex, rel=1e-3)
        assert got[i][keys.index("4a8")] == pytest.approx(0.5 * float(want48[i]) / n_ex, rel=1e-3)
        assert got[i][keys.index("4a8")] != pytest.approx(got[i][keys.index("4")], rel=1e-6)


def test_a_dnas_search_with_activation_widths_gives_a_front_of_w_a_maps(classifier, sentiment_file):
    search = _dnas_search(classifier, sentiment_file, "layer",
                          method_options={"dnas": {"steps": 4, "steps_next": 2, "target_fractions": [0.6, 0.4]}})
    from search.dnas import dnas_candidates

    cands = dnas_candidates(search)
    assert cands
    assert any(o.act_bits is not None for c in cands for o in c.precision_map.values())


def test_activation_curvature_weightings_against_the_formulas_and_independent_of_batching():
    from search.actquant import ActivationCurvature, ProbeCall
    from search.space import Member

    gen = torch.Generator().manual_seed(0)
    member = Member(module="layer.0.dense", shape=(4, 6))
    x = torch.randn(5, 3, 6, generator=gen)
    curv = torch.rand(5, 3, 6, generator=gen)
    err = {8: fake_quantize_activation(x, 8) - x}
    d2 = err[8].square().double()
    c = curv.double()
    want = {
        "elements": float((c * d2).sum()),
        "rows": float((c.mean(-1) * d2.sum(-1)).sum()),
        "members": float(c.mean() * d2.sum()),
    }
    for weighting, value in want.items():
        whole = ActivationCurvature(weighting)
        whole.add([ProbeCall(0, member, x, torch.zeros_like(x), err)], [curv])
        assert whole.totals()[(0, 8)] == pytest.approx(value, rel=1e-6)
        parts = ActivationCurvature(weighting)  # the same rows cut into two batches
        for sl in (slice(0, 2), slice(2, 5)):
            parts.add([ProbeCall(0, member, x[sl], torch.zeros_like(x[sl]), {8: err[8][sl]})], [curv[sl]])
        assert parts.totals()[(0, 8)] == pytest.approx(value, rel=1e-6)
