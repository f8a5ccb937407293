"""Artifacts: downloading a point's exported model.

``GET /jobs/{id}/points/{point}/artifact`` streams the file from the file store as
``application/octet-stream`` under its stored name; 404 when the point has none (or the job is
another user's).
"""

from fastapi import APIRouter
from fastapi.responses import FileResponse

from service.deps import CurrentUser, JobId, PointId, StoreDep, owner_of
from service.errors import ERROR_RESPONSES
from service.routes import API_PREFIX

router = APIRouter(prefix=API_PREFIX, tags=["results"])


@router.get(
    "/jobs/{job_id}/points/{point_id}/artifact",
    summary="Download a point's exported model.",
    response_class=FileResponse,
    responses={
        **ERROR_RESPONSES,
        200: {"content": {"application/octet-stream": {}}, "description": "The artifact."},
    },
)
def get_artifact(job_id: JobId, point_id: PointId, user: CurrentUser, store: StoreDep) -> FileResponse:
    path, name, _size = store.get_artifact(job_id=job_id, point_id=point_id, owner=owner_of(user))
    return FileResponse(path, filename=name, media_type="application/octet-stream")
