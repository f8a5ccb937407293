"""DNAS on real tiny models: the mixture against the pipeline's own quantized model, a planted redundant
and a planted critical group, budgets met exactly, the resource term, determinism, the model left as
found, cancellation, options, and the whole pipeline with KL and DNAS together."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.nn.utils import parametrize

from search.dnas import DNAS, DNASOptions, run_dnas
from search.errors import CanceledError, InvalidInputError
from search.local import DataOptions, prepare
from search.methods import parse_options
from search.pipeline import SearchOptions
from search.plan import build_problem
from search.result import Budget
from search.tasks import model_output
from tests.tiny import build_model

SPACE = dict(granularity="group", bits=(0, 2, 4, 8), ffn_block_size=32)


def _data(sentiment_file, **kw):
    base = dict(source=str(sentiment_file), label_field="label", calibration=32, evaluation=32, max_length=16,
                batch_size=16)
    base.update(kw)
    return DataOptions(**base)


def _search(model_dir, sentiment_file, *, budget=None, dnas=None, methods=("dnas",), seed=0, task=None, label="label"):
    opts = SearchOptions(methods=methods, budget=budget or Budget(), seed=seed, front_points=4,
                         method_options={"dnas": dnas or {}}, **SPACE)
    return prepare(model_dir, _data(sentiment_file, label_field=label), opts, task=task, device="cpu")


def _state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _same_state(model, saved) -> bool:
    now = model.state_dict()
    return now.keys() == saved.keys() and all(torch.equal(now[k], saved[k]) for k in saved)


def _plant(model):
    """Head 0 of block 0 made redundant (its output-projection columns are zero, so nothing it
    computes reaches the output); head 2 of block 1 made critical (its output scaled by 10, so it
    dominates the residual stream after it)."""
    hd = model.config.hidden_size // model.config.num_attention_heads
    with torch.no_grad():
        model.bert.encoder.layer[0].attention.output.dense.weight[:, 0:hd] = 0.0
        model.bert.encoder.layer[1].attention.output.dense.weight[:, 2 * hd : 3 * hd] *= 10.0


@pytest.mark.parametrize("arch,task", [("bert", "sequence_classification"), ("gpt2", "causal_lm")])
def test_one_hot_mixture_is_the_quantized_model_the_pipeline_evaluates(tmp_path, sentiment_file, arch, task):
    folder = build_model(tmp_path / arch, arch, task=task, layers=1, hidden=16, heads=2, intermediate=32)
    label = "label" if task == "sequence_classification" else None
    search = _search(folder, sentiment_file, task=task, label=label)
    space = search.space
    rng = np.random.default_rng(0)
    choices = [int(rng.integers(len(o))) for o in space.options]
    choices[0] = space.options[0].index(next(o for o in space.options[0] if o.pruned))  # one pruned group at least
    pmap = space.from_choices(choices)
    batch = search.calibration[0]
    with DNAS(search.model, search.adapter, space, search.cost_model, search.task, search.calibration,
              metric="size_bytes", options=DNASOptions(batch_size=None, loss="kd")) as dn:
        ys = [torch.nn.functional.one_hot(torch.tensor(c), len(o)).float() for c, o in zip(choices, space.options, strict=True)]
        with torch.no_grad():
            mixed = torch.func.functional_call(dn._forward, dn._overrides(ys), (batch,))
    with search.adapter.quantized(pmap, space):
        with torch.no_grad():
            expected = model_output(search.model, batch, search.task)
    with torch.no_grad():
        full = model_output(search.model, batch, search.task)
    changed = float((full - expected).abs().max())
    assert changed > 0  # the map does change the output ...
    assert float((mixed - expected).abs().max()) <= 1e-3 * changed  # ... and the mixture changes it the same way


@pytest.mark.parametrize("seed", [0, 1])
def test_prunes_the_redundant_group_and_gives_the_critical_group_the_most_bits(trained_bert, sentiment_file, seed):
    search = _search(trained_bert, sentiment_file, budget=Budget(max_avg_bits=4.0), seed=seed,
                     dnas={"targets": (4.0,), "steps": 80, "loss": "kd", "batch_size": None})
    _plant(search.model)
    result = run_dnas(search)
    (run,) = result.runs
    names = [g.name for g in search.space.groups]
    redundant = next(n for n in names if n.endswith("layer.0.attention/head0"))
    critical = next(n for n in names if n.endswith("layer.1.attention/head2"))
    pmap = run.precision_map
    assert pmap[redundant].pruned
    assert pmap[critical].bits == max(o.bits for o in pmap.values())
    assert pmap[critical].bits >= 8
    # the probabilities say so too: the redundant group is the surest to be pruned
    probs = dict(zip(names, run.probabilities, strict=True))
    assert probs[redundant][0] == max(p[0] for p in probs.values())
    assert search.cost_model.cost(pmap).avg_bits <= 4.0 + 1e-9


def test_maps_meet_their_budgets_and_the_resource_term_moves_the_expected_cost(trained_bert, sentiment_file):
    search = _search(trained_bert, sentiment_file, budget=Budget(max_size_mb=0.09), dnas={"init": "uniform"})
    result = run_dnas(search)
    assert result.metric == "size_bytes"
    targets = [r.target for r in result.runs]
    assert targets == sorted(targets, reverse=True) and len(targets) >= 4
    for r in result.runs:
        assert r.precision_map is not None
        assert search.cost_model.cost(r.precision_map).size_bytes <= r.target * (1 + 1e-9)
    first = result.runs[0]
    assert first.expected_cost_start > first.target
    assert abs(first.expected_cost_end - first.target) < abs(first.expected_cost_start - first.target)
    # warm start: each run starts where the previous ended, and the expected cost ends lower for lower targets
    for a, b in zip(result.runs, result.runs[1:], strict=False):
        assert b.expected_cost_start == pytest.approx(a.expected_cost_end)
    assert result.runs[-1].expected_cost_end < first.expected_cost_end
    assert result.candidates and all(c.method == "dnas" for c in result.candidates)
    # the sweep goes on below the smallest target, as the sensitivity fronts do, down to the smallest map
    below = [c for c in result.candidates if search.cost_model.cost(c.precision_map).size_bytes < min(targets)]
    assert any(c.label == "sweep" for c in below)
    budget_cands = [c for c in result.candidates if c.label == "budget"]
    assert budget_cands and search.cost_model.cost(budget_cands[0].precision_map).size_bytes <= 0.09e6 * (1 + 1e-9)
    for c in result.candidates:
        cost = search.cost_model.cost(c.precision_map)
        assert all(cost.get(k) <= v * (1 + 1e-9) for k, v in c.budget.items() if not k.startswith("pruned_"))


def test_the_sweep_goes_on_above_the_largest_target_up_to_the_dearest_map(trained_bert, sentiment_file):
    # the targets stop at half the quantization range; the front must still reach the maps near full
    # precision (on the oracle, DNAS lost most of its log-KL hypervolume there when it stopped at the targets)
    search = _search(trained_bert, sentiment_file, dnas={"steps": 6, "steps_next": 3})
    result = run_dnas(search)
    high = max(r.target for r in result.runs)
    problem, _ = build_problem(search.space, search.cost_model, None)
    dearest = np.array([int(np.argmax(w)) for w in problem.weights["size_bytes"]], dtype=np.int64)
    top = problem.cost_of(dearest)["size_bytes"]
    assert top > 1.5 * high  # else the test says nothing
    sizes = {c.label: [] for c in result.candidates}
    for c in result.candidates:
        sizes[c.label].append(search.cost_model.cost(c.precision_map).size_bytes)
    above = [s for label, ss in sizes.items() if label.endswith("sweep above") for s in ss if s > high * (1 + 1e-9)]
    assert len(above) >= 2
    # up to the dearest map: every group at its widest option, from the start's scores
    assert max(above) == pytest.approx(top, rel=1e-9)
    # and spread between, not only at the two ends
    assert any(high * 1.05 < s < top * 0.95 for s in above)


def test_without_resource_pressure_nothing_moves_down(trained_bert, sentiment_file):
    # the control of the test above: with resource_weight 0 the expected cost does not fall to the target
    search = _search(trained_bert, sentiment_file,
                     dnas={"targets": (60_000.0,), "steps": 12, "resource_weight": 0.0, "dual_lr": 0.0,
                           "resource_floor": 0.0, "init": "uniform"})
    (run,) = run_dnas(search).runs
    assert run.expected_cost_end > 0.9 * run.expected_cost_start


def test_deterministic_and_the_model_is_left_exactly_as_found(trained_bert, sentiment_file):
    runs = []
    for _ in range(2):
        search = _search(trained_bert, sentiment_file, dnas={"steps": 6, "steps_next": 3, "train_weights": True, "lsq": True})
        model = search.model
        model.classifier.weight.requires_grad_(False)  # a mix of flags, restored as found
        model.train()
        flags = {n: p.requires_grad for n, p in model.named_parameters()}
        saved = _state(model)
        result = run_dnas(search)
        assert _same_state(model, saved)
        assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
        assert model.training
        assert all(p.grad is None for p in model.parameters())
        assert not any(parametrize.is_parametrized(m) for m in model.modules())
        runs.append(result)
    a, b = runs
    assert [c.precision_map for c in a.candidates] == [c.precision_map for c in b.candidates]
    for ra, rb in zip(a.runs, b.runs, strict=True):
        for pa, pb in zip(ra.probabilities, rb.probabilities, strict=True):
            np.testing.assert_array_equal(pa, pb)


def test_cancellation_between_steps_leaves_the_model_as_found(trained_bert, sentiment_file):
    search = _search(trained_bert, sentiment_file, dnas={"steps": 20})
    saved = _state(search.model)
    flags = [p.requires_grad for p in search.model.parameters()]
    calls = {"n": 0}
    progress = []

    def stop() -> bool:
        calls["n"] += 1
        return calls["n"] > 5

    with pytest.raises(CanceledError):
        run_dnas(search, should_stop=stop, on_progress=lambda s, f, m: progress.append((s, f)))
    assert calls["n"] == 6
    assert _same_state(search.model, saved)
    assert [p.requires_grad for p in search.model.parameters()] == flags
    assert progress and all(s == "dnas" for s, _ in progress)
    fracs = [f for _, f in progress]
    assert fracs == sorted(fracs) and 0 <= fracs[0] and fracs[-1] < 1


@pytest.mark.parametrize(
    "bad,field",
    [
        ({"bogus": 1}, "method_options.dnas.bogus"),
        ({"steps": 0}, "method_options.dnas.steps"),
        ({"targets": (-1.0,)}, "method_options.dnas.targets.0"),
        ({"target_fractions": (1.5,)}, "method_options.dnas.target_fractions.0"),
        ({"loss": "mse"}, "method_options.dnas.loss"),
        ({"arch_lr": float("nan")}, "method_options.dnas.arch_lr"),
        ({"train_weights": "yes"}, "method_options.dnas.train_weights"),
        ({"init": "random"}, "method_options.dnas.init"),
        ({"values": "logits"}, "method_options.dnas.values"),
        ({"init": "budget", "values": "corrected"}, "method_options.dnas.values"),
        ({"sensitivity_draws": 0}, "method_options.dnas.sensitivity_draws"),
        ({"sensitivity_temperature": 0.0}, "method_options.dnas.sensitivity_temperature"),
        ({"calibrate": "yes"}, "method_options.dnas.calibrate"),
        ({"start_candidates": 1}, "method_options.dnas.start_candidates"),
        ({"calibration_sequences": 0}, "method_options.dnas.calibration_sequences"),
        ({"relaxation": "mean"}, "method_options.dnas.relaxation"),
        ({"relaxation": "expected", "init": "budget"}, "method_options.dnas.relaxation"),
    ],
)
def test_bad_options_name_the_field(bad, field):
    with pytest.raises(InvalidInputError) as err:
        parse_options("dnas", bad)
    assert err.value.field == field


def test_budget_init_starts_at_the_target(trained_bert, sentiment_file):
    search = _search(trained_bert, sentiment_file)
    with DNAS(search.model, search.adapter, search.space, search.cost_model, search.task, search.calibration,
              metric="size_bytes") as dn:
        uniform = dn.expected_cost()
        dn.init_at(0.8 * uniform)
        assert dn.expected_cost() == pytest.approx(0.8 * uniform, rel=1e-6)
        probs = dn.probabilities()
        assert all(np.all(np.diff(p[np.argsort([o.bits for o in opts])]) <= 1e-12)  # cheaper is likelier
                   for p, opts in zip(probs, search.space.options, strict=True))
        dn.init_at(2.0 * uniform)  # above the uniform distribution's cost: uniform
        assert dn.expected_cost() == pytest.approx(uniform)


def test_task_loss_needs_labels(tmp_path, sentiment_file):
    folder = build_model(tmp_path / "emb", "bert", task="embeddings", layers=1, hidden=16, heads=2, intermediate=32)
    search = _search(folder, sentiment_file, task="embeddings", label=None, dnas={"loss": "task"})
    with pytest.raises(InvalidInputError) as err:
        run_dnas(search)
    assert err.value.field == "method_options.dnas.loss"
    ok = _search(folder, sentiment_file, task="embeddings", label=None, dnas={"steps": 4, "steps_next": 2})
    result = run_dnas(ok)
    assert result.info["loss"] == "kd" and result.candidates


def test_search_run_with_kl_and_dnas_gives_one_front_of_both(trained_bert, sentiment_file):
    search = _search(trained_bert, sentiment_file, methods=("kl", "dnas"), budget=Budget(max_avg_bits=4.0),
                     dnas={"steps": 8, "steps_next": 4})
    stages = set()
    result = search.run(on_progress=lambda s, f, m: stages.add(s))
    methods = {p.method for p in result.points}
    assert {"kl", "dnas", "uniform"} <= methods
    assert "dnas" in stages and "search:dnas" in result.timings
    assert result.front and all(p in result.points for p in result.front)
    for p in result.points:
        if p.method == "dnas":
            assert "accuracy" in p.metrics and p.cost.avg_bits <= max(4.0, p.budget.get("avg_bits", 4.0)) + 1e-9
    assert any(p.method == "dnas" and p.label == "budget" and p.cost.avg_bits <= 4.0 + 1e-9 for p in result.points)


def test_fisher_scores_are_the_second_order_model_of_the_kl_scores(trained_bert, sentiment_file):
    search = _search(trained_bert, sentiment_file, methods=("kl", "dnas"))
    table = search.sensitivity("kl")
    saved = _state(search.model)
    with DNAS(search.model, search.adapter, search.space, search.cost_model, search.task, search.calibration,
              metric="size_bytes", options=DNASOptions(batch_size=8)) as dn:
        scores = dn.sensitivity_scores(draws=4)
    assert _same_state(search.model, saved) and all(p.grad is None for p in search.model.parameters())
    kl, fisher = [], []
    for g, opts, row in zip(search.space.groups, search.space.options, scores, strict=True):
        assert row.shape == (len(opts),) and np.all(row >= 0)
        for o, v in zip(opts, row, strict=True):
            if o.bits == 32:
                assert v == 0.0
            elif o.is_integer:  # small perturbations, where the second-order model holds
                kl.append(table.scores[g.name][o.key()])
                fisher.append(v)
    kl, fisher = np.log(np.array(kl)), np.log(np.array(fisher))
    assert np.corrcoef(kl, fisher)[0, 1] > 0.95
    assert np.median(np.abs(kl - fisher)) < np.log(3.0)  # the same scale, not only the same order


def test_sensitivity_init_starts_from_the_allocation_of_the_scores(trained_bert, sentiment_file):
    from search import allocate as alloc

    search = _search(trained_bert, sentiment_file, dnas={"init": "sensitivity", "values": "corrected",
                                                         "steps": 1, "arch_lr": 1e-9, "sensitivity_draws": 2,
                                                         "calibrate": True})
    result = run_dnas(search)
    assert result.info["sensitivity_seconds"] > 0
    first = result.runs[0]
    assert first.expected_cost_start == pytest.approx(first.target, rel=1e-3)  # the prior meets the first target
    # without a step that moves the logits, every map is the allocation of the scores themselves
    with DNAS(search.model, search.adapter, search.space, search.cost_model, search.task, search.calibration,
              metric="size_bytes", options=parse_options("dnas", search.options.method_options["dnas"]),
              seed=search.options.seed) as dn:
        scores = dn.sensitivity_scores(draws=2)
    # ... calibrated by the measured uniform maps (search.sensitivity.calibrate_scores)
    cal = result.info["calibration"]
    assert cal["applied"] is True and set(cal["measured"]) == {"2", "4", "8"}
    factors = {int(k): v for k, v in cal["factors"].items()}
    scores = [np.array([v * (factors.get(o.bits, 1.0) if o.is_integer or o.pruned else 1.0)
                        for o, v in zip(opts, row, strict=True)])
              for opts, row in zip(search.space.options, scores, strict=True)]
    problem, plimits = build_problem(search.space, search.cost_model, None)
    problem = alloc.Problem(values=scores, weights=problem.weights, offsets=problem.offsets, names=problem.names)
    for r in result.runs:
        assert r.corrected is not None
        a = alloc.allocate(problem, {"size_bytes": r.target, **plimits})
        assert r.precision_map == search.space.from_choices(a.choices)
    # the starting distribution's argmax is a Lagrangian solution of the scores: no map of its size or
    # less has a smaller summed score (Everett), so the search starts from the sensitivity solution
    argmax = np.array([int(np.argmax(p)) for p in first.probabilities])
    size = problem.cost_of(argmax)["size_bytes"]
    best = alloc.allocate(problem, {"size_bytes": size})
    assert problem.value_of(argmax) <= best.objective * (1 + 1e-6) + 1e-15
    assert len(set(argmax.tolist())) > 1
    # ... and the maps differ across targets: the scores say where the bits matter
    assert len({r.precision_map for r in result.runs}) == len(result.runs)


def test_the_front_also_holds_the_maps_the_steps_started_from(trained_bert, sentiment_file):
    from search import allocate as alloc

    search = _search(trained_bert, sentiment_file, dnas={"steps": 6, "steps_next": 3})
    result = run_dnas(search)
    cal = result.info["calibration"]
    assert cal["applied"] is True  # measured for the start's candidates, though the start itself is raw
    with DNAS(search.model, search.adapter, search.space, search.cost_model, search.task, search.calibration,
              metric="size_bytes", options=DNASOptions(), seed=search.options.seed) as dn:
        raw = dn.sensitivity_scores()
    factors = {int(k): v for k, v in cal["factors"].items()}
    calibrated = [np.array([v * (factors.get(o.bits, 1.0) if o.is_integer or o.pruned else 1.0)
                            for o, v in zip(opts, row, strict=True)])
                  for opts, row in zip(search.space.options, raw, strict=True)]
    problem, plimits = build_problem(search.space, search.cost_model, None)
    maps = {c.precision_map: c.label for c in result.candidates}
    for scores in (raw, calibrated):
        p = alloc.Problem(values=scores, weights=problem.weights, offsets=problem.offsets, names=problem.names)
        for r in result.runs:
            pmap = search.space.from_choices(alloc.allocate(p, {"size_bytes": r.target, **plimits}).choices)
            assert pmap in maps  # proposed (under its own label unless a learned map is the same)
            assert search.cost_model.cost(pmap).size_bytes <= r.target * (1 + 1e-9)
    assert any(label.startswith("start, target") for label in maps.values())
    # below the smallest target the start's allocations are proposed at the sweep's budgets too
    low = min(r.target for r in result.runs)
    below = [c for c in result.candidates if c.label.startswith("start") and c.label.endswith("sweep")]
    assert below and all(search.cost_model.cost(c.precision_map).size_bytes < low for c in below)
    # off: only the learned maps and the sweep
    off = run_dnas(_search(trained_bert, sentiment_file, dnas={"steps": 6, "steps_next": 3, "start_candidates": False}))
    assert off.info["calibration"]["applied"] is False
    assert not any(c.label.startswith("start") for c in off.candidates)


def test_pair_scores_are_the_fisher_norms_of_the_differences_between_options(trained_bert, sentiment_file):
    search = _search(trained_bert, sentiment_file)
    with DNAS(search.model, search.adapter, search.space, search.cost_model, search.task, search.calibration,
              metric="size_bytes", options=DNASOptions(batch_size=8)) as dn:
        scores = dn.sensitivity_scores(draws=2)
        pairs = [m.numpy().astype(np.float64) for m in dn.pair_scores]
    for opts, s, m in zip(search.space.options, scores, pairs, strict=True):
        assert m.shape == (len(opts), len(opts))
        np.testing.assert_allclose(m, m.T, rtol=1e-6, atol=0)
        np.testing.assert_allclose(np.diag(m), 0.0, atol=1e-12)
        full = [k for k, o in enumerate(opts) if o.bits == 32]
        for k in full:  # the change from full precision is the option's own change: its score
            np.testing.assert_allclose(m[:, k], s, rtol=1e-5, atol=1e-12)
        # a seminorm of the sampled directions: the triangle inequality holds for every pair through every third
        r = np.sqrt(np.maximum(m, 0.0))
        for i in range(len(opts)):
            for j in range(len(opts)):
                assert r[i, j] <= min(r[i, k] + r[k, j] for k in range(len(opts))) * (1 + 1e-5) + 1e-9
    assert any(np.any(m > 0) for m in pairs)


def test_expected_relaxation_runs_deterministically_and_meets_its_targets(trained_bert, sentiment_file):
    opts = {"steps": 6, "steps_next": 3, "relaxation": "expected", "start_candidates": False}
    a = run_dnas(_search(trained_bert, sentiment_file, dnas=opts))
    b = run_dnas(_search(trained_bert, sentiment_file, dnas=opts))
    assert [c.precision_map for c in a.candidates] == [c.precision_map for c in b.candidates]
    search = _search(trained_bert, sentiment_file, dnas=opts)
    for r in a.runs:
        assert search.cost_model.cost(r.precision_map).size_bytes <= r.target * (1 + 1e-9)
    # at a point mass the relaxation is the discrete map itself: its variance term vanishes
    with DNAS(search.model, search.adapter, search.space, search.cost_model, search.task, search.calibration,
              metric="size_bytes", options=DNASOptions(relaxation="expected")) as dn:
        dn.sensitivity_scores()
        with torch.no_grad():
            for lg in dn.logits:
                lg.zero_()
                lg[-1] = 60.0
        ys = [torch.softmax(lg.detach(), 0) for lg in dn.logits]
        assert float(sum(y @ m @ y for y, m in zip(ys, dn.pair_scores, strict=True))) < 1e-12
        # a mixed distribution pays the variance of its options: positive wherever two options differ
        with torch.no_grad():
            for lg in dn.logits:
                lg.zero_()
        ys = [torch.softmax(lg.detach(), 0) for lg in dn.logits]
        variance = float(sum(y @ m @ y for y, m in zip(ys, dn.pair_scores, strict=True)))
        assert variance > 0
        # a step's loss is the task loss of the mean mixture plus that variance term, no noise drawn
        with torch.no_grad():
            out = torch.func.functional_call(dn._forward, dn._overrides(ys), (dn.batches[0],), strict=False)
            mean_loss = float(dn._task_loss(out, 0))
        dn._batch_pos = 0
        loss, _ = dn.step(tau=1.0, target=1e12, update="arch", optimizer=torch.optim.SGD(dn.logits, lr=0.0))
        assert 0.5 * variance > 1e-4 * mean_loss  # large enough for the comparison below to see it
        assert loss == pytest.approx(mean_loss + 0.5 * variance, rel=1e-5)


def test_the_calibration_measures_on_the_first_batches_holding_the_sequences_asked_for(trained_bert, sentiment_file):
    from search.sensitivity import SensitivityContext, calibrate_scores

    search = _search(trained_bert, sentiment_file, dnas={"steps": 1, "calibration_sequences": 10})
    assert [len(b) for b in search.calibration] == [16, 16]
    result = run_dnas(search)
    measured = result.info["calibration"]["measured"]
    space = search.space
    zeros = {g.name: {o.key(): 1.0 for o in opts} for g, opts in zip(space.groups, space.options, strict=True)}

    def on(batches):
        ctx = SensitivityContext(search.model, search.adapter, space, search.task, batches, search.device,
                                 search.options.seed, search.options.clip)
        return calibrate_scores(ctx, zeros)[1]["measured"]

    assert measured == pytest.approx(on(search.calibration[:1]), rel=1e-6)  # one batch of 16 holds 10
    assert measured != pytest.approx(on(search.calibration), rel=1e-6)  # not the whole calibration set
