"""The GPU path: a causal-LM search, its KL table, refinement and export on ``cuda`` agree with the
CPU run (tests that need a GPU skip without one); asking for ``cuda`` without a GPU is refused
naming the field."""

from __future__ import annotations

import pytest
import torch

from search.errors import InvalidInputError
from search.local import DataOptions, prepare, resolve_device
from search.pipeline import SearchOptions
from tests.tiny import build_model, sentiment_rows, write_jsonl

needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU on this machine")


def test_cuda_without_a_gpu_is_refused_naming_the_device(monkeypatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(InvalidInputError) as e:
        resolve_device("cuda")
    assert e.value.field == "device"
    assert resolve_device("auto").type == "cpu"


def _search(tmp_path, device: str):
    model = build_model(tmp_path / "llama", "llama", task="causal_lm", layers=2)
    data = write_jsonl(tmp_path / "text.jsonl", [{"text": r["text"]} for r in sentiment_rows(80, seed=1)])
    return prepare(model, DataOptions(str(data), calibration=4, evaluation=4, max_length=12, batch_size=2, windows=True),
                   SearchOptions(methods=("kl",), bits=(4, 8)), task="causal_lm", device=device)  # fmt: skip


@needs_gpu
def test_a_search_refinement_and_export_on_cuda_agree_with_the_cpu(tmp_path) -> None:
    from search.export import export_artifact
    from search.refine import RefineConfig, refine

    gpu, cpu = _search(tmp_path / "gpu", "cuda"), _search(tmp_path / "cpu", "cpu")
    assert next(gpu.model.parameters()).device.type == "cuda"
    t_gpu, t_cpu = gpu.sensitivity("kl"), cpu.sensitivity("kl")
    for g, row in t_cpu.scores.items():
        for k, v in row.items():
            assert t_gpu.scores[g][k] == pytest.approx(v, rel=1e-3, abs=1e-6)
    pmap = gpu.uniform_candidates()[0].precision_map
    assert gpu.evaluate(pmap)["perplexity"] == pytest.approx(cpu.evaluate(pmap)["perplexity"], rel=1e-4)
    res = refine(gpu, pmap, config=RefineConfig(steps=2, seed=0))
    assert next(res.model.parameters()).device.type == "cuda"
    out = export_artifact(res.model, gpu.space, pmap, tmp_path / "art", qparams=res.qparams)
    assert (tmp_path / "art" / "precision_map.json").is_file() and out is not None
