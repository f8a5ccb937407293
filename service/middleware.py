"""The service's ASGI middleware: body size limits, request metrics, trusted hosts.

:func:`install_middleware` adds them to an app, outermost first:

1. ``TrustedHostMiddleware`` (only when ``Settings.allowed_hosts`` is set and not ``*``): a
   request for another host answers 400 before anything else runs.
2. :class:`BodyLimitMiddleware`: the one size limit of request bodies. A body over the limit
   answers 413 ``payload_too_large`` with an ``ErrorBody``, refused from its ``Content-Length``
   before it is read, or, sent chunked (or longer than it declared), as soon as more arrives than
   the limit; no route ever sees a body over the limit.
3. :class:`MetricsMiddleware` (when metrics are on): every request counted and timed per route
   template, whatever it answered.
"""

from __future__ import annotations

import time
from typing import Any

from fastapi import FastAPI
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from bitscout.errors import PayloadTooLarge
from service.errors import send_error
from service.metrics import Metrics
from service.routes import API_PREFIX
from service.settings import Settings

__all__ = ["BodyLimitMiddleware", "MetricsMiddleware", "install_middleware"]


class _BodyTooLarge(Exception):
    pass


class BodyLimitMiddleware:
    """Refuses bodies over the limit (413) before or while they arrive: uploads get
    ``max_upload`` (plus multipart overhead), everything else ``max_request``.

    A body that declares its length is refused from its ``Content-Length`` before a byte is read;
    one sent without (``Transfer-Encoding: chunked``) is counted as it arrives and refused as soon
    as it passes the limit. Either way the answer is 413 ``payload_too_large``, never whatever the
    framework would have made of a body cut short (the route's body parsing fails first, so no
    route ever runs with a body over the limit).
    """

    def __init__(self, app: ASGIApp, *, max_upload: int, max_request: int) -> None:
        self.app = app
        self.max_upload = max_upload + 1024 * 1024
        self.max_request = max_request

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD", "OPTIONS"):
            await self.app(scope, receive, send)
            return
        limit = self.max_upload if scope["path"].rstrip("/") == f"{API_PREFIX}/uploads" else self.max_request
        for name, value in scope.get("headers", ()):
            if name == b"content-length":
                try:
                    declared = int(value)
                except ValueError:
                    declared = -1
                if declared > limit:
                    await send_error(send, PayloadTooLarge(_too_large_message(limit)))
                    return
        received = 0
        over = False  # more arrived than the limit allows
        app_started = False  # the app's own response began before that
        refused = False  # our 413 went out

        async def refuse() -> None:
            nonlocal refused
            if not refused and not app_started:
                refused = True
                await send_error(send, PayloadTooLarge(_too_large_message(limit)))

        async def limited_receive() -> Message:
            nonlocal received, over
            if over:
                raise _BodyTooLarge
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    over = True
                    raise _BodyTooLarge
            return message

        async def guarded_send(message: Message) -> None:
            nonlocal app_started
            if over and not app_started:
                # The framework caught the cut-short body and answers with its own error: the
                # answer is 413, and the app's response is dropped.
                await refuse()
                return
            if message["type"] == "http.response.start":
                app_started = True
            await send(message)

        try:
            await self.app(scope, limited_receive, guarded_send)
        except _BodyTooLarge:
            await refuse()


def _too_large_message(limit: int) -> str:
    return f"the request body is over the limit of {limit / 1e6:.1f} MB"


class MetricsMiddleware:
    """Counts requests and their latency per route template for Prometheus."""

    def __init__(self, app: ASGIApp, *, requests: Any, latency: Any) -> None:
        self.app = app
        self.requests = requests
        self.latency = latency

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = 500

        async def send_wrapper(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            route = scope.get("route")
            template = getattr(route, "path", None) or "unmatched"
            self.requests.labels(scope["method"], template, str(status)).inc()
            self.latency.labels(scope["method"], template).observe(time.perf_counter() - start)


def install_middleware(app: FastAPI, settings: Settings, metrics: Metrics | None) -> None:
    """Add the middleware of the module docstring to ``app`` (``metrics``: None when off)."""
    # Starlette runs the middleware added last first.
    if metrics is not None:
        app.add_middleware(MetricsMiddleware, requests=metrics.requests, latency=metrics.latency)
    app.add_middleware(
        BodyLimitMiddleware,
        max_upload=int(settings.max_upload_mb * 1e6),
        max_request=int(settings.max_request_kb * 1024),
    )
    if settings.allowed_hosts and "*" not in settings.allowed_hosts:
        from starlette.middleware.trustedhost import TrustedHostMiddleware

        app.add_middleware(TrustedHostMiddleware, allowed_hosts=settings.allowed_hosts)
