"""Results: a job's Pareto front, one point, its sensitivity tables, and resolving a new budget.

``POST /jobs/{id}/resolve`` answers the best map under a new budget from the job's stored space
and sensitivity tables, without running the model, through the injected
:class:`~service.deps.Resolver` (503 ``unavailable`` without one; 409 while the job has no space
or no tables for the asked methods). A resolver's failure that the client caused (an exception
with a client-side ``code``, e.g. ``budget_infeasible`` with ``smallest``) answers that code;
any other is 500 ``internal`` with the details in the server log, never in the response.
"""

import logging
import math
from typing import Any

from fastapi import APIRouter
from fastapi.responses import Response

from bitscout.errors import HTTP_STATUS, BitscoutError, Conflict, ErrorCode, ServiceUnavailable
from bitscout.schemas import ParetoPointRead, ParetoRead, ResolveRead, ResolveRequest, SensitivityRead
from service.deps import CurrentUser, JobId, PointId, ResolverDep, StoreDep, owner_of
from service.errors import ERROR_RESPONSES, responses
from service.routes import API_PREFIX
from service.routes._render import json_list_response, json_response

log = logging.getLogger("bitscout.service")

router = APIRouter(prefix=API_PREFIX, tags=["results"])


@router.get(
    "/jobs/{job_id}/pareto",
    response_model=ParetoRead,
    summary="Every stored point of a job (front and uniform baselines).",
    responses=ERROR_RESPONSES,
)
async def get_pareto(job_id: JobId, user: CurrentUser, store: StoreDep) -> Response:
    return json_response(store.get_pareto(job_id=job_id, owner=owner_of(user)))


@router.get(
    "/jobs/{job_id}/points/{point_id}",
    response_model=ParetoPointRead,
    summary="One point with its precision map.",
    responses=ERROR_RESPONSES,
)
async def get_point(job_id: JobId, point_id: PointId, user: CurrentUser, store: StoreDep) -> Response:
    return json_response(store.get_point(job_id=job_id, point_id=point_id, owner=owner_of(user)))


@router.get(
    "/jobs/{job_id}/sensitivity",
    response_model=list[SensitivityRead],
    summary="The job's sensitivity tables.",
    responses=ERROR_RESPONSES,
)
async def get_sensitivity(job_id: JobId, user: CurrentUser, store: StoreDep) -> Response:
    return json_list_response(store.get_sensitivities(job_id=job_id, owner=owner_of(user)))


@router.post(
    "/jobs/{job_id}/resolve",
    response_model=ResolveRead,
    summary="The best map under a new budget, from the stored sensitivities (no model run).",
    responses=responses(409, 503),
)
def resolve(
    job_id: JobId, body: ResolveRequest, user: CurrentUser, store: StoreDep, resolver: ResolverDep
) -> Response:
    store.get_job(job_id=job_id, owner=owner_of(user))
    if resolver is None:
        raise ServiceUnavailable("resolve is not available on this server (no allocator is installed)")
    space = store.get_space(job_id=job_id)
    if space is None:
        raise Conflict(
            "the job has no search space stored yet; resolve works once sensitivities are measured"
        )
    tables = store.get_sensitivity_tables(job_id=job_id)
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
    return json_response(result)


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
