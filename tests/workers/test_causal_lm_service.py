"""Causal LMs through the service, end to end: the SDK uploads a tiny Llama, a GPT-2 (Conv1D
projections, tied embeddings) or a Llama with tied embeddings and a text file to the real app, the
real job runner (in-process) searches it on token windows with refinement of the recommended point,
and the front is in perplexity: the baseline equals a direct computation of the token-weighted NLL
over the same windows, ``resolve`` answers a new budget, and the refined point downloads."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import bitscout
from search.data import load_text_data, token_windows
from tests.tiny import build_model, sentiment_rows, write_jsonl
from tests.workers.conftest import Env
from workers.runner import JobRunner

pytestmark = pytest.mark.slow

SIZES = {"calibration_size": 6, "evaluation_size": 8, "max_length": 12, "batch_size": 4, "windows": True}




@torch.no_grad()
def _direct_perplexity(model_dir: Path, data: Path) -> tuple[float, int]:
    """exp of the mean NLL of every predicted token of the evaluation windows, one window at a time."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(model_dir)).eval()
    tok = AutoTokenizer.from_pretrained(str(model_dir))
    win = token_windows(load_text_data(data), tok, length=SIZES["max_length"], calibration=SIZES["calibration_size"],
                        evaluation=SIZES["evaluation_size"], batch_size=SIZES["batch_size"], seed=0)  # fmt: skip
    nll, n = 0.0, 0
    for b in win.evaluation:
        for row in b.input_ids:
            logits = model(input_ids=row[None]).logits[0].double()
            nll += float(F.cross_entropy(logits[:-1], row[1:], reduction="sum"))
            n += int(row.numel()) - 1
    return math.exp(nll / n), n


@pytest.mark.parametrize("arch,tie", [("llama", False), ("gpt2", None), ("llama", True)])
def test_a_causal_lm_job_end_to_end(env: Env, api: bitscout.Client, tmp_path: Path, arch: str, tie: bool | None):
    model = build_model(tmp_path / arch, arch, task="causal_lm", layers=2, tie_embeddings=tie)
    data = write_jsonl(tmp_path / "text.jsonl", [{"text": r["text"]} for r in sentiment_rows(120, seed=2)])
    job = api.submit(model=model, data=data, data_options=SIZES, progress=False, methods=["kl"],
                     budget={"max_avg_bits": 5.0}, space={"bits": [2, 4, 8]}, front_points=4,
                     refine={"points": "recommended", "steps": 2})  # fmt: skip
    assert job.spec.task is bitscout.Task.causal_lm and job.spec.metric is bitscout.Metric.perplexity
    claim = env.store.claim_next_job(worker_id="w/lm")
    assert claim is not None and claim.id == job.id
    out = JobRunner(job.id, "w/lm", env.config(eval_workers=0), store=env.store).run()
    assert out.status == "succeeded", (out, [(e.kind, e.message) for e in env.events(job.id)])
    job.refresh()
    front = job.pareto()
    assert front.metric == "perplexity" and not front.higher_is_better
    ppl, tokens = _direct_perplexity(model, data)
    assert front.baseline_metrics["perplexity"] == pytest.approx(ppl, rel=1e-5)
    assert front.baseline_metrics["tokens"] == tokens == SIZES["evaluation_size"] * (SIZES["max_length"] - 1)
    assert all(p.metrics["tokens"] == tokens for p in front)  # every map on the same windows
    low = next(p for p in front if p.label == "uniform 2-bit")
    assert low.metrics["kl"] > 0 and low.metrics["perplexity"] != front.baseline_metrics["perplexity"]

    answer = job.resolve(max_avg_bits=4.0)
    assert answer.cost.avg_bits <= 4.0 + 1e-9

    refined = [p for p in front if p.refined]
    assert len(refined) == 1 and refined[0].artifact_available
    path = job.download(refined[0].id, tmp_path / "quantized")
    assert (path / "model.quant.safetensors").is_file() and (path / "precision_map.json").is_file()
