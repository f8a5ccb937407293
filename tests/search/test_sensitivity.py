"""KL sensitivity: block replay equals the naive full-model KL and runs fewer block forwards."""

from __future__ import annotations

import pytest
import torch

from search.adapter import ModelAdapter
from search.data import load_text_data, split_data, tokenize
from search.errors import CanceledError, InvalidInputError
from search.sensitivity import KLSensitivity, SensitivityContext
from search.tasks import load_model
from tests.tiny import build_model


def _ctx(folder, task, data_file, granularity, *, layers=3):
    lm = load_model(folder, task, num_labels=2)
    data = load_text_data(data_file, label_field="label")
    cal, _ = split_data(data, calibration=24, evaluation=8)
    batches = tokenize(cal, lm.tokenizer, max_length=16, batch_size=8)
    ad = ModelAdapter(lm.model)
    space = ad.build_space(granularity=granularity, bits=(0, 2, 4, 8, 16))
    return SensitivityContext(lm.model, ad, space, task, batches)


@pytest.mark.parametrize(
    "arch,task,granularity",
    [
        ("bert", "sequence_classification", "layer"),
        ("bert", "sequence_classification", "group"),
        ("bert", "embeddings", "layer"),
        ("llama", "causal_lm", "group"),
        ("gpt2", "causal_lm", "layer"),
    ],
)
def test_replay_equals_naive_and_runs_fewer_forwards(tmp_path, sentiment_file, arch, task, granularity):
    folder = build_model(tmp_path / arch, arch, task=task, layers=3)
    ctx = _ctx(folder, task, sentiment_file, granularity)
    n_blocks = len(ctx.adapter.blocks)
    # count real block forwards with our own hooks, independently of the method's accounting
    calls = {"n": 0}
    block_list = ctx.adapter.module(ctx.adapter.block_list_name)
    hooks = [b.register_forward_hook(lambda *a: calls.__setitem__("n", calls["n"] + 1)) for b in block_list]
    try:
        fast = KLSensitivity(replay=True).compute(ctx)
        fast_calls = calls["n"]
        calls["n"] = 0
        naive = KLSensitivity(replay=False).compute(ctx)
        naive_calls = calls["n"]
    finally:
        for h in hooks:
            h.remove()
    for g in naive.scores:
        for k, v in naive.scores[g].items():
            assert fast.scores[g][k] == pytest.approx(v, abs=1e-5, rel=1e-5)
    # naive: B * (1 + probes) full passes
    probes = naive.extra["probes"]
    assert naive_calls == len(ctx.batches) * (1 + probes) * n_blocks
    assert fast_calls == fast.extra["block_forwards"]
    assert fast_calls < 0.85 * naive_calls
    # the scores make sense: 32 is free, coarser grids hurt more
    some = next(iter(fast.scores.values()))
    assert some["32"] == 0.0
    assert all(v >= 0 for row in fast.scores.values() for v in row.values())


def test_scores_grow_as_bits_shrink(trained_bert, sentiment_file):
    ctx = _ctx(trained_bert, "sequence_classification", sentiment_file, "layer")
    table = KLSensitivity().compute(ctx)
    for row in table.scores.values():
        assert row["2"] > row["4"] > row["8"] >= 0
        assert row["8"] >= row["16"] >= 0


def test_progress_and_cancellation(tmp_path, sentiment_file):
    folder = build_model(tmp_path / "bert", "bert", layers=2)
    ctx = _ctx(folder, "sequence_classification", sentiment_file, "layer")
    before = {k: v.clone() for k, v in ctx.model.state_dict().items()}
    seen = []
    state = {"n": 0}

    def stop():
        state["n"] += 1
        return state["n"] > 6

    with pytest.raises(CanceledError):
        KLSensitivity().compute(ctx, on_progress=lambda s, f, m: seen.append(f), should_stop=stop)
    # the model is left exactly as found, even when canceled mid-way
    assert all(torch.equal(before[k], v) for k, v in ctx.model.state_dict().items())
    assert list(ctx.adapter.module(ctx.adapter.block_list_name))[0].__class__.__name__ != "_Replay"
    progress = []
    KLSensitivity().compute(ctx, on_progress=lambda s, f, m: progress.append((s, f)))
    assert progress[-1] == ("sensitivity:kl", 1.0)
    assert all(0 <= f <= 1 for _, f in progress)


def test_unknown_method_option_is_an_invalid_request_naming_it() -> None:
    from search.errors import InvalidInputError
    from search.methods import sensitivity_method

    with pytest.raises(InvalidInputError) as e:
        sensitivity_method("hessian", {"max_probez": 3})
    assert e.value.field == "method_options.hessian.max_probez"


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_block_cache_holds_one_block_inputs_and_scores_equal_naive(tmp_path, sentiment_file, monkeypatch, arch):
    from search import sensitivity

    folder = build_model(tmp_path / arch, arch, task="causal_lm", layers=4)
    ctx = _ctx(folder, "causal_lm", sentiment_file, "group")
    hidden = ctx.model.config.hidden_size
    one_block = sum(b.input_ids.numel() * hidden * 4 for b in ctx.batches)  # fp32 [B, T, H] per batch
    held: list[tuple[int, int, int]] = []  # (block being left, tensors, bytes) after every store, counted here
    put = sensitivity.BlockCache.put

    def counting_put(self, batch, value):
        put(self, batch, value)
        ts = {id(t): t for v in self.inputs for t in sensitivity._tensors(v)}
        held.append((self.block, len(ts), sum(t.numel() * t.element_size() for t in ts.values())))

    monkeypatch.setattr(sensitivity.BlockCache, "put", counting_put)
    fast = KLSensitivity(replay=True).compute(ctx)
    naive = KLSensitivity(replay=False).compute(ctx)
    assert held and {blk for blk, _, _ in held} == {0, 1, 2}  # it moved through the blocks
    assert max(n for _, n, _ in held) <= len(ctx.batches)  # one tensor per batch, never two blocks
    assert max(b for _, _, b in held) == one_block == fast.extra["cache_peak_bytes"]
    assert fast.extra["cache_peak_tensors"] == len(ctx.batches)
    for g in naive.scores:
        for k, v in naive.scores[g].items():
            assert fast.scores[g][k] == pytest.approx(v, abs=1e-6, rel=1e-6)


def test_parts_over_disjoint_batches_combine_into_the_one_process_table(tmp_path, sentiment_file):
    from search.pipeline import split_batches

    folder = build_model(tmp_path / "llama", "llama", task="causal_lm", layers=3)
    ctx = _ctx(folder, "causal_lm", sentiment_file, "layer")
    method = KLSensitivity()
    whole = method.compute(ctx)
    runs = split_batches(len(ctx.batches), 2)
    assert runs == [[0, 1], [2]]
    parts = [method.partial(ctx, ids) for ids in reversed(runs)]  # any order of the parts
    split = method.combine(ctx, parts)
    assert split.scores == whole.scores  # to the last bit: the same sums in the same order
    assert split.extra["parts"] == 2 and split.samples == whole.samples
    with pytest.raises(InvalidInputError) as e:
        method.combine(ctx, parts[:1])
    assert e.value.field == "calibration"


def test_split_batches_cuts_consecutive_runs_of_near_equal_size() -> None:
    from search.pipeline import split_batches

    assert split_batches(7, 3) == [[0, 1, 2], [3, 4], [5, 6]]
    assert split_batches(2, 5) == [[0], [1]]
    assert split_batches(4, 1) == [[0, 1, 2, 3]]
