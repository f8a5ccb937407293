"""Token classification and regression through the service, end to end: the SDK uploads a tiny
model and its data to the real app (the task read from the model's config), the real job runner
(in-process, no Ray) searches it, and the points the SDK reads back carry the metrics a direct
computation with transformers gives. A T5 is refused before any upload, and a T5 on the server
fails its job before any data is read."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

import bitscout
from search.data import load_text_data, load_token_data, split_data
from tests.bitscout.support import FlakyTransport
from tests.search.test_tasks import direct_regression_metrics, direct_token_metrics
from tests.tiny import TAGS, build_model, build_regressor, build_tagger, scored_rows, tagged_rows, write_jsonl
from tests.workers.conftest import Env
from workers.runner import JobRunner

pytestmark = pytest.mark.slow

JOB: dict[str, Any] = {
    "methods": ["kl"],
    "budget": {"max_avg_bits": 5.0},
    "space": {"bits": [2, 4, 8]},
    "front_points": 4,
}
SIZES = {"calibration_size": 16, "evaluation_size": 32, "max_length": 16, "batch_size": 8}




def _run(env: Env, job_id: str) -> None:
    claim = env.store.claim_next_job(worker_id="w/tasks")
    assert claim is not None and claim.id == job_id
    out = JobRunner(job_id, "w/tasks", env.config(eval_workers=0), store=env.store).run()
    assert out.status == "succeeded", (out, [(e.kind, e.message) for e in env.events(job_id)])


def _checked(front: bitscout.Front, direct: Any, metrics: tuple[str, ...], most: int = 6) -> int:
    """Points whose stored metrics equal a direct computation: every point, however found (uniform,
    the sweep, the closed loop's maps), up to ``most`` of them."""
    n = 0
    for p in front:
        if not p.refined and n < most:
            got = direct({k: v.model_dump() for k, v in p.precision_map.items()})
            for name, value in zip(metrics, got, strict=True):
                assert p.metrics[name] == pytest.approx(value, rel=1e-4, abs=1e-9), (p.label, name)
            n += 1
    return n


def test_a_token_classification_job_end_to_end(env: Env, api: bitscout.Client, tmp_path: Path) -> None:
    model = build_tagger(tmp_path / "tagger")
    data = write_jsonl(tmp_path / "tags.jsonl", tagged_rows(64, seed=1))
    job = api.submit(model=model, data=data, data_options=SIZES, progress=False, **JOB)
    assert job.spec.task is bitscout.Task.token_classification and job.spec.metric is bitscout.Metric.accuracy
    _run(env, job.id)
    job.refresh()
    front = job.pareto()
    assert job.succeeded and front.metric == "accuracy" and front.higher_is_better
    _, evaluation = split_data(load_token_data(data, tag_names=list(TAGS)), calibration=16, evaluation=32, seed=0)
    acc, _ = direct_token_metrics(model, None, evaluation.examples)
    assert front.baseline_metrics["accuracy"] == pytest.approx(acc, abs=1e-12)
    assert _checked(front, lambda pmap: direct_token_metrics(model, pmap, evaluation.examples), ("accuracy", "kl")) >= 3
    assert {p.method for p in front} >= {"kl", "uniform"}


def test_a_regression_job_end_to_end(env: Env, api: bitscout.Client, tmp_path: Path) -> None:
    model = build_regressor(tmp_path / "regressor")
    data = write_jsonl(tmp_path / "scores.jsonl", scored_rows(64, seed=1))
    job = api.submit(model=model, data=data, data_options={**SIZES, "label_field": "score"}, metric="pearson",
                     progress=False, **JOB)  # fmt: skip
    assert job.spec.task is bitscout.Task.regression and job.spec.metric is bitscout.Metric.pearson
    _run(env, job.id)
    front = job.pareto()
    assert front.metric == "pearson" and front.higher_is_better
    _, evaluation = split_data(load_text_data(data, label_field="score", numeric_labels=True),
                               calibration=16, evaluation=32, seed=0)  # fmt: skip
    mse, r = direct_regression_metrics(model, None, evaluation.examples)
    assert front.baseline_metrics["mse"] == pytest.approx(mse, rel=1e-5)
    assert front.baseline_metrics["pearson"] == pytest.approx(r, rel=1e-5)
    assert _checked(front, lambda pmap: direct_regression_metrics(model, pmap, evaluation.examples), ("mse", "pearson")) >= 3


def test_t5_is_refused_before_any_upload_and_before_any_work(env: Env, api: bitscout.Client, tmp_path: Path) -> None:
    t5 = build_model(tmp_path / "t5", "t5")
    data = write_jsonl(tmp_path / "rows.jsonl", scored_rows(8))
    counting = FlakyTransport(api._http._transport, fail=0)
    client = bitscout.Client("http://testserver", api.token, transport=counting, retries=0)
    with pytest.raises(bitscout.InvalidRequest) as exc:
        client.submit(model=t5, data=data, budget={"max_avg_bits": 4}, progress=False)
    assert exc.value.field == "model" and "encoder-decoder" in exc.value.message and counting.calls == []
    proc = subprocess.run([sys.executable, "-m", "bitscout.cli", "submit", "--model", str(t5), "--data", str(data),
                           "--max-avg-bits", "4", "--url", "http://127.0.0.1:9", "--retries", "0"],
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert proc.returncode == 2 and len(lines) == 1 and "T5ForConditionalGeneration is an encoder-decoder" in lines[0]

    # a T5 the server holds: the job fails with model_load_failed before the data are read
    build_model(env.settings.model_root / "t5-tiny", "t5")
    job = env.submit(model={"path": "t5-tiny"}, task="embeddings")
    env.store.claim_next_job(worker_id="w/t5")
    out = JobRunner(job.id, "w/t5", env.config(eval_workers=0), store=env.store).run()
    assert out.status == "failed" and out.code == "model_load_failed"
    failed = env.store.get_job(job_id=job.id)
    assert "encoder-decoder" in (failed.error_message or "") and "loaded" not in env.kinds(job.id)
