"""Every typed error, produced by a real answer of the real service (in-process and over a socket),
and the retry policy: connection errors and 503 are retried with backoff, 4xx never."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import httpx2
import pytest

import bitscout
from tests.bitscout.conftest import Service, make_service
from tests.bitscout.support import AsyncFlakyTransport, FlakyTransport, live_server

SPEC: dict[str, Any] = {
    "model": "hf:sentence-transformers/all-MiniLM-L6-v2@" + "a" * 40,
    "data": "dataset:ag_news",
    "task": "sequence_classification",
    "budget": {"max_size_mb": 10},
}


def _finish(service: Service, job_id: str) -> None:
    from tests.service.conftest import make_points

    rec = service.store.claim_next_job(worker_id="w")
    assert rec is not None and rec.id == job_id
    service.store.finish_job(job_id=job_id, worker_id="w", points=make_points(4))


def _errors(client: bitscout.Client, service: Service) -> None:
    """Each error type from a real server answer (``client`` is alice's)."""
    job = client.submit(**SPEC)

    # 404: another user's job looks like no job at all; a missing point
    bob = bitscout.Client(client.url, service.tokens["bob"], transport=client._http._transport, retries=0)
    for call in (
        lambda: bob.job(job.id),
        lambda: bob.cancel(job.id),
        lambda: bob.pareto(job.id),
        lambda: bob.events(job.id),
    ):
        with pytest.raises(bitscout.NotFound) as nf:
            call()
        assert (
            nf.value.status == 404
            and nf.value.code is bitscout.ErrorCode.not_found
            and nf.value.field == "job_id"
        )
    with pytest.raises(bitscout.NotFound):
        client.job("0" * 32)

    # 422 with the field: inputs only the server can judge
    with pytest.raises(bitscout.InvalidRequest) as ir:
        client.submit(**{**SPEC, "model": "server:no-such-model"})
    assert ir.value.status == 422 and ir.value.field == "model.path"
    with pytest.raises(bitscout.InvalidRequest) as ir:
        client.submit(**{**SPEC, "data": "upload:" + "f" * 32})
    assert ir.value.field == "data.upload_id" and "no upload" in ir.value.message
    with pytest.raises(bitscout.InvalidRequest) as ir:
        client.jobs(limit=100000)
    assert ir.value.status == 422 and ir.value.field == "limit"

    # 401: a bad token, and none at all (with a hint where to get one)
    bad = bitscout.Client(client.url, "bst_not-a-token", transport=client._http._transport, retries=0)
    with pytest.raises(bitscout.Unauthorized) as ua:
        bad.job(job.id)
    assert ua.value.status == 401 and "unknown or revoked" in ua.value.message
    anonymous = bitscout.Client(client.url, transport=client._http._transport, retries=0)
    with pytest.raises(bitscout.Unauthorized) as ua:
        anonymous.jobs()
    assert "BITSCOUT_TOKEN" in ua.value.message

    # 409: reusing an idempotency key for another spec; canceling a finished job
    client.submit(**SPEC, idempotency_key="run-1")
    assert (
        client.submit(**SPEC, idempotency_key="run-1").id == client.submit(**SPEC, idempotency_key="run-1").id
    )
    with pytest.raises(bitscout.Conflict) as cf:
        client.submit(**{**SPEC, "seed": 5}, idempotency_key="run-1")
    assert cf.value.status == 409 and cf.value.field == "idempotency_key"
    _finish(service, job.id)
    with pytest.raises(bitscout.Conflict) as cf:
        client.cancel(job.id)
    assert "already succeeded" in cf.value.message

    # 503: no allocator behind resolve on this server
    with pytest.raises(bitscout.ServiceUnavailable) as su:
        client.resolve(job.id, max_size_mb=5)
    assert su.value.status == 503 and su.value.code is bitscout.ErrorCode.unavailable

    # JobFailed: a failed job, a canceled one
    failed = client.submit(**{**SPEC, "seed": 11})
    service.store.fail_job(job_id=failed.id, worker_id=None, code="data_invalid", message="no column 'label'")
    with pytest.raises(bitscout.JobFailed) as jf:
        failed.wait(progress=False, poll_interval=0.01)
    assert jf.value.code is bitscout.ErrorCode.data_invalid and jf.value.job_id == failed.id
    assert "no column 'label'" in str(jf.value)
    canceled = client.submit(**{**SPEC, "seed": 12}).cancel()
    assert canceled.status is bitscout.JobStatus.canceled
    with pytest.raises(bitscout.JobFailed) as jf:
        canceled.wait(progress=False)
    assert jf.value.code is bitscout.ErrorCode.canceled
    assert canceled.wait(progress=False, raise_on_failure=False) is canceled


def test_error_types_in_process(service: Service) -> None:
    _errors(service.client(retries=bitscout.RetryPolicy(max_retries=1, backoff=0.0)), service)


def test_error_types_over_a_real_socket(service: Service) -> None:
    with live_server(service.app) as url:
        client = bitscout.Client(
            url, service.tokens["alice"], retries=bitscout.RetryPolicy(max_retries=1, backoff=0.0)
        )
        _errors(client, service)
        client.close()


def test_payload_too_large_and_rate_limited(tmp_path: Path, sqlite_template: Path) -> None:
    svc = make_service(tmp_path, sqlite_template, max_upload_mb=0.01, submit_rate_per_min=1, submit_burst=1)
    try:
        client = svc.client()
        big = tmp_path / "big.jsonl"
        big.write_text('{"text": "x", "label": 1}\n' * 2000)
        with pytest.raises(bitscout.PayloadTooLarge) as tl:
            client.upload(big)
        assert tl.value.status == 413
        client.submit(**SPEC)
        with pytest.raises(bitscout.RateLimited) as rl:
            client.submit(**SPEC)
        assert rl.value.status == 429 and rl.value.retry_after is not None and rl.value.retry_after > 0
    finally:
        svc.close()
        svc.store.close()


def test_bad_input_is_refused_before_any_request(service: Service, tmp_path: Path) -> None:
    """Client-side validation: the same typed error and field, and nothing is sent or uploaded."""
    counting = FlakyTransport(service.transport(), fail=0)
    client = service.client(transport=counting)
    model_dir = tmp_path / "m"
    model_dir.mkdir()
    (model_dir / "config.json").write_text("{}")
    (model_dir / "model.safetensors").write_bytes(b"\0" * 16)
    cases = [
        ({"budget": {"max_size_mb": -1}}, "budget.max_size_mb"),
        ({"budget": {}}, "budget"),
        ({"budget": None}, "budget"),
        ({"methods": ["kl", "kl"]}, "methods"),
        ({"methods": ["magic"]}, "methods.0"),
        ({"metric": "perplexity"}, None),
        ({"space": {"bits": [7]}}, "space.bits.0"),
        ({"model": model_dir, "task": None}, "task"),
        ({"model": "./does/not/exist"}, "model"),
        ({"data": tmp_path / "missing.jsonl"}, "data"),
        ({"data": "hf:x"}, None),
        ({"model": "hf:org/name"}, "model"),
        ({"data_options": {"calibration_size": 0}}, "data.calibration_size"),
    ]
    for override, field in cases:
        with pytest.raises(bitscout.InvalidRequest) as ir:
            client.submit(**{**SPEC, "model": model_dir, **override})
        if field is not None:
            assert ir.value.field == field, (override, ir.value)
    assert counting.calls == []


# --------------------------------------------------------------------------- retries


def test_retries_connection_errors_then_succeeds(service: Service) -> None:
    flaky = FlakyTransport(service.transport(), fail=2)
    client = service.client(transport=flaky)
    slept: list[float] = []
    client._sleep = slept.append
    assert client.jobs().total == 0
    assert flaky.calls == ["GET /api/v1/jobs"] * 3
    # exponential backoff with full jitter (the default): a random wait up to 0.01, then up to 0.02
    assert len(slept) == 2 and 0.0 <= slept[0] <= 0.01 and 0.0 <= slept[1] <= 0.02
    steady = service.client(transport=FlakyTransport(service.transport(), fail=2),
                            retries=bitscout.RetryPolicy(max_retries=3, backoff=0.01, jitter=0.0))  # fmt: skip
    slept.clear()
    steady._sleep = slept.append
    assert steady.jobs().total == 0 and slept == [0.01, 0.02]  # no jitter: the backoff itself


def test_retries_503_then_succeeds_and_gives_up(service: Service) -> None:
    flaky = FlakyTransport(service.transport(), fail=2, status=503)
    client = service.client(transport=flaky)
    client._sleep = lambda s: None
    job = client.submit(**SPEC)  # retried submissions carry one idempotency key: one job
    assert [c.split()[0] for c in flaky.calls] == ["POST"] * 3
    assert client.jobs().total == 1 and client.jobs().items[0].id == job.id

    down = FlakyTransport(service.transport(), fail=100)
    client = service.client(transport=down, retries=bitscout.RetryPolicy(max_retries=4, backoff=0.0))
    with pytest.raises(bitscout.ServiceUnavailable) as su:
        client.jobs()
    assert len(down.calls) == 5 and su.value.details and su.value.details["attempts"] == 5
    assert "cannot reach the bitscout service" in su.value.message and isinstance(
        su.value.__cause__, httpx2.ConnectError
    )


def test_never_retries_a_4xx(service: Service) -> None:
    counting = FlakyTransport(service.transport(), fail=0)
    client = service.client(transport=counting)
    slept: list[float] = []
    client._sleep = slept.append
    job = client.submit(**SPEC)
    counting.calls.clear()
    for call, err in (
        (lambda: client.job("nope"), bitscout.NotFound),
        (lambda: client.submit(**{**SPEC, "model": "server:nope"}), bitscout.InvalidRequest),
        (
            lambda: bitscout.Client("http://testserver", "bad", transport=counting).job(job.id),
            bitscout.Unauthorized,
        ),
        (lambda: client.resolve(job.id, max_size_mb=0.5), bitscout.ServiceUnavailable),
    ):
        counting.calls.clear()
        slept.clear()
        with pytest.raises(err):
            call()
        retried = err is bitscout.ServiceUnavailable  # 503: the one status here that is retried
        assert len(counting.calls) == (client.retry.max_retries + 1 if retried else 1), (err, counting.calls)
        assert len(slept) == (client.retry.max_retries if retried else 0)


def test_async_retries_and_errors(service: Service) -> None:
    async def main() -> None:
        flaky = AsyncFlakyTransport(service.async_transport(), fail=2)
        async with service.async_client(transport=flaky) as client:
            page = await client.jobs()
            assert page.total == 0 and len(flaky.calls) == 3
            job = await client.submit(**SPEC)
            await client.submit(**{**SPEC, "seed": 3}, idempotency_key="k1")
            with pytest.raises(bitscout.Conflict) as cf:
                await client.submit(**SPEC, idempotency_key="k1")
            assert cf.value.field == "idempotency_key"
            n = len(flaky.calls)
            with pytest.raises(bitscout.NotFound):
                await client.job("missing")
            assert len(flaky.calls) == n + 1
            with pytest.raises(bitscout.ServiceUnavailable):
                await job.resolve(max_size_mb=1)
            canceled = await job.cancel()
            assert canceled.status is bitscout.JobStatus.canceled
            with pytest.raises(bitscout.JobFailed):
                await job.wait(progress=False)
        async with service.async_client("bob") as bob:
            with pytest.raises(bitscout.NotFound):
                await bob.job(job.id)
        async with service.async_client("bst_bad") as bad:
            with pytest.raises(bitscout.Unauthorized):
                await bad.jobs()
        down = AsyncFlakyTransport(service.async_transport(), fail=100)
        async with service.async_client(
            transport=down, retries=bitscout.RetryPolicy(max_retries=2, backoff=0.0)
        ) as c:
            with pytest.raises(bitscout.ServiceUnavailable):
                await c.jobs()
        assert len(down.calls) == 3

    asyncio.run(main())


def test_unreachable_server_is_one_typed_error() -> None:
    client = bitscout.Client(
        "http://127.0.0.1:9", "t", retries=bitscout.RetryPolicy(max_retries=1, backoff=0.0)
    )
    with pytest.raises(bitscout.ServiceUnavailable) as su:
        client.jobs()
    assert "http://127.0.0.1:9" in su.value.message
