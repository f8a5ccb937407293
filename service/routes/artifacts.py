"""Artifacts: downloading a point's exported model, in the format asked for.

``GET /jobs/{id}/points/{point}/artifact?format=F`` (``F`` one of :data:`bitscout.formats.EXPORT_FORMATS`,
default ``native``) streams the artifact from the file store as ``application/octet-stream`` under
its stored name when the point is stored in that format. Otherwise the service records the export
(:meth:`service.store.Store.artifact_or_export`) and answers **202** with ``Retry-After`` and an
:class:`~bitscout.schemas.ExportRead` body; the workers export the point and store it, and a later
request streams it. A failed export answers its stored error (its code's status), an unknown format
422 ``invalid_request`` with field ``format``, another user's job or a missing point 404.
"""

import math
from typing import Annotated

from fastapi import APIRouter, Query
from fastapi.responses import FileResponse, JSONResponse, Response
from pydantic import AfterValidator

from bitscout.formats import DEFAULT_EXPORT_FORMAT, EXPORT_FORMATS
from bitscout.schemas import ExportRead
from service.deps import CurrentUser, JobId, PointId, StoreDep, owner_of, storable_text
from service.errors import ERROR_RESPONSES
from service.routes import API_PREFIX

router = APIRouter(prefix=API_PREFIX, tags=["results"])

FormatQuery = Annotated[
    str,
    Query(max_length=64, description=f"The checkpoint format: {', '.join(EXPORT_FORMATS)}."),
    AfterValidator(storable_text),
]


@router.get(
    "/jobs/{job_id}/points/{point_id}/artifact",
    summary="Download a point's exported model (202 while it is being exported).",
    response_class=FileResponse,
    responses={
        **ERROR_RESPONSES,
        200: {"content": {"application/octet-stream": {}}, "description": "The artifact."},
        202: {
            "model": ExportRead,
            "description": "The point is not stored in this format yet: it is being exported. Ask again after "
            "Retry-After seconds.",
            "headers": {"Retry-After": {"description": "Seconds to wait.", "schema": {"type": "integer"}}},
        },
    },
)
def get_artifact(
    job_id: JobId, point_id: PointId, user: CurrentUser, store: StoreDep, format: FormatQuery = DEFAULT_EXPORT_FORMAT
) -> Response:
    found = store.artifact_or_export(job_id=job_id, point_id=point_id, format=format, owner=owner_of(user))
    if isinstance(found, ExportRead):
        wait = max(1, math.ceil(found.retry_after_s or 1))
        return JSONResponse(found.model_dump(mode="json"), status_code=202, headers={"Retry-After": str(wait)})
    path, name, _size = found
    return FileResponse(path, filename=name, media_type="application/octet-stream")
