"""Uploads: model archives and data files users send, recorded once their content is stored.

:class:`UploadsMixin` owns the ``uploads`` table. A record is written only after its content is in
the file store under its checksum (``add_upload`` refuses otherwise), and an upload is visible to
its owner only (another user's is ``NotFound``). Checking what an upload contains is not the
store's job: :mod:`service.uploads` does it before the content is adopted.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any, BinaryIO

from bitscout.errors import BitscoutError, ErrorCode, NotFound
from bitscout.schemas import UploadKind, UploadRead
from service.models import UploadRow, utcnow
from service.store._base import StoreBase
from service.store._json import json_safe


class UploadsMixin(StoreBase):
    """Users' uploads (see the module docstring)."""

    def add_upload(
        self,
        *,
        owner: str,
        filename: str,
        kind: UploadKind | str,
        sha256: str,
        size: int,
        meta: Mapping[str, Any] | None = None,
    ) -> UploadRead:
        """Record an upload whose content is already in the file store under ``sha256``."""
        if not self.blobs.exists(sha256):
            raise BitscoutError(ErrorCode.internal, "upload content missing from the file store")
        row = UploadRow(
            id=uuid.uuid4().hex,
            owner=owner,
            filename=os.path.basename(filename)[:256] or "upload",
            kind=UploadKind(kind).value,
            size=int(size),
            sha256=sha256,
            meta=json_safe(dict(meta)) if meta else None,
            created_at=utcnow(),
        )
        with self._write() as s:
            s.add(row)
        return self._upload_read(row)

    def put_upload(
        self,
        *,
        owner: str,
        filename: str,
        kind: UploadKind | str,
        source: bytes | BinaryIO | str | os.PathLike[str],
    ) -> UploadRead:
        """Store ``source`` (bytes, a binary stream or a file path) and record it as an upload."""
        if isinstance(source, bytes | bytearray):
            sha, size = self.blobs.put_bytes(bytes(source))
        elif isinstance(source, str | os.PathLike):
            sha, size = self.blobs.put_file(source)
        else:
            sha, size = self.blobs.put_stream(source)
        return self.add_upload(owner=owner, filename=filename, kind=kind, sha256=sha, size=size)

    @staticmethod
    def _upload_read(row: UploadRow) -> UploadRead:
        return UploadRead(
            id=row.id,
            filename=row.filename,
            size=row.size,
            sha256=row.sha256,
            kind=UploadKind(row.kind),
            created_at=row.created_at,
        )

    def get_upload(self, *, upload_id: str, owner: str | None = None) -> UploadRead:
        """The upload; with ``owner``, only that user's. Raises ``NotFound``."""
        with self._read() as s:
            row = s.get(UploadRow, upload_id)
            if row is None or (owner is not None and row.owner != owner):
                raise NotFound(f"no upload {upload_id!r}", field="upload_id")
            return self._upload_read(row)

    def upload_path(self, *, upload_id: str) -> Path:
        """Where an upload's content lies in the file store (for the workers). Raises ``NotFound``."""
        up = self.get_upload(upload_id=upload_id)
        path = self.blobs.path(up.sha256)
        if not path.is_file():
            raise NotFound(f"the content of upload {upload_id} is missing", field="upload_id")
        return path
