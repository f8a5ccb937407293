"""The routes' dependencies, as ``Annotated`` types: what a route needs is in its signature.

``create_app`` puts the app's collaborators on ``app.state`` once (``settings``, ``store``,
``resolver``, ``verifier``, ``submit_limit``, ``upload_limit``, ``metrics``, ``schema_head``);
the dependencies here hand them to the routes. Every dependency is an ``async def`` that does no
I/O of its own, so none costs a thread hop; the one that may touch the database,
:func:`principal`, answers from the token cache on the event loop and goes to a thread only on a
miss.

* :data:`CurrentUser` — the authenticated :class:`~service.store.Principal` (401 otherwise);
  :func:`owner_of` is the owner filter its requests see (admins see every job);
  :data:`MetricsScraper` — only an admin token or ``Settings.metrics_token`` may read ``/metrics``.
* :data:`StoreDep`, :data:`SettingsDep`, :data:`ResolverDep` (None when the server has no
  allocator), :data:`SubmitLimit`, :data:`UploadLimit`, :data:`MetricsDep`, :data:`SchemaHead`.
* :data:`JobId`, :data:`PointId`, :data:`UploadId` — path parameters with their bounds (a string
  parameter holds only text the database can store: :func:`storable_text`); :data:`PageDep` —
  ``limit`` / ``offset`` of the job list.
* :class:`Resolver` — the protocol of the allocator behind ``POST /jobs/{id}/resolve`` (the workers
  package implements it; the service never imports the search library).
"""

import hmac
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Annotated, Any, Protocol, runtime_checkable

from fastapi import Depends, FastAPI, Path, Query, Request
from pydantic import AfterValidator
from starlette.concurrency import run_in_threadpool

from bitscout.errors import Forbidden
from bitscout.rules import text_problem
from service.metrics import Metrics
from service.security import RateLimiter, TokenVerifier
from service.settings import Settings
from service.store import Principal, Store

__all__ = [
    "MAX_PAGE",
    "CurrentUser",
    "JobId",
    "MetricsDep",
    "MetricsScraper",
    "Page",
    "PageDep",
    "PointId",
    "Resolver",
    "ResolverDep",
    "SchemaHead",
    "SettingsDep",
    "StoreDep",
    "SubmitLimit",
    "UploadId",
    "UploadLimit",
    "owner_of",
    "principal",
    "metrics_scraper",
    "principal_from_headers",
    "storable_text",
]

#: The largest page of jobs one request may ask for.
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


# --------------------------------------------------------------------------- the app's collaborators


async def get_store(request: Request) -> Store:
    store: Store = request.app.state.store
    return store


async def get_settings(request: Request) -> Settings:
    settings: Settings = request.app.state.settings
    return settings


async def get_resolver(request: Request) -> Resolver | None:
    resolver: Resolver | None = request.app.state.resolver
    return resolver


async def get_submit_limit(request: Request) -> RateLimiter:
    limiter: RateLimiter = request.app.state.submit_limit
    return limiter


async def get_upload_limit(request: Request) -> RateLimiter:
    limiter: RateLimiter = request.app.state.upload_limit
    return limiter


async def get_metrics(request: Request) -> Metrics | None:
    metrics: Metrics | None = request.app.state.metrics
    return metrics


async def get_schema_head(request: Request) -> str | None:
    head: str | None = request.app.state.schema_head
    return head


StoreDep = Annotated[Store, Depends(get_store)]
SettingsDep = Annotated[Settings, Depends(get_settings)]
ResolverDep = Annotated[Resolver | None, Depends(get_resolver)]
SubmitLimit = Annotated[RateLimiter, Depends(get_submit_limit)]
UploadLimit = Annotated[RateLimiter, Depends(get_upload_limit)]
MetricsDep = Annotated[Metrics | None, Depends(get_metrics)]
SchemaHead = Annotated[str | None, Depends(get_schema_head)]


# --------------------------------------------------------------------------- who is asking


async def principal(request: Request) -> Principal:
    """The request's principal from its bearer token; raises ``Unauthorized``.

    A plain function rather than FastAPI's security classes (they cost a noticeable share of a
    status poll); the bearer scheme is declared in the OpenAPI document by ``create_app``.
    """
    verifier: TokenVerifier = request.app.state.verifier
    header = request.headers.get("authorization")
    hit = verifier.cached(header)
    if hit is not None:
        return hit
    return await run_in_threadpool(verifier.verify, header)


CurrentUser = Annotated[Principal, Depends(principal)]


def owner_of(user: Principal) -> str | None:
    """Admins see every job; other users only their own."""
    return None if user.admin else user.name


async def metrics_scraper(request: Request) -> None:
    """Who may read ``/metrics``: a bearer of ``Settings.metrics_token`` or of an admin API token;
    raises ``Unauthorized`` without a valid token, ``Forbidden`` for another user's token."""
    settings: Settings = request.app.state.settings
    header = request.headers.get("authorization") or ""
    if settings.metrics_token is not None:
        scheme, _, secret = header.partition(" ")
        given = secret.strip().encode("utf-8", "surrogateescape")
        expected = settings.metrics_token.get_secret_value().encode()
        if scheme.lower() == "bearer" and hmac.compare_digest(given, expected):
            return
    user = await principal(request)
    if not user.admin:
        raise Forbidden("the metrics are for admins and the metrics scraper (Settings.metrics_token)")


MetricsScraper = Depends(metrics_scraper)


def principal_from_headers(app: FastAPI, headers: Mapping[str, str]) -> Principal:
    """Authenticate outside a route (e.g. a websocket): raises ``Unauthorized``."""
    verifier: TokenVerifier = app.state.verifier
    return verifier.verify(headers.get("authorization"))


# --------------------------------------------------------------------------- parameters


def storable_text(value: Any) -> Any:
    """A string parameter the database can be asked about (:func:`bitscout.rules.text_problem`:
    no NUL character, no lone surrogate); a 422 naming the parameter otherwise."""
    if isinstance(value, str) and (problem := text_problem(value)) is not None:
        raise ValueError(problem)
    return value


JobId = Annotated[str, Path(min_length=1, max_length=64, description="The job's id."), AfterValidator(storable_text)]
PointId = Annotated[int, Path(ge=0, le=1_000_000, description="The point's id within the job.")]
UploadId = Annotated[
    str, Path(min_length=1, max_length=64, description="The upload's id."), AfterValidator(storable_text)
]


@dataclass(frozen=True)
class Page:
    """One page of a list: at most ``limit`` items after the first ``offset``."""

    limit: int
    offset: int


async def page(
    limit: Annotated[int, Query(ge=1, le=MAX_PAGE, description="Page size.")] = 50,
    offset: Annotated[int, Query(ge=0, le=10_000_000, description="Jobs to skip.")] = 0,
) -> Page:
    return Page(limit=limit, offset=offset)


PageDep = Annotated[Page, Depends(page)]
