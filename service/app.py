"""The FastAPI application: REST API under ``/api/v1``, health, metrics and the web status page.

``create_app(settings, resolver=...)`` builds it and does nothing else than composing the parts:

* the app's collaborators on ``app.state`` (settings, store, resolver, token verifier, rate
  limiters, metrics, the migrations' head), which :mod:`service.deps` hands to the routes;
* the exception handlers of :mod:`service.errors` and the middleware of :mod:`service.middleware`;
* the redaction of tokens from the access log (:mod:`service.logs`);
* one router per resource from :mod:`service.routes` (the API's own paths start with :data:`API_PREFIX`);
* the bearer scheme in the OpenAPI document.

The service never imports the search library: ``POST /jobs/{id}/resolve`` calls a
:class:`Resolver` that the workers package injects (without one it answers ``unavailable``).
Routes never commit: every change goes through one :class:`~service.store.Store` method, which
owns its transaction. Every error response has the body :class:`bitscout.errors.ErrorBody`; a
request that fails validation gets 422 with code ``invalid_request`` and ``field`` set to the
dotted path of the offending input. No stack trace ever reaches a client.
"""

import inspect
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI

import bitscout
from bitscout.schemas import SCHEMA_VERSION
from service import db
from service.deps import MAX_PAGE, Resolver, principal_from_headers
from service.errors import ERROR_RESPONSES, install_error_handlers
from service.logs import install_access_log_redaction
from service.metrics import Metrics
from service.middleware import BodyLimitMiddleware, MetricsMiddleware, install_middleware
from service.routes import API_PREFIX, artifacts, health, jobs, results, uploads
from service.routes.web import install_web
from service.security import RateLimiter, TokenVerifier
from service.settings import Settings
from service.store import Store

__all__ = [
    "API_PREFIX",
    "ERROR_RESPONSES",
    "MAX_PAGE",
    "BodyLimitMiddleware",
    "MetricsMiddleware",
    "Resolver",
    "app_from_env",
    "create_app",
    "principal_from_headers",
]


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
    metrics = Metrics(st) if settings.metrics else None
    app.state.settings = settings
    app.state.store = st
    app.state.resolver = resolver
    app.state.verifier = TokenVerifier(st, ttl_s=settings.token_cache_s)
    app.state.submit_limit = RateLimiter(
        per_min=settings.submit_rate_per_min, burst=settings.submit_burst, what="job submissions"
    )
    app.state.upload_limit = RateLimiter(
        per_min=settings.upload_rate_per_min, burst=settings.upload_burst, what="uploads"
    )
    app.state.metrics = metrics
    app.state.schema_head = db.head_revision()

    install_error_handlers(app)
    install_middleware(app, settings, metrics)
    install_access_log_redaction()
    app.include_router(health.router)
    if metrics is not None:
        app.include_router(health.metrics_router)
    for router in (jobs.router, results.router, artifacts.router, uploads.router, health.api_router):
        app.include_router(router)
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


def app_from_env() -> FastAPI:
    """The app configured from the environment, for ``uvicorn --factory service.app:app_from_env``."""
    return create_app(Settings())
