"""The REST API through the real app (Starlette's TestClient) on SQLite and PostgreSQL."""

from __future__ import annotations

import io
import json
import os
import tarfile
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from starlette.testclient import TestClient

from bitscout.errors import ErrorBody, error_from_body
from service.app import create_app
from service.db import SchemaOutOfDate, head_revision, make_engine
from service.settings import Settings
from service.store import Store
from tests.service.conftest import TABLES, job_spec, make_points

API = "/api/v1"


class FakeResolver:
    """Only for the route wiring: answers a fixed map, or raises what it is told to."""

    def __init__(self) -> None:
        self.calls: list[dict[str, Any]] = []
        self.raise_: Exception | None = None

    def resolve(
        self,
        *,
        space: dict[str, Any],
        sensitivities: list[dict[str, Any]],
        budget: dict[str, Any],
        methods: Any,
    ) -> dict[str, Any]:
        self.calls.append(
            {"space": space, "sensitivities": sensitivities, "budget": budget, "methods": methods}
        )
        if self.raise_ is not None:
            raise self.raise_
        return {
            "precision_map": {"a": {"bits": 4, "symmetric": True}},
            "cost": {"size_bytes": 2e6, "avg_bits": 4.0, "bops": 1e9, "latency_ms": 1.0},
            "predicted": 0.5,
            "exact": True,
            "gap": 0.0,
        }


class InfeasibleError(Exception):
    code = "budget_infeasible"

    def __init__(self) -> None:
        super().__init__("no map is smaller than 3 MB")
        self.message = "no map is smaller than 3 MB"
        self.field = "max_size_mb"
        self.smallest = 3.0


class Api:
    def __init__(
        self, client: TestClient, store: Store, tokens: dict[str, str], resolver: FakeResolver
    ) -> None:
        self.client = client
        self.store = store
        self.tokens = tokens
        self.resolver = resolver

    def h(self, user: str = "alice") -> dict[str, str]:
        return {"Authorization": f"Bearer {self.tokens[user]}"}

    def submit(self, user: str = "alice", **spec: Any) -> dict[str, Any]:
        r = self.client.post(f"{API}/jobs", json=job_spec(**spec), headers=self.h(user))
        assert r.status_code == 201, r.text
        return r.json()  # type: ignore[no-any-return]

    def finished(self, user: str = "alice", n: int = 5) -> str:
        job = self.submit(user)
        rec = self.store.claim_next_job(worker_id="w")
        assert rec is not None and rec.id == job["id"]
        self.store.put_space(job_id=rec.id, space={"groups": ["a"]})
        self.store.put_sensitivity(
            job_id=rec.id, method="kl", table={"scores": {"a": {"4": 0.1}}, "samples": 8}
        )
        self.store.finish_job(
            job_id=rec.id,
            worker_id="w",
            points=make_points(n),
            front_info={"baseline_metrics": {"accuracy": 0.97}},
        )
        return str(rec.id)


def snapshot(store: Store) -> dict[str, Any]:
    """Row counts and job states: what a rejected request must leave unchanged."""
    with store.engine.connect() as conn:
        counts = {t: conn.execute(sa.text(f"SELECT count(*) FROM {t}")).scalar_one() for t in TABLES}
        jobs = conn.execute(
            sa.text("SELECT id, status, updated_at, cancel_requested FROM jobs ORDER BY id")
        ).all()
    return {"counts": counts, "jobs": [tuple(map(str, j)) for j in jobs]}


@pytest.fixture
def api(settings: Settings) -> Iterator[Api]:
    store = Store.from_settings(settings)
    tokens = {
        "alice": store.create_token(name="alice")[1],
        "bob": store.create_token(name="bob")[1],
        "admin": store.create_token(name="root", admin=True)[1],
    }
    resolver = FakeResolver()
    app = create_app(settings, resolver=resolver, store=store)
    with TestClient(app, raise_server_exceptions=True) as client:
        yield Api(client, store, tokens, resolver)
    store.close()


def assert_error(r: Any, status: int, code: str, field: str | None = None) -> dict[str, Any]:
    assert r.status_code == status, r.text
    body = r.json()
    ErrorBody.model_validate(body)
    assert body["code"] == code, body
    if field is not None:
        assert body["field"] == field, body
    assert "Traceback" not in r.text
    return body  # type: ignore[no-any-return]


# --------------------------------------------------------------------------- jobs


def test_submit_get_list_cancel(api: Api) -> None:
    job = api.submit()
    assert job["status"] == "queued" and job["spec"]["metric"] == "accuracy" and job["owner"] == "alice"
    assert job["spec"]["space"]["bits"] == [2, 3, 4, 6, 8, 32] and job["spec"]["front_points"] == 16
    got = api.client.get(f"{API}/jobs/{job['id']}", headers=api.h()).json()
    assert got["id"] == job["id"] and got["progress"] == 0
    api.submit(seed=3)
    lst = api.client.get(f"{API}/jobs", params={"limit": 1}, headers=api.h()).json()
    assert lst["total"] == 2 and len(lst["items"]) == 1 and lst["next_offset"] == 1
    assert api.client.get(f"{API}/jobs", params={"status": "running"}, headers=api.h()).json()["total"] == 0
    r = api.client.post(f"{API}/jobs/{job['id']}/cancel", headers=api.h())
    assert r.status_code == 200 and r.json()["status"] == "canceled"
    ev = api.client.get(f"{API}/jobs/{job['id']}/events", headers=api.h()).json()
    assert [e["kind"] for e in ev] == ["created", "canceled"]
    after = api.client.get(
        f"{API}/jobs/{job['id']}/events", params={"after": ev[0]["id"]}, headers=api.h()
    ).json()
    assert [e["kind"] for e in after] == ["canceled"]


def test_idempotency_key(api: Api) -> None:
    spec = job_spec(idempotency_key="run-1")
    a = api.client.post(f"{API}/jobs", json=spec, headers=api.h())
    b = api.client.post(f"{API}/jobs", json=spec, headers=api.h())
    assert a.status_code == b.status_code == 201 and a.json()["id"] == b.json()["id"]
    before = snapshot(api.store)
    c = api.client.post(f"{API}/jobs", json={**spec, "seed": 7}, headers=api.h())
    assert_error(c, 409, "conflict", "idempotency_key")
    assert snapshot(api.store) == before
    d = api.client.post(f"{API}/jobs", json=spec, headers=api.h("bob"))
    assert d.status_code == 201 and d.json()["id"] != a.json()["id"]


def test_running_job_progress_and_cancel(api: Api) -> None:
    job = api.submit()
    rec = api.store.claim_next_job(worker_id="w")
    assert rec is not None
    api.store.heartbeat(job_id=rec.id, worker_id="w", progress=0.4, stage="sensitivity", message="probe 4/10")
    got = api.client.get(f"{API}/jobs/{job['id']}", headers=api.h()).json()
    assert got["status"] == "running" and got["progress"] == 0.4 and got["stage"] == "sensitivity"
    assert got["attempts"] == 1 and got["heartbeat_at"]
    r = api.client.post(f"{API}/jobs/{job['id']}/cancel", headers=api.h())
    assert r.json()["cancel_requested"] is True and r.json()["status"] == "running"
    assert api.store.heartbeat(job_id=rec.id, worker_id="w") is False


def test_finished_job_results(api: Api) -> None:
    jid = api.finished(n=4)
    job = api.client.get(f"{API}/jobs/{jid}", headers=api.h()).json()
    assert job["status"] == "succeeded" and job["n_points"] == 6 and job["progress"] == 1
    pareto = api.client.get(f"{API}/jobs/{jid}/pareto", headers=api.h()).json()
    assert pareto["metric"] == "accuracy" and pareto["higher_is_better"] is True
    assert pareto["baseline_metrics"] == {"accuracy": 0.97} and pareto["budget"]["max_size_mb"] == 10.0
    assert len(pareto["points"]) == 6 and {p["method"] for p in pareto["points"]} == {"kl", "uniform"}
    assert sum(p["recommended"] for p in pareto["points"]) == 1
    assert pareto["points"][pareto["recommended"]]["recommended"]
    point = api.client.get(f"{API}/jobs/{jid}/points/2", headers=api.h()).json()
    assert (
        point["id"] == 2
        and len(point["precision_map"]) == 6
        and point["cost"]["size_mb"] == pytest.approx(8.0)
    )
    assert_error(api.client.get(f"{API}/jobs/{jid}/points/99", headers=api.h()), 404, "not_found")
    assert_error(
        api.client.get(f"{API}/jobs/{jid}/points/-1", headers=api.h()), 422, "invalid_request", "point_id"
    )
    sens = api.client.get(f"{API}/jobs/{jid}/sensitivity", headers=api.h()).json()
    assert sens[0]["method"] == "kl" and sens[0]["scores"] == {"a": {"4": 0.1}} and sens[0]["samples"] == 8
    kinds = [e["kind"] for e in api.client.get(f"{API}/jobs/{jid}/events", headers=api.h()).json()]
    assert kinds == ["created", "claimed", "succeeded"]
    # artifacts
    # a point stored in no format is exported on request (tests/service/test_exports.py)
    assert api.client.get(f"{API}/jobs/{jid}/points/1/artifact", headers=api.h()).status_code == 202
    api.store.put_artifact(job_id=jid, point_id=1, path_or_bytes=b"model-bytes", filename="p1.tar.gz")
    r = api.client.get(f"{API}/jobs/{jid}/points/1/artifact", headers=api.h())
    assert (
        r.status_code == 200
        and r.content == b"model-bytes"
        and "p1.tar.gz" in r.headers["content-disposition"]
    )
    assert api.client.get(f"{API}/jobs/{jid}/points/1", headers=api.h()).json()["artifact_available"] is True
    # cancel of a finished job is a conflict and changes nothing
    before = snapshot(api.store)
    assert_error(api.client.post(f"{API}/jobs/{jid}/cancel", headers=api.h()), 409, "conflict")
    assert snapshot(api.store) == before


def test_other_users_job_is_404_everywhere(api: Api) -> None:
    jid = api.finished("alice")
    api.store.put_artifact(job_id=jid, point_id=0, path_or_bytes=b"x")
    before = snapshot(api.store)
    for method, path, body in [
        ("GET", f"/jobs/{jid}", None),
        ("POST", f"/jobs/{jid}/cancel", None),
        ("GET", f"/jobs/{jid}/pareto", None),
        ("GET", f"/jobs/{jid}/points/0", None),
        ("GET", f"/jobs/{jid}/points/0/artifact", None),
        ("GET", f"/jobs/{jid}/sensitivity", None),
        ("GET", f"/jobs/{jid}/events", None),
        ("POST", f"/jobs/{jid}/resolve", {"budget": {"max_size_mb": 5}}),
    ]:
        r = api.client.request(method, API + path, json=body, headers=api.h("bob"))
        assert_error(r, 404, "not_found")
    assert api.client.get(f"{API}/jobs", headers=api.h("bob")).json()["total"] == 0
    assert snapshot(api.store) == before
    # an admin sees every job
    assert api.client.get(f"{API}/jobs/{jid}", headers=api.h("admin")).status_code == 200
    assert api.client.get(f"{API}/jobs", headers=api.h("admin")).json()["total"] == 1


def test_tokens_required(api: Api) -> None:
    jid = api.submit()["id"]
    for headers in [
        {},
        {"Authorization": "Bearer nope"},
        {"Authorization": "Basic abc"},
        {"Authorization": "Bearer"},
    ]:
        r = api.client.get(f"{API}/jobs/{jid}", headers=headers)
        assert_error(r, 401, "unauthorized")
        assert r.headers["www-authenticate"] == "Bearer"
    assert_error(api.client.post(f"{API}/jobs", json=job_spec()), 401, "unauthorized")
    api.store.revoke_token(name="alice")
    assert_error(api.client.get(f"{API}/jobs/{jid}", headers=api.h()), 401, "unauthorized")


# --------------------------------------------------------------------------- resolve


def test_resolve(api: Api) -> None:
    job = api.submit()
    body = {"budget": {"max_size_mb": 5}}
    assert_error(
        api.client.post(f"{API}/jobs/{job['id']}/resolve", json=body, headers=api.h()), 409, "conflict"
    )
    api.client.post(f"{API}/jobs/{job['id']}/cancel", headers=api.h())
    jid = api.finished()
    r = api.client.post(f"{API}/jobs/{jid}/resolve", json=body, headers=api.h())
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["precision_map"] == {"a": {"bits": 4, "symmetric": True, "group_size": None, "act_bits": None, "tt_rank": None}} and out["cost"]["size_mb"] == 2.0
    assert out["exact"] is True and out["budget"]["max_size_mb"] == 5
    call = api.resolver.calls[-1]
    assert call["space"] == {"groups": ["a"]} and call["sensitivities"][0]["scores"] == {"a": {"4": 0.1}}
    assert call["budget"]["max_size_mb"] == 5 and call["methods"] is None
    r = api.client.post(f"{API}/jobs/{jid}/resolve", json={**body, "methods": ["hessian"]}, headers=api.h())
    assert_error(r, 409, "conflict")
    api.resolver.raise_ = InfeasibleError()
    r = api.client.post(f"{API}/jobs/{jid}/resolve", json=body, headers=api.h())
    err = assert_error(r, 422, "budget_infeasible", "budget.max_size_mb")
    assert err["details"] == {"smallest": 3.0}
    assert error_from_body(422, err).code.value == "budget_infeasible"
    assert_error(
        api.client.post(f"{API}/jobs/{jid}/resolve", json={"budget": {}}, headers=api.h()),
        422,
        "invalid_request",
        "budget",
    )


def test_resolve_without_resolver(settings: Settings) -> None:
    store = Store.from_settings(settings)
    _, tok = store.create_token(name="alice")
    job = store.create_job(owner="alice", spec=job_spec())
    with TestClient(create_app(settings, store=store)) as c:
        r = c.post(
            f"{API}/jobs/{job.id}/resolve",
            json={"budget": {"max_size_mb": 5}},
            headers={"Authorization": f"Bearer {tok}"},
        )
        assert_error(r, 503, "unavailable")
    store.close()


# --------------------------------------------------------------------------- uploads


def _tar(members: dict[str, bytes], *, symlink: str | None = None, gz: bool = True) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz" if gz else "w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        if symlink:
            info = tarfile.TarInfo(symlink)
            info.type = tarfile.SYMTYPE
            info.linkname = "/etc/passwd"
            tar.addfile(info)
    return buf.getvalue()


def _safetensors() -> bytes:
    header = json.dumps({"w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}).encode()
    return len(header).to_bytes(8, "little") + header + b"\x00\x00\x80\x3f"


GOOD_MODEL = {"m/config.json": b"{}", "m/model.safetensors": _safetensors(), "m/tokenizer.json": b"{}"}


def test_uploads_and_jobs_using_them(api: Api, settings: Settings, tmp_path: Path) -> None:
    r = api.client.post(
        f"{API}/uploads", files={"file": ("train.jsonl", b'{"text": "a", "label": 1}\n')}, headers=api.h()
    )
    assert r.status_code == 201, r.text
    data_up = r.json()
    assert data_up["kind"] == "data" and data_up["size"] == 26 and len(data_up["sha256"]) == 64
    r = api.client.post(
        f"{API}/uploads",
        files={"file": ("model.tar.gz", _tar(GOOD_MODEL))},
        data={"kind": "model"},
        headers=api.h(),
    )
    assert r.status_code == 201, r.text
    model_up = r.json()
    assert (
        api.client.get(f"{API}/uploads/{model_up['id']}", headers=api.h()).json()["sha256"]
        == model_up["sha256"]
    )
    assert_error(api.client.get(f"{API}/uploads/{model_up['id']}", headers=api.h("bob")), 404, "not_found")
    # extraction by the workers' helper
    from service.uploads import extract_model_archive

    root = extract_model_archive(
        api.store.upload_path(upload_id=model_up["id"]),
        tmp_path / "x",
        max_files=10,
        max_unpacked_bytes=10**6,
    )
    assert (root / "model.safetensors").is_file() and root.name == "m"
    job = api.client.post(
        f"{API}/jobs",
        json=job_spec(model={"upload_id": model_up["id"]}, data={"upload_id": data_up["id"]}),
        headers=api.h(),
    )
    assert job.status_code == 201, job.text
    # bob cannot use alice's uploads; a data upload is not a model
    before = snapshot(api.store)
    r = api.client.post(
        f"{API}/jobs", json=job_spec(model={"upload_id": model_up["id"]}), headers=api.h("bob")
    )
    assert_error(r, 422, "invalid_request", "model.upload_id")
    r = api.client.post(f"{API}/jobs", json=job_spec(model={"upload_id": data_up["id"]}), headers=api.h())
    assert_error(r, 422, "invalid_request", "model.upload_id")
    assert snapshot(api.store) == before


def test_server_side_paths(api: Api, settings: Settings, tmp_path: Path) -> None:
    assert settings.model_root is not None and settings.data_root is not None
    (settings.model_root / "minilm").mkdir()
    (settings.data_root / "bbc.jsonl").write_text('{"text": "x"}\n')
    outside = tmp_path / "secret"
    outside.mkdir()
    os.symlink(outside, settings.model_root / "escape")
    os.symlink(settings.model_root / "loop", settings.model_root / "loop")
    ok = api.client.post(
        f"{API}/jobs", json=job_spec(model={"path": "minilm"}, data={"path": "bbc.jsonl"}), headers=api.h()
    )
    assert ok.status_code == 201, ok.text
    before = snapshot(api.store)
    for model, field in [
        ({"path": "escape"}, "model.path"),
        ({"path": str(outside)}, "model.path"),
        ({"path": "missing"}, "model.path"),
        ({"path": "../secret"}, "model.path"),
        ({"path": "x" * 1000}, "model.path"),
        ({"path": "/".join(["a" * 250] * 4)}, "model.path"),
        ({"path": "loop"}, "model.path"),
    ]:
        r = api.client.post(
            f"{API}/jobs", json=job_spec(model=model, data={"path": "bbc.jsonl"}), headers=api.h()
        )
        assert_error(r, 422, "invalid_request", field)
    r = api.client.post(
        f"{API}/jobs", json=job_spec(model={"path": "minilm"}, data={"path": "minilm"}), headers=api.h()
    )
    assert_error(r, 422, "invalid_request")
    assert snapshot(api.store) == before


def _zip_with_symlink() -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("config.json", "{}")
        zf.writestr("model.safetensors", _safetensors())
        info = zipfile.ZipInfo("link")
        info.external_attr = 0o120777 << 16
        zf.writestr(info, "/etc/passwd")
    return buf.getvalue()


BAD_UPLOADS = [
    pytest.param(
        "m.tar.gz", _tar({"config.json": b"{}", "pytorch_model.bin": b"pickle"}), "model", 422, "pickle"
    ),
    pytest.param(
        "m.tar.gz",
        _tar({"config.json": b"{}", "model.safetensors": b"x", "modeling.py": b"import os"}),
        "model",
        422,
        "code",
    ),
    pytest.param(
        "m.tar.gz",
        _tar({"config.json": b"{}", "model.safetensors": b"x"}, symlink="evil"),
        "model",
        422,
        "symlink",
    ),
    pytest.param("m.zip", _zip_with_symlink(), "model", 422, "zip-symlink"),
    pytest.param(
        "m.tar.gz", _tar({"../../config.json": b"{}", "model.safetensors": b"x"}), "model", 422, "traversal"
    ),
    pytest.param(
        "m.tar.gz", _tar({"/abs/config.json": b"{}", "model.safetensors": b"x"}), "model", 422, "absolute"
    ),
    pytest.param("m.tar.gz", _tar({"config.json": b"{}"}), "model", 422, "no-weights"),
    pytest.param("m.tar.gz", _tar({f"f{i}.json": b"{}" for i in range(20)}), "model", 413, "too-many-files"),
    pytest.param(
        "m.tar.gz", _tar({"config.json": b"{}", "model.safetensors": b"\0" * 5_000_000}), "model", 413, "bomb"
    ),
    pytest.param("m.tar.gz", b"this is not an archive", "model", 422, "malformed"),
    pytest.param("m.tar.gz", b"\x1f\x8b\x08\x00garbage-gzip", "model", 422, "corrupt-gzip"),
    pytest.param("d.jsonl", b"\xff\xfe\x00\x01binary", "data", 422, "binary"),
    pytest.param("d.jsonl", b"not json\n", "data", 422, "bad-jsonl"),
    pytest.param("d.exe", b"MZ", "data", 422, "extension"),
    pytest.param("d.jsonl", b"", "data", 422, "empty"),
    pytest.param("d.jsonl", b"x" * 3_000_000, "data", 413, "too-large"),
    pytest.param("whatever.bin", b"abc", None, 422, "unknown-kind"),
]


@pytest.mark.parametrize(("name", "content", "kind", "status", "_why"), BAD_UPLOADS)
def test_bad_uploads(api: Api, name: str, content: bytes, kind: str | None, status: int, _why: str) -> None:
    before = snapshot(api.store)
    blobs_before = sorted(p.name for p in api.store.blobs.root.rglob("*") if p.is_file())
    data = {"kind": kind} if kind else {}
    r = api.client.post(f"{API}/uploads", files={"file": (name, content)}, data=data, headers=api.h())
    assert_error(r, status, "payload_too_large" if status == 413 else "invalid_request")
    assert snapshot(api.store) == before
    assert sorted(p.name for p in api.store.blobs.root.rglob("*") if p.is_file()) == blobs_before


# --------------------------------------------------------------------------- the catalogue of bad requests

BAD_JOBS: list[Any] = [
    pytest.param({"methods": "kl"}, "methods", id="methods-not-a-list"),
    pytest.param({"methods": []}, "methods", id="no-method"),
    pytest.param({"methods": ["kl", "kl"]}, "methods", id="duplicate-method"),
    pytest.param({"methods": ["magic"]}, "methods.0", id="unknown-method"),
    pytest.param({"budget": {}}, "budget", id="empty-budget"),
    pytest.param({"budget": {"max_size_mb": -1}}, "budget.max_size_mb", id="negative-budget"),
    pytest.param({"budget": {"max_size_mb": 0}}, "budget.max_size_mb", id="zero-budget"),
    pytest.param({"budget": {"max_avg_bits": 40}}, "budget.max_avg_bits", id="bits-budget-too-big"),
    pytest.param({"budget": {"max_size_mb": "ten"}}, "budget.max_size_mb", id="budget-wrong-type"),
    pytest.param(
        {"budget": {"max_size_mb": 5, "max_money": 3}}, "budget.max_money", id="unknown-budget-field"
    ),
    pytest.param({"task": "translation"}, "task", id="unknown-task"),
    pytest.param({"metric": "perplexity"}, None, id="metric-does-not-fit-task"),
    pytest.param({"space": {"bits": [7]}}, "space.bits.0", id="unknown-bits"),
    pytest.param({"space": {"bits": [0]}}, "space.bits", id="only-pruning"),
    pytest.param({"space": {"bits": [4, 4]}}, "space.bits", id="duplicate-bits"),
    pytest.param({"space": {"granularity": "channel"}}, "space.granularity", id="bad-granularity"),
    pytest.param({"space": {"max_head_fraction": 1.5}}, "space.max_head_fraction", id="head-fraction"),
    pytest.param({"front_points": 2}, "front_points", id="front-points-small"),
    pytest.param({"front_points": 1000}, "front_points", id="front-points-big"),
    pytest.param({"seed": -1}, "seed", id="negative-seed"),
    pytest.param({"seed": 2**40}, "seed", id="huge-seed"),
    pytest.param({"model": {}}, "model", id="no-model-source"),
    pytest.param({"model": {"hf_id": "a/b"}}, "model", id="unpinned-revision"),
    pytest.param({"model": {"hf_id": "a/b", "revision": "main"}}, "model.revision", id="branch-revision"),
    pytest.param({"model": {"hf_id": "../etc", "revision": "a" * 40}}, "model.hf_id", id="bad-hf-id"),
    pytest.param(
        {"model": {"path": "x", "hf_id": "a/b", "revision": "a" * 40}}, "model", id="two-model-sources"
    ),
    pytest.param({"model": {"path": "../../etc"}}, "model.path", id="path-traversal"),
    pytest.param({"model": {"upload_id": "0" * 32}}, "model.upload_id", id="unknown-upload"),
    pytest.param(
        {"data": {"dataset": "x", "calibration_size": 0}}, "data.calibration_size", id="calibration-zero"
    ),
    pytest.param({"data": {"dataset": "x", "max_length": 10**9}}, "data.max_length", id="max-length"),
    pytest.param({"data": {"path": "d.jsonl"}}, "data.path", id="missing-data-file"),
    pytest.param({"device": "tpu"}, "device", id="bad-device"),
    pytest.param({"resources": {"cpus": 0}}, "resources.cpus", id="zero-cpus"),
    pytest.param({"refine": {"points": 0}}, "refine.points", id="refine-zero"),
    pytest.param({"idempotency_key": "has space"}, "idempotency_key", id="bad-idempotency-key"),
    pytest.param({"surprise": 1}, "surprise", id="unknown-field"),
    pytest.param({"methods": ["hessian"], "method_options": {"hessian": {"max_probez": 3}}},
                 "method_options.hessian.max_probez", id="misspelled-method-option"),
    pytest.param({"methods": ["hessian"], "method_options": {"hessian": {"max_probes": 1}}},
                 "method_options.hessian.max_probes", id="method-option-out-of-range"),
    pytest.param({"methods": ["dnas"], "method_options": {"dnas": {"train_weights": "yes"}}},
                 "method_options.dnas.train_weights", id="method-option-not-a-flag"),
    pytest.param({"methods": ["kl"], "method_options": {"klx": {}}}, "method_options.klx", id="unknown-method-options"),
    pytest.param({"methods": ["kl"], "method_options": {"kl": {"replay": "x" * 1_000_000}}},
                 "method_options.kl.replay", id="huge-method-option"),
    pytest.param({"task": None}, "task", id="missing-task"),
]


@pytest.mark.parametrize(("override", "field"), BAD_JOBS)
def test_bad_job_requests(api: Api, override: dict[str, Any], field: str | None) -> None:
    spec = job_spec(**override)
    spec = {k: v for k, v in spec.items() if v is not None}
    before = snapshot(api.store)
    r = api.client.post(f"{API}/jobs", json=spec, headers=api.h())
    body = assert_error(r, 422, "invalid_request")
    if field is not None:
        assert body["field"] == field, body
    assert snapshot(api.store) == before


@pytest.mark.parametrize(
    ("content", "ctype"),
    [
        (b"{not json", "application/json"),
        (b"[1, 2]", "application/json"),
        (b"null", "application/json"),
        (b"", "application/json"),
        (b"model=x", "application/x-www-form-urlencoded"),
        ('{"a": "\ud800"}'.encode("utf-8", "surrogatepass"), "application/json"),
    ],
)
def test_malformed_bodies(api: Api, content: bytes, ctype: str) -> None:
    before = snapshot(api.store)
    r = api.client.post(f"{API}/jobs", content=content, headers={**api.h(), "Content-Type": ctype})
    assert_error(r, 422, "invalid_request")
    assert snapshot(api.store) == before


def test_other_bad_requests(api: Api) -> None:
    before = snapshot(api.store)
    h = api.h()
    assert_error(
        api.client.get(f"{API}/jobs", params={"limit": 0}, headers=h), 422, "invalid_request", "limit"
    )
    assert_error(
        api.client.get(f"{API}/jobs", params={"limit": 10**6}, headers=h), 422, "invalid_request", "limit"
    )
    assert_error(
        api.client.get(f"{API}/jobs", params={"offset": -1}, headers=h), 422, "invalid_request", "offset"
    )
    assert_error(
        api.client.get(f"{API}/jobs", params={"status": "done"}, headers=h), 422, "invalid_request", "status"
    )
    assert_error(api.client.get(f"{API}/jobs/{'x' * 65}", headers=h), 422, "invalid_request", "job_id")
    assert_error(api.client.get(f"{API}/jobs/nope", headers=h), 404, "not_found")
    assert_error(api.client.post(f"{API}/jobs/nope/cancel", headers=h), 404, "not_found")
    assert_error(api.client.get(f"{API}/jobs/nope/points/abc", headers=h), 422, "invalid_request", "point_id")
    assert_error(
        api.client.get(f"{API}/jobs/nope/events", params={"after": -5}, headers=h),
        422,
        "invalid_request",
        "after",
    )
    assert_error(api.client.delete(f"{API}/jobs", headers=h), 405, "invalid_request")
    assert_error(api.client.get(f"{API}/nothing", headers=h), 404, "not_found")
    assert_error(api.client.post(f"{API}/uploads", headers=h), 422, "invalid_request", "file")
    r = api.client.post(f"{API}/uploads", content=b"x", headers={**h, "Content-Type": "multipart/form-data"})
    assert_error(r, 422, "invalid_request")
    big = {"x": "y" * 2_000_000}
    assert_error(api.client.post(f"{API}/jobs", json=big, headers=h), 413, "payload_too_large")
    assert snapshot(api.store) == before


def test_rate_limits(settings: Settings) -> None:
    limited = settings.model_copy(update={"submit_rate_per_min": 1.0, "submit_burst": 2})
    store = Store.from_settings(limited)
    _, tok = store.create_token(name="alice")
    _, tok_b = store.create_token(name="bob")
    with TestClient(create_app(limited, store=store)) as c:
        h = {"Authorization": f"Bearer {tok}"}
        assert c.post(f"{API}/jobs", json=job_spec(), headers=h).status_code == 201
        assert c.post(f"{API}/jobs", json=job_spec(), headers=h).status_code == 201
        before = snapshot(store)
        r = c.post(f"{API}/jobs", json=job_spec(), headers=h)
        body = assert_error(r, 429, "rate_limited")
        assert int(r.headers["retry-after"]) >= 1 and body["details"]["retry_after_s"] > 0
        assert snapshot(store) == before
        assert (
            c.post(f"{API}/jobs", json=job_spec(), headers={"Authorization": f"Bearer {tok_b}"}).status_code
            == 201
        )
    store.close()


# --------------------------------------------------------------------------- health, metrics, schema


def test_health_ready_metrics_version(api: Api) -> None:
    assert api.client.get("/healthz").json() == {"status": "ok"}
    ready = api.client.get("/readyz")
    assert ready.status_code == 200 and ready.json()["status"] == "ready"
    api.submit()
    api.client.get(f"{API}/jobs", headers=api.h())
    text = api.client.get("/metrics", headers=api.h("admin")).text
    assert 'bitscout_jobs{status="queued"} 1.0' in text
    assert 'route="/api/v1/jobs"' in text and "bitscout_http_request_duration_seconds_bucket" in text
    v = api.client.get(f"{API}/version").json()
    assert v["schema_version"] and v["db_revision"] == head_revision() == "0002"
    spec = api.client.get(f"{API}/openapi.json").json()
    assert "/api/v1/jobs/{job_id}/resolve" in spec["paths"] and "ErrorBody" in spec["components"]["schemas"]


def test_refuses_out_of_date_schema(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path / "d")
    with pytest.raises(SchemaOutOfDate, match="bitscout db upgrade"):
        create_app(settings)
    create_app(settings.model_copy(update={"auto_upgrade": True}))
    create_app(settings)  # now at head


def test_readyz_reports_schema_drift(api: Api, settings: Settings) -> None:
    engine = make_engine(settings.url)
    with engine.begin() as conn:
        conn.execute(sa.text("UPDATE bitscout_alembic_version SET version_num = 'old'"))
    try:
        assert_error(api.client.get("/readyz"), 503, "unavailable")
    finally:
        with engine.begin() as conn:
            conn.execute(sa.text("UPDATE bitscout_alembic_version SET version_num = :head"), {"head": head_revision()})
        engine.dispose()


# --------------------------------------------------------------------------- latency: custom profiles, tables

CUSTOM_PROFILE = {
    "name": "edge", "memory_bandwidth_gbs": 100, "int8_tops": 20, "int4_tops": 40, "fp16_tflops": 10, "fp32_tflops": 2,
}  # fmt: skip
TABLE = {
    "format": "bitscout-latency-table/1",
    "device": "cpu",
    "entries": [{"tokens": 16, "shape": [32, 32], "option": "8a8", "ms": 0.01, "kernel": "int8 _int_mm"}],
}


def test_a_custom_device_profile_is_accepted_and_a_bad_one_refused_naming_the_field(api: Api) -> None:
    job = api.submit(budget={"max_latency_ms": 5.0, "device_profile": CUSTOM_PROFILE})
    assert job["spec"]["budget"]["device_profile"]["int8_tops"] == 20.0
    assert api.submit(budget={"max_latency_ms": 5.0, "device_profile": "h100"})["spec"]["budget"]["device_profile"] == "h100"
    for bad, field in (
        ({**CUSTOM_PROFILE, "int8_tops": -1}, "budget.device_profile.int8_tops"),
        ({**CUSTOM_PROFILE, "fp32_tflops": "fast"}, "budget.device_profile.fp32_tflops"),
        ({k: v for k, v in CUSTOM_PROFILE.items() if k != "memory_bandwidth_gbs"}, "budget.device_profile.memory_bandwidth_gbs"),
        ({**CUSTOM_PROFILE, "tdp_w": 300}, "budget.device_profile.tdp_w"),
    ):
        r = api.client.post(
            f"{API}/jobs", json=job_spec(budget={"max_latency_ms": 5.0, "device_profile": bad}), headers=api.h()
        )
        assert r.status_code == 422, r.text
        assert r.json()["field"] == field, r.json()


def test_a_latency_table_upload_is_checked_and_a_job_names_it(api: Api) -> None:
    r = api.client.post(
        f"{API}/uploads", files={"file": ("t.json", json.dumps(TABLE).encode())}, data={"kind": "latency_table"},
        headers=api.h(),
    )  # fmt: skip
    assert r.status_code == 201, r.text
    up = r.json()
    assert up["kind"] == "latency_table"
    job = api.submit(budget={"max_latency_ms": 1.0, "latency_table": up["id"]}, space={"bits": [8], "act_bits": [8]})
    assert job["spec"]["budget"]["latency_table"] == up["id"] and job["spec"]["space"]["act_bits"] == [8]
    bad = {**TABLE, "entries": [{**TABLE["entries"][0], "ms": 0}]}
    for content, field in ((bad, "file.entries.0.ms"), ({**TABLE, "format": "x"}, "file.format")):
        r = api.client.post(
            f"{API}/uploads", files={"file": ("t.json", json.dumps(content).encode())}, data={"kind": "latency_table"},
            headers=api.h(),
        )  # fmt: skip
        assert r.status_code == 422 and r.json()["field"] == field, r.text
    # every method scores activation widths: hessian, fisher and dnas with act_bits are accepted
    job = api.submit(methods=["hessian", "fisher", "dnas"], space={"bits": [4, 8], "act_bits": [8]})
    assert job["spec"]["methods"] == ["hessian", "fisher", "dnas"]


def test_tensor_train_options_with_activation_bits_are_refused_naming_the_field(api: Api) -> None:
    """A tensor-train option takes no activation width: spelled (``tt16@4a8``) it is a 422 naming
    ``space.bits``; crossed by ``act_bits`` with ``tt_ranks``, the tensor-train options stay weight-only."""
    for bits, field in ((["tt16@4a8"], "space.bits.0"), ([4, "tt8@8a8"], "space.bits.1")):
        r = api.client.post(f"{API}/jobs", json=job_spec(space={"bits": bits}), headers=api.h())
        body = r.json()
        assert r.status_code == 422 and body["field"] == field, r.text
        assert "activation bits do not apply to tensor-train options" in body["message"]
    job = api.submit(space={"bits": [4], "tt_ranks": [8], "act_bits": [8]})
    assert job["spec"]["space"]["tt_ranks"] == [8] and job["spec"]["space"]["act_bits"] == [8]
