"""The FastAPI application: REST API under ``/api/v1``, health, metrics and the web status page.

``create_app(settings, resolver=...)`` builds it. The service never imports the search library:
``POST /jobs/{id}/resolve`` calls a :class:`Resolver` that the workers package injects (without
one it answers ``unavailable``). Routes never commit: every change goes through one
:class:`~service.store.Store` method, which owns its transaction.

Every error response has the body :class:`bitscout.errors.ErrorBody`; a request that fails
validation gets 422 with code ``invalid_request`` and ``field`` set to the dotted path of the
offending input. No stack trace ever reaches a client.
"""

import inspect
import logging
import math
import os
import time
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import asynccontextmanager
from typing import Annotated, Any, Protocol, runtime_checkable

from fastapi import Depends, FastAPI, File, Form, Path, Query, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from sqlalchemy.exc import DBAPIError, OperationalError
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

import bitscout
from bitscout.errors import (
    HTTP_STATUS,
    BitscoutError,
    Conflict,
    ErrorBody,
    ErrorCode,
    InvalidRequest,
    NotFound,
    PayloadTooLarge,
    ServiceUnavailable,
)
from bitscout.schemas import (
    SCHEMA_VERSION,
    JobCreate,
    JobEventRead,
    JobList,
    JobRead,
    JobStatus,
    ParetoPointRead,
    ParetoRead,
    ResolveRead,
    ResolveRequest,
    SensitivityRead,
    UploadKind,
    UploadRead,
)
from service import db
from service.security import RateLimiter, TokenVerifier
from service.settings import Settings
from service.store import Principal, Store
from service.uploads import check_data_file, check_model_archive, infer_kind, resolve_under

log = logging.getLogger("bitscout.service")

API_PREFIX = "/api/v1"
MAX_PAGE = 200


@runtime_checkable
class Resolver(Protocol):
    """Answers a new budget from stored sensitivities (implemented by the workers package).

    ``space`` is what the runner stored with ``Store.put_space``; ``sensitivities`` the tables
    stored with ``Store.put_sensitivity`` (restricted to ``methods`` when the client named some);
    ``budget`` a ``BudgetSpec`` dump (``max_size_mb``, ``max_avg_bits``, ``max_bops``,
    ``max_latency_ms``, ``device_profile``). Returns a dict with ``precision_map``
    ({group: {bits, symmetric}}), ``cost`` ({size_bytes, avg_bits, bops, latency_ms}),
    ``predicted``, ``exact`` and ``gap``. Raise an exception with a ``code`` attribute
    (``budget_infeasible`` with ``field`` and ``smallest``, say) for a failure the client caused.
    """

    def resolve(
        self,
        *,
        space: dict[str, Any],
        sensitivities: list[dict[str, Any]],
        budget: dict[str, Any],
        methods: list[str] | None,
    ) -> dict[str, Any]: ...


# --------------------------------------------------------------------------- errors


def _error_response(err: BitscoutError) -> JSONResponse:
    headers: dict[str, str] = {}
    if err.code is ErrorCode.rate_limited:
        retry = (err.details or {}).get("retry_after_s")
        if isinstance(retry, int | float):
            headers["Retry-After"] = str(max(1, math.ceil(retry)))
    if err.status == 401:
        headers["WWW-Authenticate"] = "Bearer"
    body = err.to_body().model_dump(mode="json")
    return JSONResponse(body, status_code=err.status, headers=headers)


def _loc_to_field(loc: tuple[Any, ...] | list[Any]) -> str | None:
    parts = [str(p) for p in loc]
    if parts and parts[0] in ("body", "query", "path", "header", "cookie", "form"):
        parts = parts[1:]
    # Drop pydantic's union / validator tags such as "function-after[...]" or "literal['x']".
    parts = [p for p in parts if not any(c in p for c in "[(")]
    return ".".join(parts) or None


def _validation_error(exc: RequestValidationError) -> BitscoutError:
    errors = list(exc.errors())
    items = []
    for e in errors[:20]:
        msg = str(e.get("msg", "invalid value"))
        if msg.startswith("Value error, "):
            msg = msg[len("Value error, ") :]
        items.append(
            {"field": _loc_to_field(e.get("loc", ())), "message": msg, "type": str(e.get("type", ""))}
        )
    first = items[0] if items else {"field": None, "message": "invalid request"}
    if first.get("type") == "json_invalid":
        first = {**first, "field": "body", "message": "the body is not valid JSON"}
    message = str(first["message"])
    if first["field"]:
        message = f"{first['field']}: {message}"
    if len(items) > 1:
        message += f" (and {len(errors) - 1} more problem{'s' if len(errors) > 2 else ''})"
    return InvalidRequest(message, field=first["field"], details={"errors": items})


_STATUS_CODES: dict[int, ErrorCode] = {
    400: ErrorCode.invalid_request,
    401: ErrorCode.unauthorized,
    403: ErrorCode.forbidden,
    404: ErrorCode.not_found,
    405: ErrorCode.invalid_request,
    406: ErrorCode.invalid_request,
    409: ErrorCode.conflict,
    413: ErrorCode.payload_too_large,
    415: ErrorCode.invalid_request,
    429: ErrorCode.rate_limited,
    503: ErrorCode.unavailable,
}


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(BitscoutError)
    async def _bitscout_error(_request: Request, exc: BitscoutError) -> JSONResponse:
        return _error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _validation(_request: Request, exc: RequestValidationError) -> JSONResponse:
        return _error_response(_validation_error(exc))

    @app.exception_handler(StarletteHTTPException)
    async def _http(_request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = _STATUS_CODES.get(
            exc.status_code, ErrorCode.invalid_request if exc.status_code < 500 else ErrorCode.internal
        )
        message = str(exc.detail) if exc.detail else code.value
        if exc.status_code == 404:
            message = "no such resource"
        elif exc.status_code == 405:
            message = "method not allowed on this resource"
        # Every invalid request answers 422 (the one status of invalid_request), also when the
        # framework itself refuses a body (e.g. multipart without a boundary: Starlette's 400).
        status = HTTP_STATUS[ErrorCode.invalid_request] if exc.status_code == 400 else exc.status_code
        resp = _error_response(BitscoutError(code, message, status=status))
        if exc.headers:
            resp.headers.update(exc.headers)
        return resp

    @app.exception_handler(DBAPIError)
    async def _database(request: Request, exc: DBAPIError) -> JSONResponse:
        if exc.connection_invalidated or isinstance(exc, OperationalError):
            log.warning("database unavailable on %s %s: %s", request.method, request.url.path, exc.orig)
            return _error_response(ServiceUnavailable("the database is unavailable; try again shortly"))
        log.exception("database error on %s %s", request.method, request.url.path)
        return _error_response(
            BitscoutError(ErrorCode.internal, "internal error; the server log has the details")
        )

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unexpected error on %s %s", request.method, request.url.path)
        return _error_response(
            BitscoutError(ErrorCode.internal, "internal error; the server log has the details")
        )


ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    401: {"model": ErrorBody, "description": "Missing, unknown or revoked token."},
    404: {"model": ErrorBody, "description": "No such resource (or another user's)."},
    422: {"model": ErrorBody, "description": "Invalid request; `field` names the input."},
}


def _responses(*codes: int) -> dict[int | str, dict[str, Any]]:
    out = dict(ERROR_RESPONSES)
    descriptions = {
        409: "The resource's state does not allow this.",
        413: "Too large.",
        429: "Rate limited; see Retry-After.",
        503: "Unavailable.",
    }
    for c in codes:
        out[c] = {"model": ErrorBody, "description": descriptions.get(c, "Error.")}
    return out


# --------------------------------------------------------------------------- middleware


class _BodyTooLarge(Exception):
    pass


class BodyLimitMiddleware:
    """Refuses bodies over the limit (413) before or while they arrive: uploads get
    ``max_upload`` (plus multipart overhead), everything else ``max_request``."""

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
                    await _send_error(send, PayloadTooLarge(_too_large_message(limit)))
                    return
        received = 0
        started = False

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise _BodyTooLarge
            return message

        async def tracking_send(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, limited_receive, tracking_send)
        except _BodyTooLarge:
            if not started:
                await _send_error(send, PayloadTooLarge(_too_large_message(limit)))


def _too_large_message(limit: int) -> str:
    return f"the request body is over the limit of {limit / 1e6:.1f} MB"


async def _send_error(send: Send, err: BitscoutError) -> None:
    body = err.to_body().model_dump_json().encode()
    await send(
        {
            "type": "http.response.start",
            "status": err.status,
            "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())],
        }
    )
    await send({"type": "http.response.body", "body": body})


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


def _setup_metrics(app: FastAPI, store: Store) -> Callable[[], bytes]:
    from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
    from prometheus_client.core import GaugeMetricFamily

    registry = CollectorRegistry(auto_describe=True)
    requests = Counter(
        "bitscout_http_requests", "HTTP requests", ["method", "route", "status"], registry=registry
    )
    latency = Histogram(
        "bitscout_http_request_duration_seconds",
        "HTTP request latency",
        ["method", "route"],
        registry=registry,
        buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
    )

    class _JobsCollector:
        def collect(self) -> Any:
            g = GaugeMetricFamily("bitscout_jobs", "Jobs per status", labels=["status"])
            try:
                counts = store.count_jobs()
            except Exception:  # noqa: BLE001 - a scrape must not fail because the database is down
                counts = {}
            for status, n in counts.items():
                g.add_metric([status], n)
            yield g

        def describe(self) -> list[Any]:
            return []

    registry.register(_JobsCollector())
    app.add_middleware(MetricsMiddleware, requests=requests, latency=latency)
    return lambda: generate_latest(registry)


# --------------------------------------------------------------------------- the app


def _json(model: Any, status_code: int = 200) -> Response:
    return Response(model.model_dump_json(), status_code=status_code, media_type="application/json")


def _json_list(items: list[Any]) -> Response:
    body = "[" + ",".join(i.model_dump_json() for i in items) + "]"
    return Response(body, media_type="application/json")


def create_app(
    settings: Settings | None = None, *, resolver: Resolver | None = None, store: Store | None = None
) -> FastAPI:
    """Build the service.

    Args:
        settings: process configuration (read from the environment when None).
        resolver: the allocator behind ``POST /jobs/{id}/resolve`` (workers inject it); without
            one that route answers 503 ``unavailable``.
        store: an open store to use instead of opening one from ``settings`` (tests).

    Raises:
        service.db.SchemaOutOfDate: the database is not at the migrations' head (unless
            ``settings.check_schema`` is off); the message says to run ``bitscout db upgrade``.
    """
    settings = settings or Settings()
    own_store = store is None
    st = store if store is not None else Store.from_settings(settings)
    if settings.check_schema:
        if settings.auto_upgrade and db.current_revision(st.engine) != db.head_revision():
            db.upgrade(st.engine)
        db.check_schema(st.engine)
    head = db.head_revision()

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        yield
        if own_store:
            st.close()

    extra: dict[str, Any] = {}
    if "telemetry" in inspect.signature(FastAPI.__init__).parameters and not settings.otel:
        # FastAPI's native OpenTelemetry spans cost ~10% of a status poll; Prometheus metrics stay on.
        extra["telemetry"] = {"tracing": False, "metrics": False, "logs": False, "operation_spans": False}
    app = FastAPI(
        **extra,
        title="bitscout",
        version=getattr(bitscout, "__version__", "0.1.0"),
        summary="Mixed-precision quantization and group-pruning search, as a service.",
        description=(
            "Submit a search (`POST /api/v1/jobs`), poll it, read its Pareto front, resolve new budgets "
            f"from stored sensitivities. Wire schema version {SCHEMA_VERSION}. Every request needs "
            "`Authorization: Bearer <token>`; errors have the body `ErrorBody`."
        ),
        openapi_url=f"{API_PREFIX}/openapi.json",
        docs_url=None,
        redoc_url=None,
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.state.store = st
    app.state.resolver = resolver
    verifier = TokenVerifier(st, ttl_s=settings.token_cache_s)
    app.state.verifier = verifier
    submit_limit = RateLimiter(
        per_min=settings.submit_rate_per_min, burst=settings.submit_burst, what="job submissions"
    )
    upload_limit = RateLimiter(
        per_min=settings.upload_rate_per_min, burst=settings.upload_burst, what="uploads"
    )
    max_upload = int(settings.max_upload_mb * 1e6)

    _install_error_handlers(app)
    render_metrics = _setup_metrics(app, st) if settings.metrics else None
    app.add_middleware(
        BodyLimitMiddleware, max_upload=max_upload, max_request=int(settings.max_request_kb * 1024)
    )
    if settings.allowed_hosts and "*" not in settings.allowed_hosts:
        from starlette.middleware.trustedhost import TrustedHostMiddleware

        app.add_middleware(TrustedHostMiddleware, allowed_hosts=settings.allowed_hosts)

    async def principal(request: Request) -> Principal:
        header = request.headers.get("authorization")
        hit = verifier.cached(header)
        if hit is not None:
            return hit
        return await run_in_threadpool(verifier.verify, header)

    User = Annotated[Principal, Depends(principal)]
    JobId = Annotated[str, Path(min_length=1, max_length=64, description="The job's id.")]
    PointId = Annotated[int, Path(ge=0, le=1_000_000, description="The point's id within the job.")]

    def owner_of(user: Principal) -> str | None:
        """Admins see every job; other users only their own."""
        return None if user.admin else user.name

    # ------------------------------------------------------------------ health, metrics

    @app.get("/healthz", tags=["health"], summary="The process is up.")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get(
        "/readyz",
        tags=["health"],
        summary="The database is reachable and its schema at head.",
        responses={503: {"model": ErrorBody, "description": "Not ready."}},
    )
    def readyz() -> dict[str, str]:
        try:
            st.ping()
            current = db.current_revision(st.engine)
        except Exception as exc:  # noqa: BLE001 - any database failure means not ready
            log.warning("readiness check failed: %s", exc)
            raise ServiceUnavailable("the database is unreachable") from None
        if current != head:
            raise ServiceUnavailable(f"the database schema is at {current}, not {head}: {db.UPGRADE_HINT}")
        return {"status": "ready", "schema": str(current)}

    if render_metrics is not None:

        @app.get("/metrics", include_in_schema=False)
        def metrics() -> Response:
            from prometheus_client import CONTENT_TYPE_LATEST

            return Response(render_metrics(), media_type=CONTENT_TYPE_LATEST)

    # ------------------------------------------------------------------ jobs

    def _check_sources(body: JobCreate, user: Principal) -> None:
        m, d = body.model, body.data
        if m.path is not None:
            p = resolve_under(settings.model_root, m.path, what="model", field="model.path")
            if not p.is_dir():
                raise InvalidRequest("model.path must be a model directory", field="model.path")
        if m.upload_id is not None:
            _check_upload(m.upload_id, UploadKind.model, user, "model.upload_id")
        if d.path is not None:
            p = resolve_under(settings.data_root, d.path, what="data", field="data.path")
            if not p.is_file():
                raise InvalidRequest("data.path must be a file", field="data.path")
        if d.upload_id is not None:
            _check_upload(d.upload_id, UploadKind.data, user, "data.upload_id")

    def _check_upload(upload_id: str, kind: UploadKind, user: Principal, field: str) -> None:
        try:
            up = st.get_upload(upload_id=upload_id, owner=owner_of(user))
        except NotFound:
            raise InvalidRequest(f"no upload {upload_id!r}", field=field) from None
        if up.kind != kind:
            raise InvalidRequest(
                f"upload {upload_id} is a {up.kind.value} upload, not {kind.value}", field=field
            )

    @app.post(
        f"{API_PREFIX}/jobs",
        status_code=201,
        response_model=JobRead,
        tags=["jobs"],
        summary="Submit a search.",
        description="Writes the job (status `queued`) and returns it. Resubmitting with the same "
        "`idempotency_key` returns the first job (409 if the spec differs).",
        responses=_responses(409, 413, 429),
    )
    def submit_job(body: JobCreate, user: User) -> Response:
        _check_sources(body, user)
        submit_limit.hit(user.name)
        job = st.create_job(
            owner=user.name,
            spec=body.spec(),
            idempotency_key=body.idempotency_key,
            max_active=settings.max_active_jobs_per_user,
        )
        return _json(job, 201)

    @app.get(
        f"{API_PREFIX}/jobs",
        response_model=JobList,
        tags=["jobs"],
        summary="List jobs, newest first.",
        responses=ERROR_RESPONSES,
    )
    async def list_jobs(
        user: User,
        status: Annotated[JobStatus | None, Query(description="Only jobs in this status.")] = None,
        limit: Annotated[int, Query(ge=1, le=MAX_PAGE, description="Page size.")] = 50,
        offset: Annotated[int, Query(ge=0, le=10_000_000, description="Jobs to skip.")] = 0,
    ) -> Response:
        return _json(st.list_jobs(owner=owner_of(user), status=status, limit=limit, offset=offset))

    @app.get(
        f"{API_PREFIX}/jobs/{{job_id}}",
        response_model=JobRead,
        tags=["jobs"],
        summary="A job's status and progress.",
        responses=ERROR_RESPONSES,
    )
    async def get_job(job_id: JobId, user: User) -> Response:
        return _json(st.get_job(job_id=job_id, owner=owner_of(user)))

    @app.post(
        f"{API_PREFIX}/jobs/{{job_id}}/cancel",
        response_model=JobRead,
        tags=["jobs"],
        summary="Cancel a job.",
        description="A queued job is canceled at once; a running one gets `cancel_requested` and "
        "stops within seconds. 409 when it already succeeded or failed.",
        responses=_responses(409),
    )
    def cancel_job(job_id: JobId, user: User) -> Response:
        return _json(st.request_cancel(job_id=job_id, owner=owner_of(user)))

    @app.get(
        f"{API_PREFIX}/jobs/{{job_id}}/pareto",
        response_model=ParetoRead,
        tags=["results"],
        summary="Every stored point of a job (front and uniform baselines).",
        responses=ERROR_RESPONSES,
    )
    async def get_pareto(job_id: JobId, user: User) -> Response:
        return _json(st.get_pareto(job_id=job_id, owner=owner_of(user)))

    @app.get(
        f"{API_PREFIX}/jobs/{{job_id}}/points/{{point_id}}",
        response_model=ParetoPointRead,
        tags=["results"],
        summary="One point with its precision map.",
        responses=ERROR_RESPONSES,
    )
    async def get_point(job_id: JobId, point_id: PointId, user: User) -> Response:
        return _json(st.get_point(job_id=job_id, point_id=point_id, owner=owner_of(user)))

    @app.get(
        f"{API_PREFIX}/jobs/{{job_id}}/points/{{point_id}}/artifact",
        tags=["results"],
        summary="Download a point's exported model.",
        response_class=FileResponse,
        responses={
            **ERROR_RESPONSES,
            200: {"content": {"application/octet-stream": {}}, "description": "The artifact."},
        },
    )
    def get_artifact(job_id: JobId, point_id: PointId, user: User) -> FileResponse:
        path, name, _size = st.get_artifact(job_id=job_id, point_id=point_id, owner=owner_of(user))
        return FileResponse(path, filename=name, media_type="application/octet-stream")

    @app.get(
        f"{API_PREFIX}/jobs/{{job_id}}/sensitivity",
        response_model=list[SensitivityRead],
        tags=["results"],
        summary="The job's sensitivity tables.",
        responses=ERROR_RESPONSES,
    )
    async def get_sensitivity(job_id: JobId, user: User) -> Response:
        return _json_list(st.get_sensitivities(job_id=job_id, owner=owner_of(user)))

    @app.get(
        f"{API_PREFIX}/jobs/{{job_id}}/events",
        response_model=list[JobEventRead],
        tags=["jobs"],
        summary="The job's event log, oldest first.",
        responses=ERROR_RESPONSES,
    )
    async def get_events(
        job_id: JobId,
        user: User,
        after: Annotated[
            int | None, Query(ge=0, le=2**62, description="Only events with a larger id.")
        ] = None,
        limit: Annotated[int, Query(ge=1, le=1000, description="Most events returned.")] = 500,
    ) -> Response:
        return _json_list(st.list_events(job_id=job_id, owner=owner_of(user), after=after, limit=limit))

    @app.post(
        f"{API_PREFIX}/jobs/{{job_id}}/resolve",
        response_model=ResolveRead,
        tags=["results"],
        summary="The best map under a new budget, from the stored sensitivities (no model run).",
        responses=_responses(409, 503),
    )
    def resolve(job_id: JobId, body: ResolveRequest, user: User) -> Response:
        st.get_job(job_id=job_id, owner=owner_of(user))
        if resolver is None:
            raise ServiceUnavailable("resolve is not available on this server (no allocator is installed)")
        space = st.get_space(job_id=job_id)
        if space is None:
            raise Conflict(
                "the job has no search space stored yet; resolve works once sensitivities are measured"
            )
        tables = st.get_sensitivity_tables(job_id=job_id)
        if body.methods is not None:
            wanted = {m.value for m in body.methods}
            tables = [t for t in tables if t.get("method") in wanted]
        if not tables:
            raise Conflict("the job has no sensitivity tables stored (for these methods) yet")
        budget = body.budget.model_dump(mode="json")
        try:
            out = resolver.resolve(
                space=space,
                sensitivities=tables,
                budget=budget,
                methods=None if body.methods is None else [m.value for m in body.methods],
            )
        except BitscoutError:
            raise
        except Exception as exc:
            raise _coded_error(exc) from exc
        try:
            cost = dict(out["cost"])
            cost.setdefault("size_mb", float(cost["size_bytes"]) / 1e6)
            result = ResolveRead.model_validate({**out, "cost": cost, "budget": budget})
        except Exception as exc:
            log.exception("the resolver returned a malformed answer")
            raise BitscoutError(ErrorCode.internal, "the resolver returned a malformed answer") from exc
        return _json(result)

    # ------------------------------------------------------------------ uploads

    @app.post(
        f"{API_PREFIX}/uploads",
        status_code=201,
        response_model=UploadRead,
        tags=["uploads"],
        summary="Upload a model archive or a data file (multipart).",
        description="Model archives (.zip, .tar, .tar.gz): safetensors weights, config and tokenizer "
        "files only. Data: .jsonl, .json, .csv, .tsv (UTF-8). `kind` is inferred from the file name "
        "when not given.",
        responses=_responses(413, 429),
    )
    def upload(
        user: User,
        file: Annotated[UploadFile, File(description="The file.")],
        kind: Annotated[
            UploadKind | None, Form(description="model or data (default: from the name).")
        ] = None,
    ) -> Response:
        upload_limit.hit(user.name)
        name = os.path.basename((file.filename or "").replace("\\", "/"))[:256] or "upload"
        if kind is None:
            guessed = infer_kind(name)
            if guessed is None:
                raise InvalidRequest(
                    "cannot tell the upload's kind from its name; send kind=model or kind=data", field="kind"
                )
            kind = UploadKind(guessed)
        blobs = st.blobs
        import hashlib

        digest = hashlib.sha256()
        size = 0
        with blobs.temp_file() as (tmp, fh):
            while True:
                chunk = file.file.read(1024 * 1024)
                if not chunk:
                    break
                size += len(chunk)
                if size > max_upload:
                    raise PayloadTooLarge(
                        f"the upload is over the limit of {settings.max_upload_mb:g} MB", field="file"
                    )
                digest.update(chunk)
                fh.write(chunk)
            fh.close()
            if size == 0:
                raise InvalidRequest("the upload is empty", field="file")
            if kind is UploadKind.model:
                meta = check_model_archive(
                    tmp,
                    max_files=settings.max_archive_files,
                    max_unpacked_bytes=int(settings.max_archive_unpacked_mb * 1e6),
                )
            else:
                meta = check_data_file(tmp, name)
            sha = digest.hexdigest()
            blobs.adopt(tmp, sha)
        rec = st.add_upload(owner=user.name, filename=name, kind=kind, sha256=sha, size=size, meta=meta)
        return _json(rec, 201)

    @app.get(
        f"{API_PREFIX}/uploads/{{upload_id}}",
        response_model=UploadRead,
        tags=["uploads"],
        summary="An upload's record.",
        responses=ERROR_RESPONSES,
    )
    async def get_upload(
        upload_id: Annotated[str, Path(min_length=1, max_length=64, description="The upload's id.")],
        user: User,
    ) -> Response:
        return _json(st.get_upload(upload_id=upload_id, owner=owner_of(user)))

    @app.get(f"{API_PREFIX}/version", tags=["health"], summary="Server and wire-schema versions.")
    async def version() -> dict[str, str]:
        return {"version": app.version, "schema_version": SCHEMA_VERSION, "db_revision": str(head)}

    from service.web import install_web

    install_web(app)
    _document_security(app, public={f"{API_PREFIX}/openapi.json", f"{API_PREFIX}/version"})
    return app


def _document_security(app: FastAPI, *, public: set[str]) -> None:
    """Declare the bearer scheme in the OpenAPI document for every API operation but ``public``.

    Authentication itself runs in the ``principal`` dependency (a plain function: FastAPI's
    security classes cost a noticeable share of a status poll).
    """
    build = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is not None:
            return app.openapi_schema
        doc = build()
        comps = doc.setdefault("components", {})
        comps.setdefault("securitySchemes", {})["bearer"] = {
            "type": "http",
            "scheme": "bearer",
            "description": "An API token from `bitscout token create` (or the config file `bitscout serve` writes).",
        }
        for path, ops in doc.get("paths", {}).items():
            if not path.startswith(API_PREFIX) or path in public:
                continue
            for op in ops.values():
                if isinstance(op, dict):
                    op["security"] = [{"bearer": []}]
        app.openapi_schema = doc
        return doc

    app.openapi = openapi  # type: ignore[method-assign]


def _coded_error(exc: Exception) -> BitscoutError:
    """Map an exception carrying a ``code`` (the search library's errors do) to a BitscoutError."""
    code = getattr(exc, "code", None)
    try:
        ec = ErrorCode(code) if code is not None else None
    except ValueError:
        ec = None
    if ec is None or HTTP_STATUS[ec] >= 500:
        log.exception("the resolver failed")
        return BitscoutError(ErrorCode.internal, "the resolver failed; the server log has the details")
    details: dict[str, Any] = {}
    smallest = getattr(exc, "smallest", None)
    if isinstance(smallest, int | float) and math.isfinite(smallest):
        details["smallest"] = smallest
    message = getattr(exc, "message", None) or str(exc)
    field = getattr(exc, "field", None)
    if isinstance(field, str) and not field.startswith("budget"):
        field = f"budget.{field}" if field.startswith("max_") else field
    return BitscoutError(ec, str(message), field if isinstance(field, str) else None, details or None)


def principal_from_headers(app: FastAPI, headers: Mapping[str, str]) -> Principal:
    """Authenticate outside a route (e.g. a websocket): raises ``Unauthorized``."""
    verifier: TokenVerifier = app.state.verifier
    return verifier.verify(headers.get("authorization"))


def app_from_env() -> FastAPI:
    """The app configured from the environment, for ``uvicorn --factory service.app:app_from_env``."""
    return create_app(Settings())
