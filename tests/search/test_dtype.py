"""A half-precision checkpoint is searched in its own dtype: no float32 copy of the weights, the
metrics and scores computed in float32 / float64 from its outputs."""

from __future__ import annotations

import math

import torch

from search.local import DataOptions, prepare
from search.pipeline import SearchOptions
from tests.tiny import build_model, sentiment_rows, write_jsonl


def test_bf16_checkpoint_is_searched_in_bf16(tmp_path) -> None:
    import transformers as T

    folder = build_model(tmp_path / "llama", "llama", task="causal_lm", layers=2)
    T.AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.bfloat16).save_pretrained(str(folder))
    data = write_jsonl(tmp_path / "text.jsonl", sentiment_rows(120))
    s = prepare(folder, DataOptions(str(data), calibration=4, evaluation=6, max_length=16, batch_size=4, windows=True),
                SearchOptions(bits=(4, 8), methods=("kl", "fisher")), task="causal_lm", device="cpu")  # fmt: skip
    assert {p.dtype for p in s.model.parameters()} == {torch.bfloat16}
    result = s.run()
    assert {p.dtype for p in s.model.parameters()} == {torch.bfloat16}  # left as found
    assert result.baseline_metrics["tokens"] == 6 * 15
    assert all(math.isfinite(p.metrics["perplexity"]) for p in result.points)
    assert {t.method for t in result.sensitivities} == {"kl", "fisher"}
    for table in result.sensitivities:
        scores = [v for row in table.scores.values() for v in row.values()]
        assert all(math.isfinite(v) and v >= 0 for v in scores)
        assert any(row["4"] > row["8"] for row in table.scores.values())
