"""Health, readiness, metrics and versions: what operators and load balancers ask.

``/healthz`` answers as long as the process runs; ``/readyz`` only when the database is reachable
and its schema is at the migrations' head (503 ``unavailable`` otherwise, the message saying
why); ``/api/v1/version`` (:data:`api_router`, public) the server's, the wire schema's and the
migrations' versions. None of these needs a token. ``/metrics`` is the Prometheus scrape
(:data:`metrics_router`, included only when metrics are on), for an admin token or the scraper's
``Settings.metrics_token`` only (401 without a token, 403 for a user's token): it tells how many
jobs there are and which routes are called.
"""

import logging

from fastapi import APIRouter, Request
from fastapi.responses import Response

from bitscout.errors import ErrorBody, ServiceUnavailable
from bitscout.schemas import SCHEMA_VERSION
from service import db
from service.deps import MetricsDep, MetricsScraper, SchemaHead, StoreDep
from service.routes import API_PREFIX

log = logging.getLogger("bitscout.service")

router = APIRouter(tags=["health"])
metrics_router = APIRouter()
api_router = APIRouter(prefix=API_PREFIX, tags=["health"])


@router.get("/healthz", summary="The process is up.")
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


@router.get(
    "/readyz",
    summary="The database is reachable and its schema at head.",
    responses={503: {"model": ErrorBody, "description": "Not ready."}},
)
def readyz(store: StoreDep, head: SchemaHead) -> dict[str, str]:
    try:
        store.ping()
        current = db.current_revision(store.engine)
    except Exception as exc:  # noqa: BLE001 - any database failure means not ready
        log.warning("readiness check failed: %s", exc)
        raise ServiceUnavailable("the database is unreachable") from None
    if current != head:
        raise ServiceUnavailable(f"the database schema is at {current}, not {head}: {db.UPGRADE_HINT}")
    return {"status": "ready", "schema": str(current)}


@metrics_router.get("/metrics", include_in_schema=False, dependencies=[MetricsScraper])
def metrics(registry: MetricsDep) -> Response:
    from prometheus_client import CONTENT_TYPE_LATEST

    assert registry is not None  # noqa: S101 - the router is only included with metrics on
    return Response(registry.render(), media_type=CONTENT_TYPE_LATEST)


@api_router.get("/version", summary="Server and wire-schema versions.")
async def version(request: Request, head: SchemaHead) -> dict[str, str]:
    return {"version": request.app.version, "schema_version": SCHEMA_VERSION, "db_revision": str(head)}
