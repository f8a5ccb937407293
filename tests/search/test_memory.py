"""Memory bounds of the model passes (search.memory): the output store spills to disk and reads back
the exact bytes, passes take the rows the budget allows, and the metrics of an evaluation do not
depend on how its batches are cut or where its reference lives."""

from __future__ import annotations

import pickle
import random

import pytest
import torch
import torch.nn.functional as F

from search.data import TextData, TextExample, tokenize
from search.memory import LIVE_OUTPUTS, OutputStore, pass_budget_bytes, rows_per_pass
from search.tasks import (
    discrepancy,
    discrepancy_sum,
    evaluate,
    load_model,
    model_output,
    output_passes,
    reference_outputs,
)
from tests.tiny import WORDS, build_model


@pytest.fixture(scope="module")
def lm(tmp_path_factory):
    return load_model(build_model(tmp_path_factory.mktemp("mem") / "llama", "llama", task="causal_lm", layers=2),
                      "causal_lm")


@pytest.fixture(scope="module")
def batches(lm):
    rng = random.Random(5)
    lengths = [3, 14, 6, 10, 2, 12, 8, 11, 5, 9]  # uneven: padded batches
    data = TextData([TextExample(" ".join(rng.choice(WORDS) for _ in range(n))) for n in lengths])
    return tokenize(data, lm.tokenizer, max_length=16, batch_size=4)


def _tensors(seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(n, 7, 5, generator=g) for n in (4, 3, 6)]


@pytest.mark.parametrize("memory_bytes", [0, 4 * 7 * 5 * 4, 1 << 30], ids=["spilled", "mixed", "in-memory"])
def test_store_reads_back_the_exact_bytes(memory_bytes: int) -> None:
    outs = _tensors()
    store = OutputStore(memory_bytes)
    for i, t in enumerate(outs):  # written in runs of two rows, as passes write them
        assert store.reserve(t.shape[0], t.shape[1:], t.dtype) == i
        for s in range(0, t.shape[0], 2):
            store.write(i, s, t[s : s + 2])
    assert len(store) == len(outs)
    total = sum(t.numel() * 4 for t in outs)
    assert store.resident_bytes + store.spilled_bytes == total
    assert store.resident_bytes <= memory_bytes
    if memory_bytes == 0:
        assert store.spilled_bytes == total
    elif memory_bytes < total:
        assert 0 < store.resident_bytes and 0 < store.spilled_bytes
    for i, t in enumerate(outs):
        assert torch.equal(store[i], t)
        assert torch.equal(store.read(i, 1, 3), t[1:3])
        assert torch.equal(store.read(i, 2, 99), t[2:])
    again = pickle.loads(pickle.dumps(store))
    assert [torch.equal(a, b) for a, b in zip(again, outs, strict=True)] == [True] * len(outs)
    assert again.spilled_bytes == store.spilled_bytes


def test_store_refuses_rows_of_another_shape() -> None:
    store = OutputStore(0)
    store.reserve(2, (3,), torch.float32)
    with pytest.raises(ValueError, match="do not fit"):
        store.write(0, 0, torch.zeros(2, 4))
    with pytest.raises(ValueError, match="do not fit"):
        store.write(0, 1, torch.zeros(2, 3))


def test_budget_and_rows_per_pass() -> None:
    assert rows_per_pass(100, 100 * LIVE_OUTPUTS * 3) == 3
    assert rows_per_pass(100, 100 * LIVE_OUTPUTS * 3 + 99) == 3
    assert rows_per_pass(10**9, 1) == 1  # at least one row
    assert pass_budget_bytes(available=8 * 1000) == 1000  # a share of what is available ...
    assert pass_budget_bytes(available=1 << 50) == pass_budget_bytes(available=1 << 49)  # ... up to a cap


@torch.no_grad()
@pytest.mark.parametrize("rows", [1, 3])
def test_passes_take_the_rows_the_budget_allows(lm, batches, rows: int) -> None:
    row_bytes = model_output(lm.model, batches[0].rows(0, 1), "causal_lm")[0].numel() * 4
    seen = []
    for i, start, sub, out in output_passes(lm.model, batches, "causal_lm", budget=rows * LIVE_OUTPUTS * row_bytes):
        seen.append((i, start, len(sub)))
        whole = model_output(lm.model, batches[i], "causal_lm")[start : start + len(sub)]
        real = sub.attention_mask.bool()
        torch.testing.assert_close(out[real], whole[real], rtol=1e-5, atol=1e-5)
    assert all(n <= rows for _, _, n in seen) and any(n == rows for _, _, n in seen)
    covered = [(i, r) for i, s, n in seen for r in range(s, s + n)]
    assert covered == [(i, r) for i, b in enumerate(batches) for r in range(len(b))]  # every row once, in order


@torch.no_grad()
def test_metrics_do_not_depend_on_the_budget_or_the_spill(lm, batches) -> None:
    in_memory = reference_outputs(lm.model, batches, "causal_lm", memory_bytes=1 << 30)
    spilled = reference_outputs(lm.model, batches, "causal_lm", budget=1, memory_bytes=0)
    assert spilled.outputs.resident_bytes == 0 and spilled.outputs.spilled_bytes > 0
    assert in_memory.outputs.spilled_bytes == 0
    w = lm.model.model.layers[0].mlp.down_proj.weight
    saved = w.clone()
    try:
        w.add_(0.3 * torch.randn_like(w, generator=torch.Generator().manual_seed(1)))
        whole = evaluate(lm.model, batches, "causal_lm", reference=in_memory, budget=1 << 40)
        by_rows = evaluate(lm.model, batches, "causal_lm", reference=spilled, budget=1)
        # direct: full batches, the whole [B, T, V] at once
        nll = kl = 0.0
        n_tok = n_real = 0
        for b, r in zip(batches, in_memory.outputs, strict=True):
            out = model_output(lm.model, b, "causal_lm").double()
            m = b.attention_mask[:, 1:].bool()
            ce = F.cross_entropy(out[:, :-1].reshape(-1, out.shape[-1]), b.input_ids[:, 1:].reshape(-1), reduction="none")
            nll += float(ce[m.reshape(-1)].sum())
            n_tok += int(m.sum())
            p, q = F.log_softmax(r.double(), -1), F.log_softmax(out, -1)
            real = b.attention_mask.bool()
            kl += float((p.exp() * (p - q)).sum(-1)[real].sum())
            n_real += int(real.sum())
    finally:
        w.copy_(saved)
    assert whole["tokens"] == by_rows["tokens"] == n_tok
    assert kl > 0
    for got in (whole, by_rows):
        assert got["perplexity"] == pytest.approx(torch.tensor(nll / n_tok).exp().item(), rel=1e-5)
        assert got["kl"] == pytest.approx(kl / n_real, rel=1e-5)


@torch.no_grad()
def test_per_example_kl_of_a_causal_lm_is_the_mean_over_its_real_tokens(lm, batches) -> None:
    b = batches[1]
    ref = model_output(lm.model, b, "causal_lm")
    out = ref + 0.5 * torch.randn(ref.shape, generator=torch.Generator().manual_seed(2))
    p, q = F.log_softmax(ref.double(), -1), F.log_softmax(out.double(), -1)
    kl = (p.exp() * (p - q)).sum(-1)
    mask = b.attention_mask.double()
    want = (kl * mask).sum(1) / mask.sum(1)
    got = discrepancy(ref, out, b, "causal_lm")
    torch.testing.assert_close(got, want, rtol=1e-10, atol=0)
    total, n = discrepancy_sum(ref, out, b, "causal_lm")
    assert n == int(mask.sum()) and total == pytest.approx(float((kl * mask).sum()), rel=1e-10)
