"""Bad input is refused at the door, on SQLite and PostgreSQL alike, with the field named and
nothing stored: bodies over the size limit however they are sent, strings the database cannot
store, selections that leave nothing to search, bodies that are not a JSON object, and the
metrics scrape without its token."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest
from pydantic import SecretStr
from starlette.testclient import TestClient

from service.app import create_app
from service.settings import Settings
from service.store import Store
from tests.service.conftest import job_spec
from tests.service.test_api import API, Api, FakeResolver, assert_error, snapshot


@pytest.fixture
def api(settings: Settings) -> Iterator[Api]:
    store = Store.from_settings(settings)
    tokens = {"alice": store.create_token(name="alice")[1], "admin": store.create_token(name="root", admin=True)[1]}
    with TestClient(create_app(settings, store=store)) as client:
        yield Api(client, store, tokens, FakeResolver())
    store.close()


# --------------------------------------------------------------------------- one size limit


def _chunks(total: int, size: int = 64 * 1024) -> Iterator[bytes]:
    """``total`` bytes as a generator: httpx sends it chunked, with no Content-Length."""
    sent = 0
    while sent < total:
        n = min(size, total - sent)
        sent += n
        yield b" " * n


def _multipart_chunks(total: int) -> Iterator[bytes]:
    yield b'--xx\r\nContent-Disposition: form-data; name="file"; filename="d.jsonl"\r\n\r\n'
    yield from (c.replace(b" ", b"a") for c in _chunks(total))
    yield b"\r\n--xx--\r\n"


def _blobs(store: Store) -> list[str]:
    return sorted(p.name for p in store.blobs.root.rglob("*") if p.is_file())


def test_chunked_bodies_over_the_limit_are_413_before_any_route_runs(api: Api, settings: Settings) -> None:
    before, blobs = snapshot(api.store), _blobs(api.store)
    limit = int(settings.max_request_kb * 1024)
    r = api.client.post(
        f"{API}/jobs", content=_chunks(limit + 1), headers={**api.h(), "Content-Type": "application/json"}
    )
    assert "content-length" not in r.request.headers and r.request.headers["transfer-encoding"] == "chunked"
    assert_error(r, 413, "payload_too_large")
    upload_limit = int(settings.max_upload_mb * 1e6) + 1024 * 1024
    r = api.client.post(
        f"{API}/uploads",
        content=_multipart_chunks(upload_limit + 1),
        headers={**api.h(), "Content-Type": "multipart/form-data; boundary=xx"},
    )
    assert "content-length" not in r.request.headers
    assert_error(r, 413, "payload_too_large")
    assert snapshot(api.store) == before and _blobs(api.store) == blobs
    # under the limit, chunked bodies are read as usual
    body = api.client.build_request("POST", "/", json=job_spec()).content
    r = api.client.post(
        f"{API}/jobs", content=iter([body[:10], body[10:]]), headers={**api.h(), "Content-Type": "application/json"}
    )
    assert r.status_code == 201, r.text


# --------------------------------------------------------------------------- one string rule

NUL = "a\x00b"
SURROGATE = "a\ud800b"

BAD_STRINGS = [
    pytest.param({"data": {"dataset": "x", "text_field": NUL}}, "data.text_field", id="text-field"),
    pytest.param({"data": {"dataset": "x", "label_field": NUL}}, "data.label_field", id="label-field"),
    pytest.param({"data": {"dataset": "x", "text_field": SURROGATE}}, "data.text_field", id="surrogate"),
    pytest.param({"data": {"path": NUL}}, "data.path", id="data-path"),
    pytest.param({"model": {"path": NUL}}, "model.path", id="model-path"),
    pytest.param({"space": {"include": ["*.query", NUL]}}, "space.include.1", id="include"),
    pytest.param({"space": {"exclude": [NUL]}}, "space.exclude.0", id="exclude"),
    pytest.param({"budget": {"max_size_mb": 5, "device_profile": NUL}}, "budget.device_profile", id="profile"),
    pytest.param({"idempotency_key": NUL}, "idempotency_key", id="idempotency-key"),
    pytest.param({"methods": ["kl"], "method_options": {"kl": {NUL: True}}}, "method_options.kl", id="option-key"),
    pytest.param({"methods": ["kl"], "method_options": {NUL: {}}}, "method_options", id="method-key"),
    pytest.param({"methods": ["dnas"], "method_options": {"dnas": {"loss": NUL}}}, "method_options.dnas.loss",
                 id="option-value"),
    pytest.param({NUL: 1}, "body", id="top-level-key"),
]  # fmt: skip


@pytest.mark.parametrize(("override", "field"), BAD_STRINGS)
def test_a_string_the_database_cannot_store_is_refused_naming_it(
    api: Api, override: dict[str, Any], field: str
) -> None:
    before = snapshot(api.store)
    content = json.dumps(job_spec(**override))  # ASCII: "\\u0000", "\\ud800" escapes
    r = api.client.post(f"{API}/jobs", content=content, headers={**api.h(), "Content-Type": "application/json"})
    body = assert_error(r, 422, "invalid_request", field)
    assert "NUL" in body["message"] or "surrogate" in body["message"], body
    assert snapshot(api.store) == before


def test_strings_outside_the_job_body_are_refused_too(api: Api) -> None:
    h = api.h()
    before = snapshot(api.store)
    assert_error(api.client.get(f"{API}/jobs/a%00b", headers=h), 422, "invalid_request", "job_id")
    assert_error(api.client.get(f"{API}/jobs/a%00b/pareto", headers=h), 422, "invalid_request", "job_id")
    assert_error(api.client.post(f"{API}/jobs/a%00b/cancel", headers=h), 422, "invalid_request", "job_id")
    assert_error(api.client.get(f"{API}/uploads/a%00b", headers=h), 422, "invalid_request", "upload_id")
    r = api.client.post(
        f"{API}/jobs/a%00b/resolve", json={"budget": {"max_size_mb": 5, "device_profile": NUL}}, headers=h
    )
    assert_error(r, 422, "invalid_request")
    raw = (  # a file name with a NUL byte in its Content-Disposition (httpx would escape it)
        b'--xx\r\nContent-Disposition: form-data; name="file"; filename="d\x00.jsonl"\r\n\r\n'
        b'{"text": "a"}\n\r\n--xx--\r\n'
    )
    r = api.client.post(
        f"{API}/uploads", content=raw, headers={**h, "Content-Type": "multipart/form-data; boundary=xx"}
    )
    body = assert_error(r, 422, "invalid_request", "file")
    assert "NUL" in body["message"]
    assert snapshot(api.store) == before and _blobs(api.store) == []


def test_text_the_workers_write_is_stored_with_nul_replaced(api: Api) -> None:
    job = api.submit()
    rec = api.store.claim_next_job(worker_id="w")
    assert rec is not None and rec.id == job["id"]
    api.store.heartbeat(job_id=rec.id, worker_id="w", stage="load\x00ing", message="probe\x00 1")
    api.store.add_event(job_id=rec.id, kind="note", message="key 'a\x00b'", data={"k\x00": "v\x00", "s": SURROGATE})
    failed = api.store.fail_job(job_id=rec.id, worker_id="w", code="data_invalid", message=f"no field {NUL!s}")
    assert failed.error_message == "no field a\ufffdb"
    events = api.client.get(f"{API}/jobs/{rec.id}/events", headers=api.h()).json()
    note = next(e for e in events if e["kind"] == "note")
    assert note["message"] == "key 'a\ufffdb'" and note["data"] == {"k\ufffd": "v\ufffd", "s": "a\ufffdb"}
    assert [e["stage"] for e in events if e["kind"] == "stage"] == ["load\ufffding"]


# --------------------------------------------------------------------------- include / exclude at submit

BAD_SELECTIONS = [
    pytest.param({"exclude": ["*"]}, "space.exclude", "matches every module name", id="exclude-all"),
    pytest.param({"exclude": ["*.query", "**"]}, "space.exclude", "matches every module name", id="exclude-all-2"),
    pytest.param({"exclude": ["?*"]}, "space.exclude", "matches every module name", id="exclude-any"),
    pytest.param({"include": ["*.query"], "exclude": ["*.query"]}, "space.exclude", "also an exclude", id="same"),
    pytest.param({"include": ["*.[qk]uery", "*.[v"]}, "space.include", "never closed", id="unclosed-class"),
    pytest.param({"exclude": ["*.output dense"]}, "space.exclude", "whitespace", id="whitespace"),
    pytest.param({"include": ["x" * 257]}, "space.include.0", "at most 256", id="too-long"),
    pytest.param({"exclude": ["*.a"] * 257}, "space.exclude", "at most 256", id="too-many"),
]  # fmt: skip


@pytest.mark.parametrize(("space", "field", "words"), BAD_SELECTIONS)
def test_a_selection_that_leaves_nothing_to_search_is_refused_at_submit(
    api: Api, space: dict[str, Any], field: str, words: str
) -> None:
    before = snapshot(api.store)
    r = api.client.post(f"{API}/jobs", json=job_spec(space=space), headers=api.h())
    body = assert_error(r, 422, "invalid_request", field)
    assert words in body["message"], body
    assert snapshot(api.store) == before


def test_selections_that_can_match_are_accepted(api: Api) -> None:
    job = api.submit(space={"include": ["*.attention.*", "*.[qk]*"], "exclude": ["*.output.dense", "*.3.*"]})
    assert job["spec"]["space"]["exclude"] == ["*.output.dense", "*.3.*"]


# --------------------------------------------------------------------------- whole bodies


@pytest.mark.parametrize(
    ("content", "ctype", "words"),
    [
        pytest.param(b"[1, 2]", "application/json", "must be a JSON object", id="array"),
        pytest.param(b"null", "application/json", "must be a JSON object", id="null"),
        pytest.param(b'"text"', "application/json", "must be a JSON object", id="string"),
        pytest.param(b"", "application/json", "no body", id="empty"),
        pytest.param(b"{not json", "application/json", "not valid JSON", id="not-json"),
        pytest.param(b'{"model": "\xff\xfe"}', "application/json", "not valid UTF-8", id="invalid-utf8"),
        pytest.param(b"model=x", "application/x-www-form-urlencoded", "application/json", id="form"),
        pytest.param(b'{"model": {}}', "text/plain", "application/json", id="text-plain"),
    ],
)
def test_a_body_that_is_not_a_json_object_names_the_body(api: Api, content: bytes, ctype: str, words: str) -> None:
    before = snapshot(api.store)
    r = api.client.post(f"{API}/jobs", content=content, headers={**api.h(), "Content-Type": ctype})
    body = assert_error(r, 422, "invalid_request", "body")
    assert words in body["message"], body
    assert snapshot(api.store) == before


def test_a_multipart_body_without_a_boundary_names_the_body(api: Api) -> None:
    r = api.client.post(f"{API}/uploads", content=b"x", headers={**api.h(), "Content-Type": "multipart/form-data"})
    assert_error(r, 422, "invalid_request", "body")


# --------------------------------------------------------------------------- metrics


def test_metrics_need_an_admin_token_or_the_scrapers_secret(settings: Settings) -> None:
    secret = "scrape-" + "s" * 24
    store = Store.from_settings(settings)
    _, user = store.create_token(name="alice")
    _, admin = store.create_token(name="root", admin=True)
    try:
        with TestClient(create_app(settings, store=store)) as c:
            assert_error(c.get("/metrics"), 401, "unauthorized")
            assert_error(c.get("/metrics", headers={"Authorization": f"Bearer {user}"}), 403, "forbidden")
            assert_error(c.get("/metrics", headers={"Authorization": f"Bearer {secret}"}), 401, "unauthorized")
            ok = c.get("/metrics", headers={"Authorization": f"Bearer {admin}"})
            assert ok.status_code == 200 and "bitscout_jobs" in ok.text
        scraped = settings.model_copy(update={"metrics_token": SecretStr(secret)})
        with TestClient(create_app(scraped, store=store)) as c:
            ok = c.get("/metrics", headers={"Authorization": f"Bearer {secret}"})
            assert ok.status_code == 200 and "bitscout_http_requests" in ok.text
            assert c.get("/metrics", headers={"Authorization": f"Bearer {admin}"}).status_code == 200
            assert_error(c.get("/metrics", headers={"Authorization": f"Bearer {secret}x"}), 401, "unauthorized")
            assert_error(c.get("/metrics"), 401, "unauthorized")
    finally:
        store.close()
