"""What every part of the store shares: the engine, its sessions, the file store, row conversion.

:class:`StoreBase` owns the connection handling that each aggregate's methods build on:

* :meth:`StoreBase._read` opens a session in one read transaction; :meth:`StoreBase._write` one in
  a write transaction (committed when the block ends, rolled back when it raises). On SQLite a write
  transaction starts with ``BEGIN IMMEDIATE`` and so holds the database's write lock from its first
  statement; single-statement reads use ``_single_read_engine`` (no BEGIN / ROLLBACK round trips).
* :meth:`StoreBase._lock_job` reads a job row for a conditional change (``SELECT ... FOR UPDATE`` on
  PostgreSQL) and :meth:`StoreBase._owned` adds the check every worker-side write starts with: the
  job is running under the calling worker, else :class:`~service.store.records.JobNotOwned`.
* :meth:`StoreBase._job_read` and :meth:`StoreBase._event` turn rows into wire models and append job
  events inside a caller's session; they never open a transaction themselves.

"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from datetime import datetime
from typing import Any, Self

import sqlalchemy as sa
from sqlalchemy import select
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session

from bitscout.errors import NotFound
from bitscout.schemas import JobRead, JobSpec, JobStatus
from service.blobs import BlobStore
from service.db import SQLITE_IMMEDIATE, SQLITE_NO_BEGIN, make_engine
from service.models import JobEventRow, JobRow, utcnow
from service.store._json import json_safe, storable
from service.store.records import JobNotOwned, JobRecord


class StoreBase:
    """The engine, the sessions and the file store behind every aggregate of :class:`~service.store.Store`.

    Args:
        engine: an engine from :func:`service.db.make_engine` (SQLite or PostgreSQL) whose schema
            is at head.
        blob_dir: directory of the content-addressed file store (uploads and artifacts).
    """

    def __init__(self, engine: Engine, *, blob_dir: str | os.PathLike[str]) -> None:
        self.engine = engine
        self.dialect = engine.dialect.name
        self._write_engine = engine.execution_options(**{SQLITE_IMMEDIATE: True})
        # Single-statement reads need no transaction: no BEGIN / ROLLBACK round trips.
        if self.dialect == "sqlite":
            self._single_read_engine = engine.execution_options(**{SQLITE_NO_BEGIN: True})
        else:
            self._single_read_engine = engine.execution_options(isolation_level="AUTOCOMMIT")
        self.blobs = BlobStore(blob_dir)
        self._spec_cache: dict[str, JobSpec] = {}
        jobs = JobRow.__table__
        self._select_job = select(jobs).where(jobs.c.id == sa.bindparam("job_id"))

    @classmethod
    def from_settings(cls, settings: Any) -> Self:
        """Open the store described by a :class:`service.settings.Settings`."""
        return cls(make_engine(settings.url, pool_size=settings.pool_size), blob_dir=settings.blob_dir)

    def close(self) -> None:
        """Close every pooled connection."""
        self.engine.dispose()

    def ping(self) -> None:
        """Run ``SELECT 1``; raises when the database cannot be reached."""
        with self.engine.connect() as conn:
            conn.execute(sa.text("SELECT 1"))

    # ------------------------------------------------------------------ sessions

    @contextmanager
    def _read(self) -> Iterator[Session]:
        with Session(self.engine, expire_on_commit=False) as s, s.begin():
            yield s

    @contextmanager
    def _write(self) -> Iterator[Session]:
        with Session(self._write_engine, expire_on_commit=False) as s, s.begin():
            yield s

    def _lock_job(self, s: Session, job_id: str) -> JobRow | None:
        stmt = select(JobRow).where(JobRow.id == job_id)
        if self.dialect == "postgresql":
            stmt = stmt.with_for_update()
        return s.execute(stmt).scalar_one_or_none()

    def _owned(self, s: Session, job_id: str, worker_id: str | None) -> JobRow:
        row = self._lock_job(s, job_id)
        if row is None:
            raise NotFound(f"no job {job_id!r}", field="job_id")
        if worker_id is not None and (row.status != JobStatus.running.value or row.claimed_by != worker_id):
            raise JobNotOwned(
                f"job {job_id} is {row.status} and claimed by {row.claimed_by!r}, not by {worker_id!r}",
                field="job_id",
                details={"status": row.status, "claimed_by": row.claimed_by},
            )
        return row

    # ------------------------------------------------------------------ conversion

    def _spec(self, job_id: str, raw: Any) -> JobSpec:
        """The parsed spec of a job (cached: a job's spec never changes)."""
        spec = self._spec_cache.get(job_id)
        if spec is None:
            spec = JobSpec.model_validate(raw)
            if len(self._spec_cache) >= 10_000:
                self._spec_cache.clear()
            self._spec_cache[job_id] = spec
        return spec

    def _job_read(self, row: Any, cls: type[JobRead] = JobRead) -> Any:
        """A JobRead (or JobRecord) from an ORM row or a Core row of the jobs table."""
        data: dict[str, Any] = {
            "id": row.id,
            "status": row.status,
            "spec": self._spec(row.id, row.spec),
            "progress": min(max(float(row.progress or 0.0), 0.0), 1.0),
            "stage": row.stage,
            "message": row.message,
            "created_at": row.created_at,
            "started_at": row.started_at,
            "finished_at": row.finished_at,
            "updated_at": row.updated_at,
            "heartbeat_at": row.heartbeat_at,
            "attempts": row.attempts,
            "error_code": row.error_code,
            "error_message": row.error_message,
            "cancel_requested": bool(row.cancel_requested),
            "n_points": row.n_points,
            "recommended_point": row.recommended_point,
            "owner": row.owner,
        }
        if cls is JobRecord:
            data["claimed_by"] = row.claimed_by
            data["idempotency_key"] = row.idempotency_key
        return cls.model_validate(data)

    def _event(
        self,
        s: Session,
        job_id: str,
        kind: str,
        *,
        stage: str | None = None,
        message: str | None = None,
        data: Mapping[str, Any] | None = None,
        at: datetime | None = None,
    ) -> JobEventRow:
        ev = JobEventRow(
            job_id=job_id,
            at=at or utcnow(),
            kind=storable(kind[:32]),
            stage=storable(stage[:128]) if stage else stage,
            message=storable(message) if message else message,
            data=json_safe(dict(data)) if data else None,
        )
        s.add(ev)
        return ev
