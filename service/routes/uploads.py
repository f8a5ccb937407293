"""Uploads: model archives and data files sent as multipart, checked before they are kept.

``POST /uploads`` streams the file into a temporary file of the file store (413 as soon as it is
over ``Settings.max_upload_mb``), refuses an empty one, checks it (:mod:`service.uploads`: archive
members, sizes and kinds; data file formats), and only then adopts it under its checksum and
records it. A refused upload leaves nothing behind. The file's name must be storable text
(:func:`bitscout.rules.text_problem`), like every string that reaches the database. ``kind`` is
inferred from the file name when not given. Uploads are rate limited per user; a user sees only
their own (an admin every one).
"""

import hashlib
import os
from typing import Annotated

from fastapi import APIRouter, File, Form, UploadFile
from fastapi.responses import Response

from bitscout.errors import InvalidRequest, PayloadTooLarge
from bitscout.rules import text_problem
from bitscout.schemas import UploadKind, UploadRead
from service.deps import CurrentUser, SettingsDep, StoreDep, UploadId, UploadLimit, owner_of
from service.errors import ERROR_RESPONSES, responses
from service.routes import API_PREFIX
from service.routes._render import json_response
from service.uploads import check_data_file, check_latency_table_file, check_model_archive, infer_kind

router = APIRouter(prefix=API_PREFIX, tags=["uploads"])


@router.post(
    "/uploads",
    status_code=201,
    response_model=UploadRead,
    summary="Upload a model archive, a data file or a latency table (multipart).",
    description="Model archives (.zip, .tar, .tar.gz): safetensors weights, config and tokenizer "
    "files only. Data: .jsonl, .json, .csv, .tsv (UTF-8). Latency tables (kind=latency_table): the JSON "
    "`bitscout profile` writes, named by a job's budget.latency_table. `kind` is inferred from the file "
    "name when not given (model or data).",
    responses=responses(413, 429),
)
def upload(
    user: CurrentUser,
    store: StoreDep,
    settings: SettingsDep,
    limit: UploadLimit,
    file: Annotated[UploadFile, File(description="The file.")],
    kind: Annotated[
        UploadKind | None, Form(description="model, data or latency_table (default: model or data, from the name).")
    ] = None,
) -> Response:
    limit.hit(user.name)
    max_upload = int(settings.max_upload_mb * 1e6)
    name = os.path.basename((file.filename or "").replace("\\", "/"))[:256] or "upload"
    problem = text_problem(name)
    if problem is not None:
        raise InvalidRequest(f"the file's name {problem}", field="file")
    if kind is None:
        guessed = infer_kind(name)
        if guessed is None:
            raise InvalidRequest(
                "cannot tell the upload's kind from its name; send kind=model or kind=data", field="kind"
            )
        kind = UploadKind(guessed)
    blobs = store.blobs
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
        elif kind is UploadKind.latency_table:
            meta = check_latency_table_file(tmp)
        else:
            meta = check_data_file(tmp, name)
        sha = digest.hexdigest()
        blobs.adopt(tmp, sha)
    rec = store.add_upload(owner=user.name, filename=name, kind=kind, sha256=sha, size=size, meta=meta)
    return json_response(rec, 201)


@router.get(
    "/uploads/{upload_id}",
    response_model=UploadRead,
    summary="An upload's record.",
    responses=ERROR_RESPONSES,
)
async def get_upload(upload_id: UploadId, user: CurrentUser, store: StoreDep) -> Response:
    return json_response(store.get_upload(upload_id=upload_id, owner=owner_of(user)))
