"""The store's contract, run against SQLite and PostgreSQL (the ``db_url`` fixture)."""

from __future__ import annotations

import multiprocessing as mp
import threading
import time
from pathlib import Path

import pytest

from bitscout.errors import Conflict, InvalidRequest, NotFound
from bitscout.schemas import JobStatus
from service.settings import Settings
from service.store import FrontInfo, JobNotOwned, JobRecord, PointRecord, Store
from tests.service.conftest import job_spec, make_points


def _running(store: Store, worker: str = "w1", **spec: object) -> JobRecord:
    store.create_job(owner="alice", spec=job_spec(**spec))
    rec = store.claim_next_job(worker_id=worker)
    assert rec is not None
    return rec


def test_create_get_list(store: Store) -> None:
    a = store.create_job(owner="alice", spec=job_spec())
    assert a.status is JobStatus.queued and a.progress == 0 and a.attempts == 0
    assert a.spec.metric is not None and a.spec.metric.value == "accuracy"
    assert a.created_at.tzinfo is not None
    b = store.create_job(owner="alice", spec=job_spec(seed=2))
    store.create_job(owner="bob", spec=job_spec())
    assert store.get_job(job_id=a.id).id == a.id
    assert store.get_job(job_id=a.id, owner="alice").owner == "alice"
    with pytest.raises(NotFound):
        store.get_job(job_id=a.id, owner="bob")
    with pytest.raises(NotFound):
        store.get_job(job_id="nope")
    page = store.list_jobs(owner="alice", limit=1)
    assert page.total == 2 and [j.id for j in page.items] == [b.id] and page.next_offset == 1
    page2 = store.list_jobs(owner="alice", limit=1, offset=1)
    assert [j.id for j in page2.items] == [a.id] and page2.next_offset is None
    assert store.list_jobs().total == 3
    assert store.list_jobs(status="running").total == 0
    assert store.count_jobs()["queued"] == 3
    kinds = [e.kind for e in store.list_events(job_id=a.id)]
    assert kinds == ["created"]


def test_idempotency(store: Store) -> None:
    a = store.create_job(owner="alice", spec=job_spec(), idempotency_key="k1")
    again = store.create_job(owner="alice", spec=job_spec(), idempotency_key="k1")
    assert again.id == a.id
    with pytest.raises(Conflict) as exc:
        store.create_job(owner="alice", spec=job_spec(seed=9), idempotency_key="k1")
    assert exc.value.field == "idempotency_key"
    other = store.create_job(owner="bob", spec=job_spec(), idempotency_key="k1")
    assert other.id != a.id
    assert store.list_jobs().total == 2


def test_idempotency_concurrent(settings: Settings) -> None:
    """Many threads submitting with one key create one job."""
    ids: list[str] = []
    errors: list[BaseException] = []

    def submit() -> None:
        st = Store.from_settings(settings)
        try:
            ids.append(st.create_job(owner="alice", spec=job_spec(), idempotency_key="same").id)
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)
        finally:
            st.close()

    threads = [threading.Thread(target=submit) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert len(set(ids)) == 1


def test_max_active(store: Store) -> None:
    store.create_job(owner="alice", spec=job_spec(), max_active=1)
    with pytest.raises(Conflict):
        store.create_job(owner="alice", spec=job_spec(), max_active=1)
    store.create_job(owner="bob", spec=job_spec(), max_active=1)


def test_claim_fifo_and_fields(store: Store) -> None:
    assert store.claim_next_job(worker_id="w") is None
    first = store.create_job(owner="alice", spec=job_spec())
    time.sleep(0.002)
    second = store.create_job(owner="bob", spec=job_spec())
    rec = store.claim_next_job(worker_id="w1")
    assert rec is not None and rec.id == first.id
    assert rec.status is JobStatus.running and rec.attempts == 1 and rec.claimed_by == "w1"
    assert rec.heartbeat_at is not None and rec.started_at is not None and rec.owner == "alice"
    rec2 = store.claim_next_job(worker_id="w2")
    assert rec2 is not None and rec2.id == second.id
    assert store.claim_next_job(worker_id="w3") is None
    assert [e.kind for e in store.list_events(job_id=first.id)] == ["created", "claimed"]


def test_heartbeat_progress_and_stage_events(store: Store) -> None:
    rec = _running(store)
    assert store.heartbeat(
        job_id=rec.id, worker_id="w1", progress=0.25, stage="sensitivity", message="probe 3/12"
    )
    assert store.heartbeat(job_id=rec.id, worker_id="w1", progress=7.0, stage="sensitivity")
    job = store.get_job(job_id=rec.id)
    assert job.progress == 1.0 and job.stage == "sensitivity" and job.message == "probe 3/12"
    events = store.list_events(job_id=rec.id)
    assert [e.kind for e in events].count("stage") == 1
    eid = store.add_event(
        job_id=rec.id, kind="message", stage="sensitivity", message="hello", data={"x": 1.0}
    )
    evs = store.list_events(job_id=rec.id, after=events[-1].id)
    assert [e.id for e in evs] == [eid] and evs[0].data == {"x": 1.0}
    with pytest.raises(JobNotOwned):
        store.heartbeat(job_id=rec.id, worker_id="other")
    with pytest.raises(NotFound):
        store.heartbeat(job_id="missing", worker_id="w1")
    with pytest.raises(NotFound):
        store.add_event(job_id="missing", kind="x")


def test_cancel(store: Store) -> None:
    queued = store.create_job(owner="alice", spec=job_spec())
    done = store.request_cancel(job_id=queued.id, owner="alice")
    assert (
        done.status is JobStatus.canceled and done.finished_at is not None and done.error_code == "canceled"
    )
    assert store.request_cancel(job_id=queued.id).status is JobStatus.canceled  # idempotent
    rec = _running(store)
    with pytest.raises(NotFound):
        store.request_cancel(job_id=rec.id, owner="bob")
    job = store.request_cancel(job_id=rec.id, owner="alice")
    assert job.status is JobStatus.running and job.cancel_requested
    assert store.heartbeat(job_id=rec.id, worker_id="w1") is False
    with pytest.raises(JobNotOwned):
        store.mark_canceled(job_id=rec.id, worker_id="other")
    final = store.mark_canceled(job_id=rec.id, worker_id="w1")
    assert final.status is JobStatus.canceled and not final.cancel_requested
    kinds = [e.kind for e in store.list_events(job_id=rec.id)]
    assert kinds[-2:] == ["cancel_requested", "canceled"]
    rec2 = _running(store, "w2")
    store.finish_job(job_id=rec2.id, worker_id="w2", points=make_points(2, with_uniform=False))
    with pytest.raises(Conflict):
        store.request_cancel(job_id=rec2.id)


def test_finish_job(store: Store) -> None:
    rec = _running(store, budget={"max_size_mb": 9.0})
    pts = make_points(5)
    pts[1]["metrics"]["accuracy"] = float("nan")
    pts[2]["refined_from"] = 0
    pts[2]["refined"] = True
    pts[3]["custom"] = {"k": 1}
    job = store.finish_job(
        job_id=rec.id,
        worker_id="w1",
        points=pts,
        front_info={"baseline_metrics": {"accuracy": 0.99}, "timings": {"a": 1}},
    )
    assert job.status is JobStatus.succeeded and job.progress == 1 and job.n_points == 7 and job.finished_at
    pareto = store.get_pareto(job_id=rec.id)
    assert (
        pareto.metric == "accuracy"
        and pareto.higher_is_better
        and pareto.baseline_metrics == {"accuracy": 0.99}
    )
    assert len(pareto.points) == 7 and [p.id for p in pareto.points] == list(range(7))
    by_id = {p.id: p for p in pareto.points}
    assert by_id[1].metrics["accuracy"] is None
    assert by_id[2].refined and by_id[2].refined_from == 0
    # budget 9 MB: points 0 (4 MB), 1 (6 MB), 2 (8 MB), uniform 4-bit (6 MB) meet it
    assert [p.meets_budget for p in pareto.points] == [True, True, True, False, False, True, False]
    # best accuracy among those: point 2 (0.66) vs uniform 4-bit (0.72) -> uniform 4-bit (id 5)
    assert pareto.recommended == 5 and job.recommended_point == 5 and by_id[5].recommended
    assert by_id[0].precision_map["bert.encoder.layer.0.attention.self.query"].bits == 2
    assert by_id[0].cost.size_mb == pytest.approx(4.0)
    point = store.get_point(job_id=rec.id, point_id=3)
    assert point.label == "kl #3" and not point.artifact_available
    with pytest.raises(NotFound):
        store.get_point(job_id=rec.id, point_id=99)
    assert store.get_result_info(job_id=rec.id)["timings"] == {"a": 1}
    # a second finish (a lost worker coming back) stores nothing
    with pytest.raises(JobNotOwned):
        store.finish_job(job_id=rec.id, worker_id="w1", points=make_points(3))
    assert len(store.get_points(job_id=rec.id)) == 7


def test_finish_explicit_recommended_and_bad_points(store: Store) -> None:
    rec = _running(store)
    with pytest.raises(InvalidRequest):
        store.finish_job(job_id=rec.id, worker_id="w1", points=[{"cost": {}}])
    with pytest.raises(InvalidRequest):
        store.finish_job(job_id=rec.id, worker_id="w1", points=make_points(2), front_info={"recommended": 5})
    assert store.get_job(job_id=rec.id).status is JobStatus.running
    assert store.get_points(job_id=rec.id) == []
    job = store.finish_job(
        job_id=rec.id, worker_id="w1", points=make_points(2), front_info={"recommended": 1}
    )
    assert job.recommended_point == 1


def test_finish_by_other_worker_stores_nothing(store: Store) -> None:
    rec = _running(store)
    with pytest.raises(JobNotOwned):
        store.finish_job(job_id=rec.id, worker_id="intruder", points=make_points(2))
    assert store.get_points(job_id=rec.id) == []
    assert store.get_job(job_id=rec.id).status is JobStatus.running


def _stored(store: Store, job_id: str) -> tuple[list[dict[str, object]], dict[str, object]]:
    """Every stored point (without timestamps) and the result info of a job."""
    points = [p.model_dump() for p in store.get_pareto(job_id=job_id).points]
    return points, store.get_result_info(job_id=job_id)


def test_finish_job_takes_typed_records_and_dicts_alike(store: Store) -> None:
    pts = make_points(4)
    pts[1]["metrics"]["accuracy"] = float("nan")
    pts[2].update(refined=True, refined_from=0, custom={"k": 1}, id=7)
    pts[3]["precision_map"] = {g: "3a" for g in pts[3]["precision_map"]}
    pts[3]["cost"]["latency_ms"] = float("inf")
    front = {"baseline_metrics": {"accuracy": 0.9, "kl": float("nan")}, "timings": {"a": 1}}
    by_dict = _running(store, "w1", budget={"max_size_mb": 9.0})
    store.finish_job(job_id=by_dict.id, worker_id="w1", points=pts, front_info=front)
    by_model = _running(store, "w2", budget={"max_size_mb": 9.0})
    records = [PointRecord.model_validate(p) for p in pts]
    store.finish_job(
        job_id=by_model.id, worker_id="w2", points=records, front_info=FrontInfo.model_validate(front)
    )
    assert _stored(store, by_dict.id) == _stored(store, by_model.id)
    points, info = _stored(store, by_dict.id)
    assert info == {
        "baseline_metrics": {"accuracy": 0.9, "kl": None},
        "timings": {"a": 1},
        "metric": "accuracy",
        "higher_is_better": True,
        "recommended": 4,  # uniform 4-bit: the best accuracy among the points under 9 MB
    }
    assert points[1]["metrics"]["accuracy"] is None
    assert points[3]["precision_map"][next(iter(pts[3]["precision_map"]))] == {
        "bits": 3, "symmetric": False, "group_size": None, "act_bits": None, "tt_rank": None,
    }  # fmt: skip
    assert points[3]["cost"]["latency_ms"] == 0.0  # a non-finite cost is stored as 0
    assert records[2].model_extra == {"custom": {"k": 1}}  # "id" is dropped: a point's id is its index


@pytest.mark.parametrize(
    ("bad", "field"),
    [
        ({"cost": None}, "points.1.cost"),
        ({"cost": {"size_bytes": 1.0, "avg_bits": 4.0, "bops": 1.0}}, "points.1.cost.latency_ms"),
        ({"cost": {"size_bytes": -1.0, "avg_bits": 4.0, "bops": 1.0, "latency_ms": 1.0}}, "points.1.cost.size_bytes"),
        ({"precision_map": {"layer.0": True}}, "points.1.precision_map.layer.0"),
        ({"precision_map": {"layer.0": {"symmetric": True}}}, "points.1.precision_map.layer.0.bits"),
        ({"refined_from": "first"}, "points.1.refined_from"),
    ],
)
def test_finish_job_names_the_bad_field_and_stores_nothing(
    store: Store, bad: dict[str, object], field: str
) -> None:
    rec = _running(store)
    pts = make_points(2, with_uniform=False)
    pts[1].update(bad)
    with pytest.raises(InvalidRequest) as exc:
        store.finish_job(job_id=rec.id, worker_id="w1", points=pts)
    assert exc.value.field == field and field in exc.value.message
    with pytest.raises(InvalidRequest) as exc:
        store.finish_job(job_id=rec.id, worker_id="w1", points=pts[:1], front_info={"recommended": "best"})
    assert exc.value.field == "front_info.recommended"
    assert store.get_job(job_id=rec.id).status is JobStatus.running
    assert store.get_points(job_id=rec.id) == []


def test_fail_job(store: Store) -> None:
    rec = _running(store)
    job = store.fail_job(job_id=rec.id, worker_id="w1", code="model_load_failed", message="no config.json")
    assert job.status is JobStatus.failed and job.error_code == "model_load_failed"
    assert job.error_message == "no config.json"
    with pytest.raises(JobNotOwned):
        store.fail_job(job_id=rec.id, worker_id="w1", code="internal", message="again")
    queued = store.create_job(owner="alice", spec=job_spec())
    forced = store.fail_job(job_id=queued.id, worker_id=None, code="not-a-code", message="operator")
    assert forced.status is JobStatus.failed and forced.error_code == "internal"
    with pytest.raises(Conflict):
        store.fail_job(job_id=queued.id, worker_id=None, code="internal", message="twice")


def test_requeue_stale(store: Store) -> None:
    rec = _running(store)
    assert store.requeue_stale(older_than_s=3600, max_attempts=3) == []
    assert store.requeue_stale(older_than_s=0, max_attempts=3) == [rec.id]
    job = store.get_job(job_id=rec.id)
    assert job.status is JobStatus.queued and job.attempts == 1
    with pytest.raises(JobNotOwned):
        store.heartbeat(job_id=rec.id, worker_id="w1")
    with pytest.raises(JobNotOwned):
        store.finish_job(job_id=rec.id, worker_id="w1", points=make_points(2))
    again = store.claim_next_job(worker_id="w2")
    assert again is not None and again.id == rec.id and again.attempts == 2
    assert store.requeue_stale(older_than_s=0, max_attempts=2) == [rec.id]
    failed = store.get_job(job_id=rec.id)
    assert failed.status is JobStatus.failed and failed.error_code == "internal"
    assert "2 attempts" in (failed.error_message or "")
    kinds = [e.kind for e in store.list_events(job_id=rec.id)]
    assert kinds == ["created", "claimed", "requeued", "claimed", "failed"]


def test_requeue_stale_canceled_and_running(store: Store) -> None:
    rec = _running(store, "w1")
    store.request_cancel(job_id=rec.id)
    assert store.requeue_stale(older_than_s=0, max_attempts=5) == [rec.id]
    assert store.get_job(job_id=rec.id).status is JobStatus.canceled
    a = _running(store, "wa")
    b = _running(store, "wb")
    assert store.requeue_running(worker_id="wa") == [a.id]
    assert store.get_job(job_id=b.id).status is JobStatus.running
    assert store.requeue_running() == [b.id]
    assert store.list_jobs(status="queued").total == 2


def test_space_and_sensitivities(store: Store) -> None:
    rec = _running(store)
    assert store.get_space(job_id=rec.id) is None
    space = {"groups": [{"name": "a", "n_params": 10}], "costs": {"a": {"4": 40.0, "8": float("inf")}}}
    key = store.put_space(job_id=rec.id, space=space)
    got = store.get_space(job_id=rec.id)
    assert got is not None and got["costs"]["a"] == {"4": 40.0, "8": None} and len(key) == 64
    table = {
        "method": "kl",
        "scores": {"a": {"4": 0.1, "8": 0.01}},
        "samples": 16,
        "errors": {"a": 0.001},
        "extra": {},
    }
    store.put_sensitivity(job_id=rec.id, method="kl", table=table)
    store.put_sensitivity(job_id=rec.id, method="kl", table={**table, "samples": 32})  # replaces
    store.put_sensitivity(job_id=rec.id, method="hessian", table={"scores": {"a": {"4": 2.0}}, "samples": 4})
    sens = store.get_sensitivities(job_id=rec.id)
    assert [(s.method, s.samples) for s in sens] == [("kl", 32), ("hessian", 4)]
    assert sens[0].scores == {"a": {"4": 0.1, "8": 0.01}} and sens[0].errors == {"a": 0.001}
    raw = store.get_sensitivity_tables(job_id=rec.id, space_key=key)
    assert len(raw) == 2 and raw[1]["method"] == "hessian"
    with pytest.raises(NotFound):
        store.get_sensitivities(job_id=rec.id, owner="bob")
    with pytest.raises(NotFound):
        store.put_sensitivity(job_id="missing", method="kl", table=table)
    # a re-run after a requeue finds the tables it stored
    store.requeue_stale(older_than_s=0, max_attempts=5)
    assert len(store.get_sensitivity_tables(job_id=rec.id)) == 2


def test_artifacts(store: Store, tmp_path: Path) -> None:
    rec = _running(store)
    store.finish_job(job_id=rec.id, worker_id="w1", points=make_points(3, with_uniform=False))
    with pytest.raises(NotFound):
        store.get_artifact(job_id=rec.id, point_id=0)
    sha = store.put_artifact(job_id=rec.id, point_id=0, path_or_bytes=b"weights")
    path, name, size = store.get_artifact(job_id=rec.id, point_id=0)
    assert path.read_bytes() == b"weights" and size == 7 and name.endswith(".bin") and sha in str(path)
    f = tmp_path / "model.safetensors"
    f.write_bytes(b"x" * 10)
    store.put_artifact(job_id=rec.id, point_id=1, path_or_bytes=f)
    assert store.get_artifact(job_id=rec.id, point_id=1)[1] == "model.safetensors"
    d = tmp_path / "export"
    (d / "sub").mkdir(parents=True)
    (d / "config.json").write_text("{}")
    (d / "sub" / "w.safetensors").write_bytes(b"abc")
    sha_dir = store.put_artifact(job_id=rec.id, point_id=2, path_or_bytes=d)
    assert store.put_artifact(job_id=rec.id, point_id=2, path_or_bytes=d) == sha_dir  # deterministic archive
    import tarfile

    with tarfile.open(store.get_artifact(job_id=rec.id, point_id=2)[0]) as tar:
        assert sorted(tar.getnames()) == ["config.json", "sub/w.safetensors"]
    assert store.get_point(job_id=rec.id, point_id=2).artifact_available
    with pytest.raises(NotFound):
        store.put_artifact(job_id=rec.id, point_id=9, path_or_bytes=b"x")
    with pytest.raises(NotFound):
        store.get_artifact(job_id=rec.id, point_id=0, owner="bob")


def test_finish_job_stores_artifacts_with_the_points(store: Store, tmp_path: Path) -> None:
    d = tmp_path / "refined"
    d.mkdir()
    (d / "model.quant.safetensors").write_bytes(b"packed")
    rec = _running(store)
    with pytest.raises(InvalidRequest):
        store.finish_job(job_id=rec.id, worker_id="w1", points=make_points(2, with_uniform=False), artifacts={5: d})
    assert store.get_job(job_id=rec.id).status is JobStatus.running  # nothing stored
    store.finish_job(job_id=rec.id, worker_id="w1", points=make_points(2, with_uniform=False), artifacts={1: d})
    pareto = store.get_pareto(job_id=rec.id)
    assert [p.artifact_available for p in pareto.points] == [False, True]
    path, name, _ = store.get_artifact(job_id=rec.id, point_id=1)
    import tarfile

    with tarfile.open(path) as tar:
        assert tar.getnames() == ["model.quant.safetensors"]
    assert name == f"job-{rec.id}-point-1.tar.gz"


def test_uploads(store: Store) -> None:
    up = store.put_upload(owner="alice", filename="../../d.jsonl", kind="data", source=b'{"text": "a"}\n')
    assert up.filename == "d.jsonl" and up.size == 14 and len(up.sha256) == 64
    assert store.get_upload(upload_id=up.id, owner="alice").id == up.id
    with pytest.raises(NotFound):
        store.get_upload(upload_id=up.id, owner="bob")
    assert store.upload_path(upload_id=up.id).read_bytes() == b'{"text": "a"}\n'


def test_tokens(store: Store) -> None:
    info, secret = store.create_token(name="alice")
    assert secret.startswith("bst_") and secret not in repr(info)
    p = store.verify_token(secret=secret, touch=True)
    assert p is not None and p.name == "alice" and not p.admin
    assert store.verify_token(secret=secret + "x") is None
    admin, _ = store.create_token(name="root", admin=True)
    assert [t.name for t in store.list_tokens()] == ["alice", "root"]
    assert store.list_tokens()[0].last_used_at is not None
    assert store.revoke_token(token_id=info.id) == [info.id]
    assert store.verify_token(secret=secret) is None
    assert [t.name for t in store.list_tokens()] == ["root"]
    assert len(store.list_tokens(include_revoked=True)) == 2
    with pytest.raises(NotFound):
        store.revoke_token(token_id=info.id)
    assert store.revoke_token(name="root") == [admin.id]
    with pytest.raises(InvalidRequest):
        store.create_token(name=" ")


def test_concurrent_claims_threads(settings: Settings, store: Store) -> None:
    """Many workers (each with its own connections) claiming at once never share a job."""
    n_jobs, n_workers = 30, 8
    for _ in range(n_jobs):
        store.create_job(owner="alice", spec=job_spec())
    claimed: dict[str, list[str]] = {}
    errors: list[BaseException] = []
    barrier = threading.Barrier(n_workers)

    def worker(i: int) -> None:
        st = Store.from_settings(settings)
        mine: list[str] = []
        try:
            barrier.wait()
            while (rec := st.claim_next_job(worker_id=f"w{i}")) is not None:
                mine.append(rec.id)
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)
        finally:
            claimed[f"w{i}"] = mine
            st.close()

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(n_workers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    all_ids = [j for ids in claimed.values() for j in ids]
    assert len(all_ids) == n_jobs and len(set(all_ids)) == n_jobs
    jobs = store.list_jobs(limit=100).items
    assert all(j.status is JobStatus.running and j.attempts == 1 for j in jobs)
    rec = {j.id: store.get_job_record(job_id=j.id).claimed_by for j in jobs}
    for w, ids in claimed.items():
        assert all(rec[i] == w for i in ids)


def _claim_in_process(url: str, blob_dir: str, worker: str, out: mp.Queue) -> None:  # type: ignore[type-arg]
    from service.db import make_engine
    from service.store import Store

    st = Store(make_engine(url), blob_dir=blob_dir)
    ids = []
    while (rec := st.claim_next_job(worker_id=worker)) is not None:
        ids.append(rec.id)
    st.close()
    out.put(ids)


def test_concurrent_claims_processes(settings: Settings, store: Store) -> None:
    for _ in range(20):
        store.create_job(owner="alice", spec=job_spec())
    # fork: fast; each child opens its own engine and never touches the parent's connections
    ctx = mp.get_context("fork")
    q = ctx.Queue()
    procs = [
        ctx.Process(target=_claim_in_process, args=(settings.url, str(settings.blob_dir), f"p{i}", q))
        for i in range(4)
    ]
    for p in procs:
        p.start()
    results = [q.get(timeout=60) for _ in procs]
    for p in procs:
        p.join(timeout=30)
    ids = [i for r in results for i in r]
    assert len(ids) == 20 and len(set(ids)) == 20


def test_the_store_package_exports_its_facade() -> None:
    import service.store as pkg

    assert set(pkg.__all__) == {
        "TOKEN_PREFIX", "FrontInfo", "JobNotOwned", "JobRecord", "PointCost", "PointOption", "PointRecord",
        "Principal", "Store", "TokenInfo", "hash_token", "json_safe", "space_key_of",
        "EXPORT_RETRY_AFTER_S", "ArtifactFile", "ExportNotOwned", "ExportTask",
    }  # fmt: skip
    for name in pkg.__all__:
        assert getattr(pkg, name) is not None, name
    # every aggregate's public methods are on the one facade
    from service.store import artifacts, exports, jobs, points, sensitivities, tokens, uploads

    for part in (jobs.JobsMixin, points.PointsMixin, artifacts.ArtifactsMixin, exports.ExportsMixin,
                 sensitivities.SensitivitiesMixin, uploads.UploadsMixin, tokens.TokensMixin):  # fmt: skip
        assert issubclass(Store, part), part
