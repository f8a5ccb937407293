"""429 is retried, never sooner than the ``Retry-After`` the server sent (seconds or an HTTP date),
a bounded number of times, with full jitter by default: against a real HTTP server on a local
socket that answers 429 a given number of times before it answers."""

from __future__ import annotations

import asyncio
import json
import statistics
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from email.utils import formatdate
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

import bitscout
from bitscout._base import parse_retry_after


class _Server:
    """Answers ``GET /api/v1/version``: 429 with ``retry_after()`` for the first ``limit`` requests,
    then 200; records when each request came."""

    def __init__(self, limit: int, retry_after: Callable[[], str | None]) -> None:
        self.limit = limit
        self.retry_after = retry_after
        self.times: list[float] = []


@contextmanager
def serving(limit: int, retry_after: Callable[[], str | None]) -> Iterator[tuple[str, _Server]]:
    state = _Server(limit, retry_after)

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - the http.server API
            state.times.append(time.monotonic())
            if len(state.times) <= state.limit:
                body = json.dumps({"code": "rate_limited", "message": "too many requests",
                                   "details": {"retry_after_s": 1}}).encode()  # fmt: skip
                self.send_response(429)
                value = state.retry_after()
                if value is not None:
                    self.send_header("Retry-After", value)
            else:
                body = json.dumps({"version": "test"}).encode()
                self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", state
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


def _gaps(times: list[float]) -> list[float]:
    return [b - a for a, b in zip(times, times[1:], strict=False)]


def test_429_is_retried_after_retry_after_seconds() -> None:
    with serving(2, lambda: "1") as (url, state):
        client = bitscout.Client(url, "t", retries=bitscout.RetryPolicy(max_retries=3, backoff=0.01))
        assert client.version() == {"version": "test"}
        client.close()
    assert len(state.times) == 3
    gaps = _gaps(state.times)
    assert all(g >= 1.0 for g in gaps), gaps  # never sooner than the server asked
    assert all(g < 3.0 for g in gaps), gaps  # Retry-After plus the small backoff (generous for a loaded machine)


def test_429_honours_an_http_date() -> None:
    # an HTTP date has whole seconds: two seconds ahead is between one and two seconds from now
    with serving(1, lambda: formatdate(time.time() + 2, usegmt=True)) as (url, state):
        client = bitscout.Client(url, "t", retries=bitscout.RetryPolicy(max_retries=2, backoff=0.01))
        assert client.version() == {"version": "test"}
        client.close()
    [gap] = _gaps(state.times)
    assert 0.9 <= gap <= 4.0, gap


def test_attempts_are_bounded_and_a_long_retry_after_is_not_waited_for() -> None:
    with serving(100, lambda: "0") as (url, state):
        client = bitscout.Client(url, "t", retries=bitscout.RetryPolicy(max_retries=2, backoff=0.01))
        with pytest.raises(bitscout.RateLimited) as exc:
            client.version()
        client.close()
    assert len(state.times) == 3 and exc.value.status == 429 and exc.value.retry_after == 1
    with serving(100, lambda: "120") as (url, state):
        client = bitscout.Client(url, "t", retries=bitscout.RetryPolicy(max_retries=5, max_retry_after=30))
        t0 = time.monotonic()
        with pytest.raises(bitscout.RateLimited):
            client.version()
        client.close()
    assert len(state.times) == 1 and time.monotonic() - t0 < 5  # raised at once, not after two minutes


def test_the_async_client_retries_429_too() -> None:
    async def main(url: str) -> dict[str, str]:
        async with bitscout.AsyncClient(url, "t", retries=bitscout.RetryPolicy(max_retries=3, backoff=0.01)) as c:
            return await c.version()

    with serving(1, lambda: "1") as (url, state):
        assert asyncio.run(main(url)) == {"version": "test"}
    [gap] = _gaps(state.times)
    assert 1.0 <= gap < 3.0, gap


def test_without_retry_after_the_backoff_has_full_jitter_by_default() -> None:
    with serving(3, lambda: None) as (url, state):
        client = bitscout.Client(url, "t", retries=bitscout.RetryPolicy(max_retries=3, backoff=0.2, max_backoff=0.2))
        assert client.version() == {"version": "test"}
        client.close()
    assert len(state.times) == 4 and all(g < 2.0 for g in _gaps(state.times))
    policy = bitscout.RetryPolicy(backoff=1.0, max_backoff=1.0)
    draws = [policy.delay(3) for _ in range(400)]
    assert all(0.0 <= d <= 1.0 for d in draws)
    assert 0.4 < statistics.mean(draws) < 0.6 and min(draws) < 0.1 and max(draws) > 0.9  # uniform on [0, 1]
    assert len({bitscout.RetryPolicy(jitter=0.0).delay(2) for _ in range(10)}) == 1
    with pytest.raises(ValueError, match="jitter"):
        bitscout.RetryPolicy(jitter=1.5)


def test_retry_after_values() -> None:
    assert parse_retry_after("2") == 2.0 and parse_retry_after(" 0 ") == 0.0 and parse_retry_after("-3") == 0.0
    assert parse_retry_after("Wed, 21 Oct 2015 07:28:05 GMT", now=1445412485.0 - 10) == 10.0
    assert parse_retry_after("Wed, 21 Oct 2015 07:28:05 GMT", now=1445412485.0 + 10) == 0.0  # in the past
    assert parse_retry_after("later") is None and parse_retry_after("") is None and parse_retry_after("nan") is None
