"""Every point downloadable, through the real service and a real local Ray: the SDK downloads a point
that was not refined, the service records its export and answers 202, the dispatcher runs the export on
Ray, and the archive it stores reloads onto the model to the metrics the job stored (the compressed-tensors
and dense checkpoints in plain transformers); a second download is served from the store; a refined
point's compressed-tensors and dense checkpoints, written from its stored artifact, reload to that
artifact's weights and metrics; a bad format and a failing export are typed errors; an exporter killed with
SIGKILL or left behind by a dead dispatcher is retried and stores its result once."""

from __future__ import annotations

import json
import os
import shutil
import signal
import uuid
from pathlib import Path
from typing import Any

import pytest
import torch

import bitscout
from bitscout.formats import COMPRESSED_TENSORS, DENSE, NATIVE
from tests.tiny import sentiment_rows, train_classifier
from tests.workers.conftest import Env, wait_until
from workers.runner import JobRunner

pytestmark = pytest.mark.ray


def _own_model(env: Env, assets: Path) -> str:
    """A copy of the tiny model under the server's model root that this test may remove."""
    name = f"bert-{uuid.uuid4().hex[:8]}"
    shutil.copytree(assets / "models" / "bert", assets / "models" / name)
    return name


def _finished_job(env: Env, api: bitscout.Client, model: str) -> bitscout.Job:
    rec = env.submit(model={"path": model})
    claim = env.store.claim_next_job(worker_id="w/x")
    assert claim is not None and claim.id == rec.id
    out = JobRunner(rec.id, "w/x", env.config(eval_workers=0), store=env.store).run()
    assert out.status == "succeeded", (out, [(e.kind, e.message) for e in env.events(rec.id)])
    return api.job(rec.id)


def _reloaded_metrics(env: Env, job_id: str, artifact: Path) -> dict[str, float]:
    """The artifact applied onto a fresh copy of the job's model, evaluated on the job's evaluation rows."""
    from search.tasks import evaluate, load_model
    from workers import sources
    from workers.runner import job_inputs, prepare_job

    spec = env.store.get_job_record(job_id=job_id).spec
    search = prepare_job(spec, job_inputs(spec, env.store, env.config(), sources.ServerPaths(env.config())))
    fresh = load_model(search.model_path, search.task).model
    applied = bitscout.apply(fresh, artifact)
    return dict(evaluate(applied, search.evaluation, search.task, reference=search.reference()))


def _plain_metrics(env: Env, job_id: str, checkpoint: Path, **load: Any) -> tuple[dict[str, float], dict[str, Any]]:
    """A compressed-tensors or dense checkpoint loaded by plain transformers (nothing of bitscout:
    ``AutoModelForSequenceClassification.from_pretrained(DIR)``), evaluated on the job's evaluation
    rows; with its state dict after that (compressed-tensors decompresses at the first forward)."""
    from transformers import AutoModelForSequenceClassification

    from search.tasks import evaluate
    from workers import sources
    from workers.runner import job_inputs, prepare_job

    spec = env.store.get_job_record(job_id=job_id).spec
    search = prepare_job(spec, job_inputs(spec, env.store, env.config(), sources.ServerPaths(env.config())))
    model = AutoModelForSequenceClassification.from_pretrained(str(checkpoint), **load)
    metrics = dict(evaluate(model, search.evaluation, search.task, reference=search.reference()))
    return metrics, model.state_dict()


def _count(env: Env, job_id: str, kind: str, point: int | None = None) -> int:
    return sum(1 for e in env.events(job_id) if e.kind == kind and (point is None or (e.data or {}).get("point") == point))


def test_a_point_that_was_not_refined_downloads_and_reloads_to_its_stored_metrics(
    ray_session: Any, env: Env, api: bitscout.Client, assets: Path, tmp_path: Path
) -> None:
    model = _own_model(env, assets)
    job = _finished_job(env, api, model)
    front = job.pareto()
    rec = front.recommended_point
    assert rec is not None and not rec.refined and not rec.artifact_available and rec.artifact_formats == []
    env.dispatcher(eval_workers=0).start()

    path = job.download("recommended", tmp_path / "q", timeout=300)
    assert path == tmp_path / "q" and (path / "model.quant.safetensors").is_file()
    got = _reloaded_metrics(env, job.id, path)
    metric = front.metric
    assert metric is not None
    assert got[metric] == rec.metrics[metric]
    assert got["kl"] == pytest.approx(rec.metrics["kl"], rel=1e-5, abs=1e-7)
    assert _count(env, job.id, "export_requested") == _count(env, job.id, "exported") == 1
    assert job.point(rec.id).artifact_formats == [NATIVE]

    # The second download is served from the store: no new request, no new export, the same bytes.
    raw1 = api.download(job.id, rec.id, tmp_path / "raw1", extract=False)
    raw2 = job.download(rec.id, tmp_path / "raw2", extract=False, timeout=0)
    assert raw1.read_bytes() == raw2.read_bytes() and raw1.name == f"job-{job.id}-point-{rec.id}-native.tar.gz"
    assert _count(env, job.id, "export_requested") == _count(env, job.id, "export_started") == 1

    # A bad format: refused by the SDK before any request, and by the service, naming the field.
    with pytest.raises(bitscout.InvalidRequest) as err:
        job.download(rec.id, tmp_path / "bad", format="gguf")
    assert err.value.field == "format"
    r = api._http.get(f"/api/v1/jobs/{job.id}/points/{rec.id}/artifact", params={"format": "gguf"})
    assert r.status_code == 422 and r.json()["code"] == "invalid_request" and r.json()["field"] == "format"

    # As compressed-tensors and dense: checkpoints plain transformers loads to the stored metrics.
    for fmt in (COMPRESSED_TENSORS, DENSE):
        out = job.download(rec.id, tmp_path / fmt, format=fmt, timeout=300)
        report = [e for e in env.events(job.id) if e.kind == "exported" and e.data["format"] == fmt]
        assert len(report) == 1 and report[0].data["report"]["format"] == fmt
        plain, _ = _plain_metrics(env, job.id, out)  # the default (fused) attention: equal to float rounding
        assert plain[metric] == rec.metrics[metric], fmt
        assert plain["kl"] == pytest.approx(rec.metrics["kl"], rel=1e-4, abs=1e-7), fmt
        assert _plain_metrics(env, job.id, out, attn_implementation="eager")[0][metric] == rec.metrics[metric]
    assert set(job.point(rec.id).artifact_formats) == {NATIVE, COMPRESSED_TENSORS, DENSE}

    # A failing export (the model was removed from the server) is a typed error, every time, never a 202.
    shutil.rmtree(assets / "models" / model)
    other = next(p for p in front if p.id != rec.id and not p.refined)
    for _ in range(2):
        with pytest.raises(bitscout.InvalidRequest) as failed:
            job.download(other.id, tmp_path / "gone", timeout=300)
        assert failed.value.code is bitscout.ErrorCode.model_load_failed
        assert f"point {other.id} could not be exported as native" in failed.value.message
        assert model in failed.value.message and str(assets) not in failed.value.message  # the user's name for it
    assert _count(env, job.id, "export_failed", other.id) == 1


def test_a_refined_point_downloads_as_compressed_tensors_and_dense_to_its_native_artifact(
    ray_session: Any, env: Env, api: bitscout.Client, assets: Path, tmp_path: Path
) -> None:
    model = _own_model(env, assets)
    train_classifier(assets / "models" / model, sentiment_rows(400, seed=7))  # quantization error for KD to cut
    rec = env.submit(model={"path": model}, budget={"max_avg_bits": 2.5}, refine={"points": "recommended", "steps": 8})
    claim = env.store.claim_next_job(worker_id="w/r")
    assert claim is not None and claim.id == rec.id
    out = JobRunner(rec.id, "w/r", env.config(eval_workers=0), store=env.store).run()
    assert out.status == "succeeded", (out, [(e.kind, e.message) for e in env.events(rec.id)])
    job = api.job(rec.id)
    front = job.pareto()
    refined = next(p for p in front if p.refined)
    assert refined.artifact_formats == [NATIVE]
    env.dispatcher(eval_workers=0).start()

    native = job.download(refined.id, tmp_path / "native", timeout=0)  # stored with the job: no export
    want = _reloaded_metrics(env, job.id, native)
    assert want["kl"] == pytest.approx(refined.metrics["kl"], rel=1e-5, abs=1e-7)
    origin, _ = _plain_metrics(env, job.id, job.download(refined.refined_from, tmp_path / "origin", format=DENSE,
                                                             timeout=300))  # fmt: skip
    _, unrefined = _plain_metrics(env, job.id, tmp_path / "origin")
    states = {}
    for fmt in (COMPRESSED_TENSORS, DENSE):
        path = job.download(refined.id, tmp_path / fmt, format=fmt, timeout=300)
        got, states[fmt] = _plain_metrics(env, job.id, path, attn_implementation="eager")
        assert got[front.metric] == want[front.metric] and got["kl"] == pytest.approx(want["kl"], rel=1e-5, abs=1e-9)
        exported = [e for e in env.events(job.id) if e.kind == "exported" and e.data["point"] == refined.id]
        assert [e.data["format"] for e in exported][-1] == fmt
    info = json.loads((tmp_path / DENSE / "export.json").read_text())["info"]
    assert info["refined"] is True and info["artifact_info"]["refined"] is True  # written from the stored artifact
    assert info["artifact_info"]["best_step"] > 0, info  # a point refinement moved
    # the refined weights, not the unrefined point's: the two checkpoints agree with each other, not with it
    assert all(torch.equal(states[COMPRESSED_TENSORS][k], v) for k, v in states[DENSE].items())
    assert any(not torch.equal(v, unrefined[k]) for k, v in states[DENSE].items())
    assert origin["kl"] != want["kl"]
    assert set(job.point(refined.id).artifact_formats) == {NATIVE, COMPRESSED_TENSORS, DENSE}


def test_an_exporter_killed_mid_export_is_retried_and_stores_its_result_once(
    ray_session: Any, env: Env, api: bitscout.Client, assets: Path, tmp_path: Path
) -> None:
    job = _finished_job(env, api, _own_model(env, assets))
    env.dispatcher(eval_workers=0).start()
    landed = None
    for point in [p for p in job.pareto() if not p.refined][:4]:
        assert env.store.artifact_or_export(job_id=job.id, point_id=point.id, format=NATIVE).state.value == "pending"
        started = env.wait_event(job.id, "export_runner", where=lambda e, p=point.id: e.data["point"] == p, timeout=120)
        os.kill(int(started.data["pid"]), signal.SIGKILL)
        assert wait_until(lambda p=point.id: env.store.get_export(job_id=job.id, point_id=p, format=NATIVE).state.value
                          in ("succeeded", "failed"), timeout=180)  # fmt: skip
        if env.store.get_export(job_id=job.id, point_id=point.id, format=NATIVE).attempts == 2:
            landed = point
            break  # else the export had finished before the kill: try the next point
    assert landed is not None, "no kill landed while an export ran"
    done = env.store.get_export(job_id=job.id, point_id=landed.id, format=NATIVE)
    assert done.state.value == "succeeded" and done.attempts == 2
    assert _count(env, job.id, "export_requeued", landed.id) == 1 and _count(env, job.id, "exported", landed.id) == 1
    path = job.download(landed.id, tmp_path / "k", timeout=0)
    got = _reloaded_metrics(env, job.id, path)
    assert got["kl"] == pytest.approx(landed.metrics["kl"], rel=1e-5, abs=1e-7)


def test_an_export_left_running_by_a_dead_dispatcher_is_put_back_and_run_once(
    ray_session: Any, env: Env, api: bitscout.Client, assets: Path
) -> None:
    job = _finished_job(env, api, _own_model(env, assets))
    point = next(p for p in job.pareto() if not p.refined)
    env.store.artifact_or_export(job_id=job.id, point_id=point.id, format=NATIVE)
    # The previous run of this dispatcher (same id) claimed it and died with its exporter (kill -9).
    dead = env.store.claim_next_export(worker_id=f"{env.workers.dispatcher_id}/dead0")
    assert dead is not None and dead.attempts == 1
    env.dispatcher(eval_workers=0).start()
    assert wait_until(lambda: env.store.get_export(job_id=job.id, point_id=point.id, format=NATIVE).state.value
                      == "succeeded", timeout=180)  # fmt: skip
    assert env.store.get_export(job_id=job.id, point_id=point.id, format=NATIVE).attempts == 2
    assert _count(env, job.id, "exported", point.id) == 1
    from service.store import ExportNotOwned

    with pytest.raises(ExportNotOwned):  # the dead claim can never store a second result
        env.store.finish_export(task=dead, path_or_bytes=b"late")


def test_a_format_this_installation_cannot_write_fails_with_the_field_and_never_hangs(
    env: Env, api: bitscout.Client, assets: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from search.export import formats
    from workers.exporter import PointExporter

    job = _finished_job(env, api, _own_model(env, assets))
    point = next(p for p in job.pareto() if not p.refined)
    monkeypatch.delitem(formats.WRITERS, NATIVE)  # this process's exporter writes no native artifact
    env.store.artifact_or_export(job_id=job.id, point_id=point.id, format=NATIVE)
    task = env.store.claim_next_export(worker_id="w/e")
    assert task is not None
    out = PointExporter(task, env.config(), store=env.store).run()
    assert out["status"] == "failed" and out["code"] == "invalid_request"
    with pytest.raises(bitscout.InvalidRequest) as err:
        job.download(point.id, tmp_path / "none", timeout=0)
    assert err.value.field == "format" and "cannot write format 'native'" in err.value.message
    assert not (Path(env.config().work_dir) / "exports").exists() or not any((Path(env.config().work_dir) / "exports").iterdir())
