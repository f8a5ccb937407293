"""Downloads in every format through the real app, on SQLite and PostgreSQL: a point not stored in the
format asked for gets one export row (pending) and a 202 with ``Retry-After``; the workers' side of the
store claims it once, and only the claim that holds it stores a result; a stored export is served, a
failed one answers its error; a refined point serves its stored artifact and has its other formats
exported on request, or has none when its artifact was never stored."""

from __future__ import annotations

import tarfile
import threading
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from bitscout.errors import error_from_body
from bitscout.formats import COMPRESSED_TENSORS, DENSE, NATIVE
from service.models import ExportRow, utcnow
from service.store import EXPORT_RETRY_AFTER_S, ExportNotOwned, Store
from tests.service.conftest import make_points
from tests.service.test_api import API, Api, api, assert_error, snapshot  # noqa: F401 - the api fixture


def _url(jid: str, point: int, fmt: str | None = None) -> str:
    return f"{API}/jobs/{jid}/points/{point}/artifact" + (f"?format={fmt}" if fmt is not None else "")


def _export_rows(store: Store) -> list[tuple[str, int, str, str, int]]:
    with store.engine.connect() as conn:
        rows = conn.execute(
            sa.select(ExportRow.job_id, ExportRow.point_idx, ExportRow.format, ExportRow.state, ExportRow.attempts)
            .order_by(ExportRow.point_idx, ExportRow.format)
        ).all()
    return [tuple(r) for r in rows]  # type: ignore[misc]


def _artifact_dir(tmp_path: Path, name: str = "out") -> Path:
    d = tmp_path / name
    d.mkdir()
    (d / "model.safetensors").write_bytes(b"weights of point 1")
    (d / "config.json").write_text('{"quantization_config": {}}\n')
    return d


def test_a_point_is_exported_on_first_request_and_served_from_the_store_after(api: Api, tmp_path: Path) -> None:  # noqa: F811
    jid = api.finished("alice")
    before_events = api.store.list_events(job_id=jid, limit=100)
    r = api.client.get(_url(jid, 1, DENSE), headers=api.h())
    assert r.status_code == 202, r.text
    assert r.headers["retry-after"] == str(int(EXPORT_RETRY_AFTER_S))
    body = r.json()
    assert body["state"] == "pending" and body["format"] == DENSE and body["point_id"] == 1 and body["attempts"] == 0
    assert body["retry_after_s"] == EXPORT_RETRY_AFTER_S and "dense" in body["message"]
    assert _export_rows(api.store) == [(jid, 1, DENSE, "pending", 0)]
    # Asking again (in another spelling of the format) writes nothing new.
    r2 = api.client.get(_url(jid, 1, " Dense "), headers=api.h())
    assert r2.status_code == 202 and r2.json()["state"] == "pending"
    assert _export_rows(api.store) == [(jid, 1, DENSE, "pending", 0)]
    kinds = [e.kind for e in api.store.list_events(job_id=jid, limit=100)][len(before_events):]
    assert kinds == ["export_requested"]

    # The workers' side: one claim takes it, a second finds nothing.
    task = api.store.claim_next_export(worker_id="d/1")
    assert task is not None and (task.job_id, task.point_id, task.format, task.attempts) == (jid, 1, DENSE, 1)
    assert api.store.claim_next_export(worker_id="d/2") is None
    running = api.client.get(_url(jid, 1, DENSE), headers=api.h())
    assert running.status_code == 202 and running.json()["state"] == "running" and running.json()["attempts"] == 1
    assert api.client.get(f"{API}/jobs/{jid}/points/1", headers=api.h()).json()["artifact_formats"] == []

    done = api.store.finish_export(task=task, path_or_bytes=_artifact_dir(tmp_path), report={"quantized": 6})
    assert done.state.value == "succeeded"
    got = api.client.get(_url(jid, 1, DENSE), headers=api.h())
    assert got.status_code == 200 and f"job-{jid}-point-1-dense.tar.gz" in got.headers["content-disposition"]
    (tmp_path / "dl.tar.gz").write_bytes(got.content)
    with tarfile.open(tmp_path / "dl.tar.gz") as tar:
        assert sorted(tar.getnames()) == ["config.json", "model.safetensors"]
        member = tar.extractfile("model.safetensors")
        assert member is not None and member.read() == b"weights of point 1"
    point = api.client.get(f"{API}/jobs/{jid}/points/1", headers=api.h()).json()
    assert point["artifact_formats"] == [DENSE] and point["artifact_available"] is False
    pareto = api.client.get(f"{API}/jobs/{jid}/pareto", headers=api.h()).json()
    assert [p["artifact_formats"] for p in pareto["points"]] == [[DENSE] if p["id"] == 1 else [] for p in pareto["points"]]
    # Served from the store: no new row, no new claim.
    assert api.client.get(_url(jid, 1, DENSE), headers=api.h()).status_code == 200
    assert api.store.claim_next_export(worker_id="d/3") is None
    exported = [e for e in api.store.list_events(job_id=jid, limit=100) if e.kind == "exported"]
    assert len(exported) == 1 and exported[0].data["report"] == {"quantized": 6}
    # Other formats of the same point, and the default format, are requests of their own.
    assert api.client.get(_url(jid, 1), headers=api.h()).status_code == 202
    assert [r[2] for r in _export_rows(api.store)] == [DENSE, NATIVE]


def test_a_bad_format_is_refused_with_the_field_and_writes_nothing(api: Api) -> None:  # noqa: F811
    jid = api.finished("alice")
    before = snapshot(api.store)
    for fmt in ("gguf", "", "native2"):
        body = assert_error(api.client.get(_url(jid, 1, fmt), headers=api.h()), 422, "invalid_request", "format")
        assert "native, compressed-tensors, dense" in body["message"]
    assert snapshot(api.store) == before and _export_rows(api.store) == []
    # the job and the point are checked as before: another user's job and a missing point are 404
    assert_error(api.client.get(_url(jid, 1, DENSE), headers=api.h("bob")), 404, "not_found")
    assert_error(api.client.get(_url(jid, 99, DENSE), headers=api.h()), 404, "not_found", "point_id")
    assert _export_rows(api.store) == []


def test_a_failed_export_answers_its_error_every_time(api: Api) -> None:  # noqa: F811
    jid = api.finished("alice")
    for point, fmt in ((1, DENSE), (2, COMPRESSED_TENSORS)):
        assert api.client.get(_url(jid, point, fmt), headers=api.h()).status_code == 202
    refused = api.store.claim_next_export(worker_id="d/a")
    crashed = api.store.claim_next_export(worker_id="d/b")
    assert refused is not None and crashed is not None and refused.point_id == 1 and crashed.point_id == 2
    api.store.fail_export(task=refused, code="invalid_request", field="format",
                          message="format: this installation cannot write format 'dense'")  # fmt: skip
    api.store.fail_export(task=crashed, code="internal", message="internal error in the exporter: KeyError: 'x'")
    for _ in range(2):  # stored: the same answer again, and never a 202
        r = api.client.get(_url(jid, 1, DENSE), headers=api.h())
        body = assert_error(r, 422, "invalid_request", "format")
        assert "cannot write format 'dense'" in body["message"] and body["details"]["state"] == "failed"
        err = error_from_body(r.status_code, body)
        assert type(err).__name__ == "InvalidRequest" and err.field == "format"
        r = api.client.get(_url(jid, 2, COMPRESSED_TENSORS), headers=api.h())
        body = assert_error(r, 500, "internal")
        assert "KeyError" in body["message"]
    assert api.store.claim_next_export(worker_id="d/c") is None
    # A failed claim cannot be finished by its worker afterwards.
    with pytest.raises(ExportNotOwned):
        api.store.finish_export(task=crashed, path_or_bytes=b"late")


def _finished_with_refined(api: Api, tmp_path: Path, *, store_artifact: bool) -> str:  # noqa: F811
    job = api.submit("alice")
    rec = api.store.claim_next_job(worker_id="w")
    assert rec is not None
    points = make_points(3, with_uniform=False)
    points.append({**points[1], "refined": True, "refined_from": 1, "label": "kl #1 refined"})
    art = {3: _artifact_dir(tmp_path, "refined")} if store_artifact else None
    api.store.finish_job(job_id=rec.id, worker_id="w", points=points, front_info={"baseline_metrics": {}},
                         artifacts=art)  # fmt: skip
    return str(job["id"])


def test_a_refined_point_serves_its_stored_artifact_and_exports_the_other_formats_on_request(
    api: Api, tmp_path: Path  # noqa: F811
) -> None:
    jid = _finished_with_refined(api, tmp_path, store_artifact=True)
    r = api.client.get(_url(jid, 3), headers=api.h())
    assert r.status_code == 200 and r.headers["content-type"] == "application/octet-stream"
    assert api.client.get(_url(jid, 3, NATIVE), headers=api.h()).content == r.content
    for fmt in (DENSE, COMPRESSED_TENSORS):  # written from that artifact by the workers
        assert api.client.get(_url(jid, 3, fmt), headers=api.h()).status_code == 202
    assert api.client.get(f"{API}/jobs/{jid}/points/3", headers=api.h()).json()["artifact_formats"] == [NATIVE]
    # its origin is an ordinary point: exported on request too
    assert api.client.get(_url(jid, 1, DENSE), headers=api.h()).status_code == 202
    assert _export_rows(api.store) == [(jid, 1, DENSE, "pending", 0), (jid, 3, COMPRESSED_TENSORS, "pending", 0),
                                       (jid, 3, DENSE, "pending", 0)]  # fmt: skip


def test_a_refined_point_whose_weights_were_not_stored_is_never_exported_again(api: Api, tmp_path: Path) -> None:  # noqa: F811
    jid = _finished_with_refined(api, tmp_path, store_artifact=False)
    for fmt in (NATIVE, DENSE, COMPRESSED_TENSORS):
        body = assert_error(api.client.get(_url(jid, 3, fmt), headers=api.h()), 404, "not_found", "point_id")
        assert "refined weights" in body["message"] and "point 1" in body["message"]
    assert _export_rows(api.store) == []


def test_an_export_whose_worker_is_lost_goes_back_to_pending_and_its_old_claim_stores_nothing(
    api: Api, tmp_path: Path  # noqa: F811
) -> None:
    jid = api.finished("alice")
    assert api.client.get(_url(jid, 0, DENSE), headers=api.h()).status_code == 202
    first = api.store.claim_next_export(worker_id="d1/aaa")
    assert first is not None
    # the dispatcher saw its task die: back to pending, claimed again under a new claim
    assert api.store.requeue_exports(worker_id="d1/aaa", max_attempts=3, reason="worker died") == [(jid, 0, DENSE)]
    assert api.store.requeue_exports(worker_id="d1/aaa", max_attempts=3, reason="again") == []
    second = api.store.claim_next_export(worker_id="d1/bbb")
    assert second is not None and second.attempts == 2
    with pytest.raises(ExportNotOwned):
        api.store.finish_export(task=first, path_or_bytes=_artifact_dir(tmp_path, "late"))
    with pytest.raises(ExportNotOwned):
        api.store.fail_export(task=first, code="internal", message="late")
    assert api.client.get(_url(jid, 0, DENSE), headers=api.h()).json()["state"] == "running"
    # the dispatcher itself was lost: its heartbeat goes stale, another dispatcher puts it back
    assert api.store.beat_exports(worker_ids=["d1/bbb"]) == 1
    assert api.store.requeue_exports(older_than_s=60, max_attempts=3, reason="stale") == []
    with api.store.engine.begin() as conn:
        conn.execute(sa.update(ExportRow).values(heartbeat_at=utcnow() - timedelta(seconds=120)))
    assert api.store.requeue_exports(older_than_s=60, max_attempts=3, reason="stale") == [(jid, 0, DENSE)]
    third = api.store.claim_next_export(worker_id="d2/ccc")
    assert third is not None and third.attempts == 3
    # a restarted dispatcher puts back what its previous run (its id as the claims' prefix) held
    assert api.store.requeue_exports(worker_prefix="d1/", max_attempts=5, reason="restart") == []
    assert api.store.requeue_exports(worker_prefix="d2/", max_attempts=5, reason="restart") == [(jid, 0, DENSE)]
    # past max_attempts starts a lost worker fails it, with the reason
    fourth = api.store.claim_next_export(worker_id="d2/ddd")
    assert fourth is not None and fourth.attempts == 4
    api.store.requeue_exports(worker_id="d2/ddd", max_attempts=4, reason="worker died: SIGKILL")
    body = assert_error(api.client.get(_url(jid, 0, DENSE), headers=api.h()), 500, "internal")
    assert "lost 4 times" in body["message"] and "SIGKILL" in body["message"]
    with pytest.raises(ValueError, match="needs worker_id"):
        api.store.requeue_exports(max_attempts=3, reason="none")


def test_concurrent_requests_write_one_row_and_concurrent_claims_take_it_once(api: Api) -> None:  # noqa: F811
    jid = api.finished("alice")
    answers: list[Any] = []

    def ask() -> None:
        answers.append(api.store.artifact_or_export(job_id=jid, point_id=2, format=COMPRESSED_TENSORS, owner="alice"))

    threads = [threading.Thread(target=ask) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    statuses = [a.state.value for a in answers]
    assert statuses == ["pending"] * 6
    assert _export_rows(api.store) == [(jid, 2, COMPRESSED_TENSORS, "pending", 0)]
    assert [e.kind for e in api.store.list_events(job_id=jid, limit=100)].count("export_requested") == 1
    got: list[Any] = []

    def claim(i: int) -> None:
        got.append(api.store.claim_next_export(worker_id=f"d/{i}"))

    threads = [threading.Thread(target=claim, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    claimed = [t for t in got if t is not None]
    assert len(claimed) == 1 and claimed[0].attempts == 1
