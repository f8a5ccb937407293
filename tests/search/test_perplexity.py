"""Causal-LM metrics: perplexity is exp of the token-weighted mean NLL over the evaluation windows
(checked against a plain loop over tokens, one window at a time, no padding), and KL is per token."""

from __future__ import annotations

import math
import random

import pytest
import torch
import torch.nn.functional as F

from search.data import TextData, TextExample, tokenize
from search.tasks import evaluate, load_model, reference_outputs
from tests.tiny import WORDS, build_model


def _windows() -> TextData:
    rng = random.Random(3)
    lengths = [2, 11, 5, 9, 3, 12, 7]  # uneven: batches of 3 pad the short ones
    return TextData([TextExample(" ".join(rng.choice(WORDS) for _ in range(n))) for n in lengths])


@pytest.fixture(scope="module")
def lm(tmp_path_factory):
    return load_model(build_model(tmp_path_factory.mktemp("ppl") / "llama", "llama", task="causal_lm", layers=2), "causal_lm")


def _ids(lm, text: str) -> list[int]:
    return list(lm.tokenizer(text, truncation=True, max_length=16)["input_ids"])


@torch.no_grad()
def test_perplexity_is_token_weighted_nll_over_windows(lm) -> None:
    data = _windows()
    batches = tokenize(data, lm.tokenizer, max_length=16, batch_size=3)
    assert any(bool((b.attention_mask == 0).any()) for b in batches)  # padding is present
    metrics = evaluate(lm.model, batches, "causal_lm")

    nll, tokens, per_window = 0.0, 0, []
    for ex in data.examples:  # one window at a time, unpadded
        ids = _ids(lm, ex.text)
        logits = lm.model(input_ids=torch.tensor([ids]), use_cache=False).logits[0].double()
        w_nll = 0.0
        for t in range(len(ids) - 1):
            w_nll -= float(F.log_softmax(logits[t], dim=-1)[ids[t + 1]])
        nll += w_nll
        tokens += len(ids) - 1
        per_window.append(math.exp(w_nll / (len(ids) - 1)))
    assert metrics["tokens"] == tokens == sum(len(_ids(lm, e.text)) - 1 for e in data.examples)
    assert metrics["perplexity"] == pytest.approx(math.exp(nll / tokens), rel=1e-5)
    # the wrong definitions give other numbers on these windows, so the check above can fail
    assert abs(sum(per_window) / len(per_window) - math.exp(nll / tokens)) > 1e-3 * math.exp(nll / tokens)
    wrong = math.exp(sum(math.log(p) for p in per_window) / len(per_window))  # mean NLL per window
    assert abs(wrong - math.exp(nll / tokens)) > 1e-3 * math.exp(nll / tokens)


@torch.no_grad()
def test_kl_is_per_real_token(lm) -> None:
    data = _windows()
    batches = tokenize(data, lm.tokenizer, max_length=16, batch_size=3)
    ref = reference_outputs(lm.model, batches, "causal_lm")
    ref_single = [lm.model(input_ids=torch.tensor([_ids(lm, e.text)]), use_cache=False).logits[0].double()
                  for e in data.examples]
    w = lm.model.model.layers[0].mlp.down_proj.weight
    saved = w.clone()
    try:
        w.add_(0.5 * torch.randn_like(w, generator=torch.Generator().manual_seed(0)))
        metrics = evaluate(lm.model, batches, "causal_lm", reference=ref)
        kl, tokens = 0.0, 0
        for e, r in zip(data.examples, ref_single, strict=True):
            ids = _ids(lm, e.text)
            out = lm.model(input_ids=torch.tensor([ids]), use_cache=False).logits[0].double()
            for t in range(len(ids)):
                p, q = F.log_softmax(r[t], -1), F.log_softmax(out[t], -1)
                kl += float((p.exp() * (p - q)).sum())
                tokens += 1
    finally:
        w.copy_(saved)
    assert kl > 0
    assert metrics["kl"] == pytest.approx(kl / tokens, rel=1e-5)
