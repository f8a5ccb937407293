"""Exports: a point's artifact in a format it is not stored in yet, recorded before any worker runs it.

:meth:`ExportsMixin.artifact_or_export` is the download's one decision. A point's artifact in the
format asked for is served when it is stored: the native artifact a refined point carries on its row
(its learned step sizes exist nowhere else), or an export stored before. Otherwise an export row
(job, point, format) is written in ``pending`` and its :class:`~bitscout.schemas.ExportRead` returned:
the API answers 202 and the workers' dispatcher runs it. A refined point's other formats are written
from its stored native artifact (its learned step sizes and refined weights, never the unrefined
model's: :mod:`workers.exporter`); a refined point whose artifact was never stored has none.

Export life cycle (one row per job, point and format)::

    artifact_or_export -> pending --claim_next_export--> running --finish_export--> succeeded
                            ^                               |   \\--fail_export----> failed
                            +------ requeue_exports --------+   (past max_attempts: failed)

Claims are atomic like the jobs' (PostgreSQL ``FOR UPDATE SKIP LOCKED``; SQLite ``BEGIN IMMEDIATE``
plus an UPDATE conditional on ``state = 'pending'``), every claim carries a claim id unique to that
start, and ``finish_export`` / ``fail_export`` change a row only while it is ``running`` under the
caller's claim (else :class:`~service.store.records.ExportNotOwned`): a worker taken for lost whose
export was claimed again can never store a second result. The artifact's content goes into the file
store before the row refers to it. A failed export stays failed: the download answers its error.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from datetime import timedelta
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy import select, update
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.orm import Session

from bitscout.errors import BitscoutError, ErrorCode, InvalidRequest, NotFound
from bitscout.formats import NATIVE, parse_export_format
from bitscout.schemas import ExportRead, ExportState
from service.models import ExportRow, JobRow, PointRow, utcnow
from service.store._json import storable
from service.store.artifacts import ArtifactsMixin
from service.store.records import ExportNotOwned, ExportTask

#: Seconds a download is told to wait (``Retry-After``) while its export is pending or running.
EXPORT_RETRY_AFTER_S = 2.0

#: A stored artifact: ``(path in the file store, file name, size in bytes)``.
ArtifactFile = tuple[Path, str, int]


def _format(value: str) -> str:
    try:
        return parse_export_format(value)
    except ValueError as exc:
        raise InvalidRequest(str(exc), field="format") from None


class ExportsMixin(ArtifactsMixin):
    """Points' artifacts in every format (see the module docstring for the guarantees)."""

    # ------------------------------------------------------------------ the download's decision

    def artifact_or_export(
        self, *, job_id: str, point_id: int, format: str = NATIVE, owner: str | None = None
    ) -> ArtifactFile | ExportRead:
        """The stored artifact of a point in ``format``, or the export that will store it.

        Returns ``(path, file name, size)`` when the artifact is stored; otherwise records an export
        request (once: asking again returns the same row) and returns its :class:`ExportRead`
        (``pending`` or ``running``, with ``retry_after_s``). Raises ``InvalidRequest`` (field
        ``format``) for an unknown format, ``NotFound`` for no such job or point (or another user's
        job) and for a refined point whose artifact was never stored (in any format), and the stored
        error (its code, message and field) of a failed export.
        """
        fmt = _format(format)
        with self._read() as s:
            point = self._point_of(s, job_id, point_id, owner)
            if fmt == NATIVE and point.artifact_sha256 is not None:
                return self._stored(point.artifact_sha256, point.artifact_name, point.artifact_size, point_id)
            if point.refined and point.artifact_sha256 is None:
                raise NotFound(
                    f"the refined weights of point {point_id} of job {job_id} were not stored (see the job's "
                    f"events); download point {point.refined_from} for its unrefined map",
                    field="point_id",
                )
            row = s.get(ExportRow, (job_id, point_id, fmt))
            if row is not None and row.state == ExportState.succeeded.value and row.artifact_sha256:
                if self.blobs.path(row.artifact_sha256).is_file():
                    return self._stored(row.artifact_sha256, row.artifact_name, row.artifact_size, point_id)
            elif row is not None and row.state == ExportState.failed.value:
                raise self._failure(row)
            elif row is not None:
                return self._export_read(row)
        return self._request_export(job_id, point_id, fmt)

    def _point_of(self, s: Session, job_id: str, point_id: int, owner: str | None) -> PointRow:
        job = s.get(JobRow, job_id)
        if job is None or (owner is not None and job.owner != owner):
            raise NotFound(f"no job {job_id!r}", field="job_id")
        point = s.get(PointRow, (job_id, point_id))
        if point is None:
            raise NotFound(f"job {job_id} has no point {point_id}", field="point_id")
        return point

    def _stored(self, sha: str, name: str | None, size: int | None, point_id: int) -> ArtifactFile:
        path = self.blobs.path(sha)
        if not path.is_file():
            raise NotFound(f"the artifact of point {point_id} is missing from the file store", field="point_id")
        return path, name or f"point-{point_id}", int(size or 0)

    def _request_export(self, job_id: str, point_id: int, fmt: str) -> ExportRead:
        """Write the pending row (or put back to pending one whose content left the file store)."""
        with self._write() as s:
            now = utcnow()
            row = s.get(ExportRow, (job_id, point_id, fmt), with_for_update=self.dialect == "postgresql")
            if row is None:
                values = {"job_id": job_id, "point_idx": point_id, "format": fmt, "state": ExportState.pending.value,
                          "attempts": 0, "created_at": now, "updated_at": now}  # fmt: skip
                insert = pg_insert if self.dialect == "postgresql" else sqlite_insert
                stmt = insert(ExportRow).values(**values).on_conflict_do_nothing().returning(ExportRow.job_id)
                if s.execute(stmt).first() is not None:  # this request wrote the row
                    self._event(s, job_id, "export_requested", message=f"point {point_id} asked for as {fmt}",
                                data={"point": point_id, "format": fmt})  # fmt: skip
                row = s.get(ExportRow, (job_id, point_id, fmt), populate_existing=True)
                assert row is not None  # noqa: S101
            elif row.state == ExportState.succeeded.value and not (
                row.artifact_sha256 and self.blobs.path(row.artifact_sha256).is_file()
            ):
                row.state, row.claimed_by, row.updated_at = ExportState.pending.value, None, now
                row.artifact_sha256 = row.artifact_size = row.artifact_name = None
                self._event(s, job_id, "export_requested", message=f"point {point_id} as {fmt}: the stored "
                            "artifact is missing from the file store; exporting it again",
                            data={"point": point_id, "format": fmt})  # fmt: skip
            if row.state == ExportState.failed.value:
                raise self._failure(row)
            return self._export_read(row)

    @staticmethod
    def _export_read(row: ExportRow) -> ExportRead:
        waiting = row.state in (ExportState.pending.value, ExportState.running.value)
        what = {
            ExportState.pending.value: "is waiting for a worker",
            ExportState.running.value: "is being exported",
            ExportState.succeeded.value: "is stored",
            ExportState.failed.value: "could not be exported",
        }[row.state]
        message = f"point {row.point_idx} as {row.format} {what}"
        if waiting:
            message += f"; ask again in {EXPORT_RETRY_AFTER_S:g} s"
        return ExportRead(
            job_id=row.job_id, point_id=row.point_idx, format=row.format, state=ExportState(row.state),
            attempts=row.attempts, message=message, retry_after_s=EXPORT_RETRY_AFTER_S if waiting else None,
            error_code=row.error_code, error_message=row.error_message, created_at=row.created_at,
            updated_at=row.updated_at,
        )  # fmt: skip

    @staticmethod
    def _failure(row: ExportRow) -> BitscoutError:
        code = row.error_code or ErrorCode.internal.value
        message = f"point {row.point_idx} could not be exported as {row.format}: {row.error_message or code}"
        details = {"job_id": row.job_id, "point_id": row.point_idx, "format": row.format, "state": row.state}
        return BitscoutError(code, message, field=row.error_field, details=details)

    def get_export(self, *, job_id: str, point_id: int, format: str) -> ExportRead:
        """The export of a point in ``format``. Raises ``NotFound`` when none was asked for."""
        fmt = _format(format)
        with self._read() as s:
            row = s.get(ExportRow, (job_id, point_id, fmt))
            if row is None:
                raise NotFound(f"point {point_id} of job {job_id} was never asked for as {fmt}", field="format")
            return self._export_read(row)

    def _stored_formats(self, s: Session, job_id: str) -> dict[int, list[str]]:
        """Point index -> the formats its exports are stored in (the native artifact on the row aside)."""
        out: dict[int, list[str]] = {}
        rows = s.execute(
            select(ExportRow.point_idx, ExportRow.format)
            .where(ExportRow.job_id == job_id, ExportRow.state == ExportState.succeeded.value)
            .order_by(ExportRow.point_idx, ExportRow.format)
        )
        for idx, fmt in rows:
            out.setdefault(int(idx), []).append(str(fmt))
        return out

    # ------------------------------------------------------------------ the workers' side

    def claim_next_export(self, *, worker_id: str) -> ExportTask | None:
        """Atomically take the oldest pending export for ``worker_id``; None when none is pending.

        The row becomes ``running`` with ``attempts`` + 1, ``claimed_by = worker_id`` and a fresh
        heartbeat; an ``export_started`` job event is written. Concurrent callers never get the same row.
        """
        pending = ExportState.pending.value
        probe = select(ExportRow.job_id).where(ExportRow.state == pending).limit(1)
        with self._single_read_engine.connect() as conn:  # the dispatcher polls: no write lock when idle
            if conn.execute(probe).first() is None:
                return None
        for _ in range(5):
            with self._write() as s:
                stmt = (
                    select(ExportRow.job_id, ExportRow.point_idx, ExportRow.format)
                    .where(ExportRow.state == pending)
                    .order_by(ExportRow.created_at, ExportRow.job_id, ExportRow.point_idx, ExportRow.format)
                    .limit(1)
                )
                if self.dialect == "postgresql":
                    stmt = stmt.with_for_update(skip_locked=True)
                key = s.execute(stmt).first()
                if key is None:
                    return None
                job_id, idx, fmt = str(key[0]), int(key[1]), str(key[2])
                now = utcnow()
                res = s.execute(
                    update(ExportRow)
                    .where(ExportRow.job_id == job_id, ExportRow.point_idx == idx, ExportRow.format == fmt,
                           ExportRow.state == pending)
                    .values(state=ExportState.running.value, attempts=ExportRow.attempts + 1, claimed_by=worker_id,
                            heartbeat_at=now, updated_at=now)
                    .execution_options(synchronize_session=False)
                )  # fmt: skip
                if res.rowcount != 1:  # type: ignore[attr-defined]  # pragma: no cover
                    continue
                row = s.get(ExportRow, (job_id, idx, fmt), populate_existing=True)
                assert row is not None  # noqa: S101
                self._event(s, job_id, "export_started", message=f"point {idx} as {fmt}: started by {worker_id}",
                            data={"point": idx, "format": fmt, "worker_id": worker_id, "attempt": row.attempts})  # fmt: skip
                return ExportTask(job_id=job_id, point_id=idx, format=fmt, worker_id=worker_id, attempts=row.attempts)
        return None  # pragma: no cover

    def _owned_export(self, s: Session, task: ExportTask) -> ExportRow:
        row = s.get(ExportRow, (task.job_id, task.point_id, task.format),
                    with_for_update=self.dialect == "postgresql")  # fmt: skip
        if row is None:
            raise NotFound(f"no export of point {task.point_id} of job {task.job_id} as {task.format}", field="format")
        if row.state != ExportState.running.value or row.claimed_by != task.worker_id:
            raise ExportNotOwned(
                f"the export of point {task.point_id} of job {task.job_id} as {task.format} is {row.state} and "
                f"claimed by {row.claimed_by!r}, not by {task.worker_id!r}",
                details={"state": row.state, "claimed_by": row.claimed_by},
            )
        return row

    def beat_exports(self, *, worker_ids: Sequence[str]) -> int:
        """Refresh the heartbeat of the running exports claimed by ``worker_ids``; returns how many."""
        if not worker_ids:
            return 0
        now = utcnow()
        with self._write() as s:
            res = s.execute(
                update(ExportRow)
                .where(ExportRow.state == ExportState.running.value, ExportRow.claimed_by.in_(list(worker_ids)))
                .values(heartbeat_at=now)
                .execution_options(synchronize_session=False)
            )
            return int(res.rowcount or 0)  # type: ignore[attr-defined]

    def finish_export(
        self,
        *,
        task: ExportTask,
        path_or_bytes: str | os.PathLike[str] | bytes,
        filename: str | None = None,
        report: Mapping[str, Any] | None = None,
    ) -> ExportRead:
        """Store what the export wrote (a directory is stored as a .tar.gz of its files, as refined
        artifacts are) and mark it ``succeeded``; ``report`` (what the writer said it wrote) goes into
        the job's ``exported`` event. Raises :class:`ExportNotOwned` when the caller's claim no longer
        holds the row (nothing is referenced; the content stays deduplicated)."""
        with self._read() as s:
            self._owned_export(s, task)  # before the upload: a lost worker stops early
        name = filename or f"job-{task.job_id}-point-{task.point_id}-{task.format}.tar.gz"
        sha, size, name = self._put_blob(task.job_id, task.point_id, path_or_bytes, name)
        with self._write() as s:
            row = self._owned_export(s, task)
            now = utcnow()
            row.state, row.artifact_sha256, row.artifact_size, row.artifact_name = (
                ExportState.succeeded.value, sha, size, name)  # fmt: skip
            row.finished_at = row.updated_at = row.heartbeat_at = now
            row.error_code = row.error_message = row.error_field = None
            self._event(s, task.job_id, "exported", message=f"point {task.point_id} stored as {task.format}",
                        data={"point": task.point_id, "format": task.format, "size": size,
                              **({"report": dict(report)} if report else {})})  # fmt: skip
            return self._export_read(row)

    def fail_export(
        self, *, task: ExportTask, code: ErrorCode | str, message: str, field: str | None = None
    ) -> ExportRead:
        """Mark the export ``failed`` with ``code`` and ``message`` (what every later download answers).
        Raises :class:`ExportNotOwned` when the caller's claim no longer holds the row."""
        with self._write() as s:
            row = self._owned_export(s, task)
            self._fail_row(s, row, str(code), message, field)
            return self._export_read(row)

    def _fail_row(self, s: Session, row: ExportRow, code: str, message: str, field: str | None) -> None:
        now = utcnow()
        row.state, row.claimed_by = ExportState.failed.value, None
        row.error_code, row.error_message = code[:32], storable(message)[:4000]
        row.error_field = field[:500] if field else None
        row.finished_at = row.updated_at = now
        self._event(s, row.job_id, "export_failed", message=f"point {row.point_idx} as {row.format}: {row.error_message}",
                    data={"point": row.point_idx, "format": row.format, "code": row.error_code})  # fmt: skip

    def requeue_exports(
        self,
        *,
        reason: str,
        max_attempts: int | None,
        worker_id: str | None = None,
        worker_prefix: str | None = None,
        older_than_s: float | None = None,
    ) -> list[tuple[str, int, str]]:
        """Send running exports whose worker is lost back to ``pending`` (or fail them, code ``internal``,
        once started ``max_attempts`` times; None: never): those claimed by ``worker_id``, by any claim starting with
        ``worker_prefix``, and/or whose heartbeat is older than ``older_than_s`` seconds (the filters
        given must all hold). The old claim's later calls raise :class:`ExportNotOwned`. Returns the
        ``(job id, point, format)`` of every row changed."""
        if worker_id is None and worker_prefix is None and older_than_s is None:
            raise ValueError("requeue_exports needs worker_id, worker_prefix or older_than_s")
        stmt = select(ExportRow).where(ExportRow.state == ExportState.running.value)
        if worker_id is not None:
            stmt = stmt.where(ExportRow.claimed_by == worker_id)
        if worker_prefix is not None:
            stmt = stmt.where(ExportRow.claimed_by.startswith(worker_prefix, autoescape=True))
        if older_than_s is not None:
            cutoff = utcnow() - timedelta(seconds=float(older_than_s))
            stmt = stmt.where(sa.or_(ExportRow.heartbeat_at < cutoff,
                                     sa.and_(ExportRow.heartbeat_at.is_(None), ExportRow.updated_at < cutoff)))  # fmt: skip
        if self.dialect == "postgresql":
            stmt = stmt.with_for_update(skip_locked=True)
        changed: list[tuple[str, int, str]] = []
        with self._write() as s:
            for row in s.execute(stmt).scalars().all():
                changed.append((row.job_id, row.point_idx, row.format))
                if max_attempts is not None and row.attempts >= max_attempts:
                    self._fail_row(s, row, ErrorCode.internal.value,
                                   f"its worker was lost {row.attempts} times (last: {reason})", None)  # fmt: skip
                    continue
                row.state, row.claimed_by, row.updated_at = ExportState.pending.value, None, utcnow()
                self._event(s, row.job_id, "export_requeued", message=f"point {row.point_idx} as {row.format}: {reason}",
                            data={"point": row.point_idx, "format": row.format, "attempts": row.attempts})  # fmt: skip
        return changed
