"""Jobs: submit a search, list and read jobs, cancel one, read its event log.

``POST /jobs`` checks what the server can check before anything is written (server-side paths
under their roots, uploads that exist, are the caller's and of the right kind), then the rate
limit, then writes the ``queued`` job in one transaction (:meth:`~service.store.Store.create_job`:
an ``idempotency_key`` reused with the same spec returns the first job). Users see their own jobs
only (another user's is 404); admins see every job.
"""

from typing import Annotated

from fastapi import APIRouter, Query
from fastapi.responses import Response

from bitscout.errors import InvalidRequest, NotFound
from bitscout.schemas import JobCreate, JobEventRead, JobList, JobRead, JobStatus, UploadKind
from service.deps import CurrentUser, JobId, PageDep, SettingsDep, StoreDep, SubmitLimit, owner_of
from service.errors import ERROR_RESPONSES, responses
from service.routes import API_PREFIX
from service.routes._render import json_list_response, json_response
from service.settings import Settings
from service.store import Principal, Store
from service.uploads import resolve_under

router = APIRouter(prefix=API_PREFIX, tags=["jobs"])


def _check_sources(body: JobCreate, user: Principal, store: Store, settings: Settings) -> None:
    m, d = body.model, body.data
    if m.path is not None:
        p = resolve_under(settings.model_root, m.path, what="model", field="model.path")
        if not p.is_dir():
            raise InvalidRequest("model.path must be a model directory", field="model.path")
    if m.upload_id is not None:
        _check_upload(m.upload_id, UploadKind.model, user, store, "model.upload_id")
    if d.path is not None:
        p = resolve_under(settings.data_root, d.path, what="data", field="data.path")
        if not p.is_file():
            raise InvalidRequest("data.path must be a file", field="data.path")
    if d.upload_id is not None:
        _check_upload(d.upload_id, UploadKind.data, user, store, "data.upload_id")


def _check_upload(upload_id: str, kind: UploadKind, user: Principal, store: Store, field: str) -> None:
    try:
        up = store.get_upload(upload_id=upload_id, owner=owner_of(user))
    except NotFound:
        raise InvalidRequest(f"no upload {upload_id!r}", field=field) from None
    if up.kind != kind:
        raise InvalidRequest(f"upload {upload_id} is a {up.kind.value} upload, not {kind.value}", field=field)


@router.post(
    "/jobs",
    status_code=201,
    response_model=JobRead,
    summary="Submit a search.",
    description="Writes the job (status `queued`) and returns it. Resubmitting with the same "
    "`idempotency_key` returns the first job (409 if the spec differs).",
    responses=responses(409, 413, 429),
)
def submit_job(
    body: JobCreate, user: CurrentUser, store: StoreDep, settings: SettingsDep, limit: SubmitLimit
) -> Response:
    _check_sources(body, user, store, settings)
    limit.hit(user.name)
    job = store.create_job(
        owner=user.name,
        spec=body.spec(),
        idempotency_key=body.idempotency_key,
        max_active=settings.max_active_jobs_per_user,
    )
    return json_response(job, 201)


@router.get(
    "/jobs",
    response_model=JobList,
    summary="List jobs, newest first.",
    responses=ERROR_RESPONSES,
)
async def list_jobs(
    user: CurrentUser,
    store: StoreDep,
    page: PageDep,
    status: Annotated[JobStatus | None, Query(description="Only jobs in this status.")] = None,
) -> Response:
    return json_response(
        store.list_jobs(owner=owner_of(user), status=status, limit=page.limit, offset=page.offset)
    )


@router.get(
    "/jobs/{job_id}",
    response_model=JobRead,
    summary="A job's status and progress.",
    responses=ERROR_RESPONSES,
)
async def get_job(job_id: JobId, user: CurrentUser, store: StoreDep) -> Response:
    return json_response(store.get_job(job_id=job_id, owner=owner_of(user)))


@router.post(
    "/jobs/{job_id}/cancel",
    response_model=JobRead,
    summary="Cancel a job.",
    description="A queued job is canceled at once; a running one gets `cancel_requested` and "
    "stops within seconds. 409 when it already succeeded or failed.",
    responses=responses(409),
)
def cancel_job(job_id: JobId, user: CurrentUser, store: StoreDep) -> Response:
    return json_response(store.request_cancel(job_id=job_id, owner=owner_of(user)))


@router.get(
    "/jobs/{job_id}/events",
    response_model=list[JobEventRead],
    summary="The job's event log, oldest first.",
    responses=ERROR_RESPONSES,
)
async def get_events(
    job_id: JobId,
    user: CurrentUser,
    store: StoreDep,
    after: Annotated[int | None, Query(ge=0, le=2**62, description="Only events with a larger id.")] = None,
    limit: Annotated[int, Query(ge=1, le=1000, description="Most events returned.")] = 500,
) -> Response:
    return json_list_response(
        store.list_events(job_id=job_id, owner=owner_of(user), after=after, limit=limit)
    )
