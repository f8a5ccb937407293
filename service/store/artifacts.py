"""Artifacts: a point's exported model, kept in the file store and referenced by its point row.

:class:`ArtifactsMixin` puts content into the content-addressed file store first (stored once per
checksum) and only then references it from the point, in a transaction of its own
(``put_artifact``) or in the result's (``finish_job`` through :meth:`ArtifactsMixin._put_blob`), so
a point never refers to missing content. ``get_artifact`` hands out a path only when the content
is really there.
"""

from __future__ import annotations

import os
from pathlib import Path

from bitscout.errors import NotFound
from service.models import JobRow, PointRow
from service.store._base import StoreBase


class ArtifactsMixin(StoreBase):
    """Points' exported models (see the module docstring for the guarantees)."""

    def put_artifact(
        self,
        *,
        job_id: str,
        point_id: int,
        path_or_bytes: str | os.PathLike[str] | bytes,
        filename: str | None = None,
    ) -> str:
        """Store an exported model for a point in the file store; returns its SHA-256.

        ``path_or_bytes``: a file, a directory (stored as a .tar.gz of its regular files) or bytes.
        Storing again replaces the reference (the content is stored once per checksum).
        Raises ``NotFound`` when the job or the point does not exist.
        """
        sha, size, name = self._put_blob(job_id, point_id, path_or_bytes, filename)
        with self._write() as s:
            row = s.get(PointRow, (job_id, point_id))
            if row is None:
                raise NotFound(f"job {job_id} has no point {point_id}", field="point_id")
            row.artifact_sha256 = sha
            row.artifact_size = size
            row.artifact_name = name
            self._event(
                s,
                job_id,
                "artifact",
                message=f"artifact of point {point_id} stored",
                data={"point": point_id},
            )
        return sha

    def _put_blob(
        self, job_id: str, point_id: int, path_or_bytes: str | os.PathLike[str] | bytes, filename: str | None
    ) -> tuple[str, int, str]:
        """``(sha256, size, file name)`` of an artifact put into the file store (no database write)."""
        if isinstance(path_or_bytes, bytes | bytearray):
            sha, size = self.blobs.put_bytes(bytes(path_or_bytes))
            name = filename or f"job-{job_id}-point-{point_id}.bin"
        else:
            p = Path(path_or_bytes)
            if p.is_dir():
                sha, size = self.blobs.put_dir(p)
                name = filename or f"job-{job_id}-point-{point_id}.tar.gz"
            elif p.is_file():
                sha, size = self.blobs.put_file(p)
                name = filename or p.name
            else:
                raise NotFound(f"no file or directory {str(p)!r}", field="path_or_bytes")
        return sha, size, os.path.basename(name)[:256]

    def get_artifact(self, *, job_id: str, point_id: int, owner: str | None = None) -> tuple[Path, str, int]:
        """``(path, filename, size)`` of a point's artifact. Raises ``NotFound`` when none is stored."""
        with self._read() as s:
            job = s.get(JobRow, job_id)
            if job is None or (owner is not None and job.owner != owner):
                raise NotFound(f"no job {job_id!r}", field="job_id")
            row = s.get(PointRow, (job_id, point_id))
            if row is None:
                raise NotFound(f"job {job_id} has no point {point_id}", field="point_id")
            if row.artifact_sha256 is None:
                raise NotFound(f"point {point_id} of job {job_id} has not been exported", field="point_id")
            path = self.blobs.path(row.artifact_sha256)
            if not path.is_file():
                raise NotFound(
                    f"the artifact of point {point_id} is missing from the file store", field="point_id"
                )
            return path, row.artifact_name or f"point-{point_id}", int(row.artifact_size or 0)
