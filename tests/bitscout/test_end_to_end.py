"""The SDK against the real service on a tiny real model, end to end: submit (uploading a model
directory and a JSONL file), wait with a progress bar while a simulated worker runs the real search,
pareto, best, resolve, download, apply; the applied model's metric equals the stored one.
In-process (sync and async) and over a real socket."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path
from typing import Any

import pytest

import bitscout
from tests.bitscout.conftest import TINY_JOB, Service
from tests.bitscout.support import SimulatedRun, evaluate_applied, live_server, run_job

pytestmark = pytest.mark.slow


def _load_model(model_dir: Path) -> Any:
    from transformers import AutoModelForSequenceClassification

    return AutoModelForSequenceClassification.from_pretrained(str(model_dir)).eval()


def _run_worker_in_background(
    service: Service, job_id: str, **kwargs: Any
) -> tuple[threading.Thread, dict[str, Any]]:
    out: dict[str, Any] = {}

    def work() -> None:
        try:
            out["run"] = run_job(service.store, job_id, service.work / job_id, **kwargs)
        except BaseException as exc:  # noqa: BLE001 - re-raised by the test
            out["error"] = exc

    t = threading.Thread(target=work, daemon=True)
    t.start()
    return t, out


def _joined(t: threading.Thread, out: dict[str, Any]) -> SimulatedRun:
    t.join(120)
    if "error" in out:
        raise out["error"]
    run: SimulatedRun = out["run"]
    return run


def _check_results(job: bitscout.Job, run: SimulatedRun, tmp_path: Path) -> None:
    front = job.pareto()
    assert front.metric == "accuracy" and front.higher_is_better
    assert len(front) == len(run.result.points) == job.data.n_points
    assert front.baseline_metrics["accuracy"] == pytest.approx(run.result.baseline_metrics["accuracy"])
    assert {p.method for p in front} >= {"kl", "uniform"}
    rec = front.recommended_point
    assert rec is not None and rec.recommended and rec.meets_budget and rec.artifact_available
    assert rec.id == job.data.recommended_point
    # best() with no limit uses the job's budget: the same choice as the service's recommendation
    assert job.best().id == rec.id
    loose = job.best(max_avg_bits=32)
    assert front.value(loose) == max(v for p in front if (v := front.value(p)) is not None)
    df = front.to_pandas()
    assert list(df["id"]) == [p.id for p in front] and "accuracy" in df.columns

    # download the recommended point's artifact and apply it: the metric the service stored
    path = job.download("recommended", tmp_path / "quantized")
    assert (path / "model.quant.safetensors").is_file() and (path / "precision_map.json").is_file()
    model = bitscout.apply(_load_model(run.model_dir), path)
    got = evaluate_applied(run, model)
    for name, stored in rec.metrics.items():
        assert got[name] == pytest.approx(stored, rel=1e-6, abs=1e-9), name

    # apply a map without an artifact (a point the worker did not export): fake-quantized the same way
    other = next(p for p in front if p.id != rec.id and p.method == "kl")
    assert not other.artifact_available
    # (no workers run here: the service records its export and answers 202 until the timeout)
    with pytest.raises(TimeoutError, match="still being exported as native"):
        job.download(other.id, tmp_path / "nothing", timeout=0)
    model2 = job.apply(_load_model(run.model_dir), other)
    got2 = evaluate_applied(run, model2)
    assert got2["accuracy"] == pytest.approx(other.metrics["accuracy"], abs=1e-9)


def test_sdk_in_process_end_to_end(
    resolving_service: Service, tiny: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    service = resolving_service
    client = service.client()
    job = client.submit(model=tiny["model"], data=tiny["data"], **TINY_JOB)
    assert job.status is bitscout.JobStatus.queued and not job.finished
    assert job.spec.model.upload_id and job.spec.data.upload_id
    assert job.spec.metric is bitscout.Metric.accuracy

    t, out = _run_worker_in_background(service, job.id, stage_delay=0.02)
    job.wait(progress=True, poll_interval=0.02, timeout=120)
    run = _joined(t, out)
    assert job.succeeded and job.progress == 1.0 and job.stage == "done"
    err = capsys.readouterr().err
    assert f"job {job.id[:8]}" in err and "100%" in err

    kinds = [e.kind for e in job.events()]
    assert (
        kinds[0] == "created"
        and "claimed" in kinds
        and "stage" in kinds
        and kinds[-1] in ("succeeded", "artifact")
    )
    tables = job.sensitivity()
    assert [t.method for t in tables] == ["kl"] and tables[0].scores

    _check_results(job, run, tmp_path)

    # resolve answers a new budget from the stored sensitivities: a map within it
    r = job.resolve(max_avg_bits=4.0)
    assert r.cost.avg_bits <= 4.0 + 1e-9 and r.precision_map and r.budget.max_avg_bits == 4.0
    assert set(r.precision_map) <= {g for p in job.pareto() for g in p.precision_map}
    with pytest.raises(bitscout.InvalidRequest) as exc:
        job.resolve({"max_avg_bits": 0.01})
    assert exc.value.code is bitscout.ErrorCode.budget_infeasible and exc.value.status == 422
    assert exc.value.field == "budget.max_avg_bits"


def test_group_wise_options_and_ties_through_the_service(
    resolving_service: Service, tiny: dict[str, Path], tmp_path: Path
) -> None:
    """``space.bits`` with a group-wise option and ``space.tie`` go from the SDK to the search and back:
    every stored map is tied, names its group size, resolves to a tied map and applies to its metric."""
    service = resolving_service
    client = service.client()
    job_opts = {**TINY_JOB, "space": {"bits": ["4g16", 8, 2], "tie": "qkv", "granularity": "layer"}}
    job = client.submit(model=tiny["model"], data=tiny["data"], **job_opts)
    assert job.spec.space.bits == [2, "4g16", 8] and job.spec.space.tie == ["attention_inputs"]
    t, out = _run_worker_in_background(service, job.id)
    job.wait(poll_interval=0.02, timeout=120)
    run = _joined(t, out)
    assert job.succeeded and len(run.search.space.ties) == 2
    ties = [t.groups for t in run.search.space.ties]
    front = job.pareto()
    assert any(o.group_size == 16 and o.key() == "4g16" for p in front for o in p.precision_map.values())
    for p in front:
        assert all(len({p.precision_map[g].key() for g in tie}) == 1 for tie in ties), p.id
    r = job.resolve(max_avg_bits=5.0)
    assert all(len({r.precision_map[g].key() for g in tie}) == 1 for tie in ties)
    point = next(p for p in front if any(o.group_size for o in p.precision_map.values()) and p.method != "uniform")
    got = evaluate_applied(run, job.apply(_load_model(run.model_dir), point))
    assert got["accuracy"] == pytest.approx(point.metrics["accuracy"], abs=1e-9)


def test_async_client_end_to_end(resolving_service: Service, tiny: dict[str, Path], tmp_path: Path) -> None:
    service = resolving_service

    async def main() -> None:
        async with service.async_client() as client:
            job = await client.submit(model=str(tiny["model"]), data=str(tiny["data"]), **TINY_JOB)
            assert isinstance(job, bitscout.AsyncJob) and job.status is bitscout.JobStatus.queued
            run = await asyncio.to_thread(run_job, service.store, job.id, service.work / job.id)
            await job.wait(progress=False, poll_interval=0.01, timeout=60)
            assert job.succeeded
            front = await job.pareto()
            assert len(front) == len(run.result.points)
            best = await job.best()
            assert best.id == front.recommended
            assert (await job.point("recommended")).precision_map == best.precision_map
            r = await job.resolve(max_avg_bits=4.0)
            assert r.cost.avg_bits <= 4.0 + 1e-9
            events = await job.events()
            assert events and events[0].kind == "created"
            path = await job.download("recommended", tmp_path / "q")
            model = bitscout.apply(_load_model(run.model_dir), path)
            got = evaluate_applied(run, model)
            assert got["accuracy"] == pytest.approx(best.metrics["accuracy"], abs=1e-9)
            again = await client.job(job.id)
            assert again.id == job.id and again.succeeded
            page = await client.jobs()
            assert [j.id for j in page.items] == [job.id]

    asyncio.run(main())


def test_sdk_over_a_real_socket(service: Service, tiny: dict[str, Path], tmp_path: Path) -> None:
    with live_server(service.app) as url:
        client = bitscout.Client(url, service.tokens["alice"], retries=0)
        job = client.submit(model=tiny["model"], data=tiny["data"], **TINY_JOB)
        t, out = _run_worker_in_background(service, job.id)
        job.wait(progress=False, poll_interval=0.05, timeout=120)
        run = _joined(t, out)
        _check_results(job, run, tmp_path)
        # this server has no allocator: resolve is unavailable, a typed error
        with pytest.raises(bitscout.ServiceUnavailable) as exc:
            job.resolve(max_avg_bits=4.0)
        assert exc.value.status == 503 and "resolve" in exc.value.message
        client.close()
