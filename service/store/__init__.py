"""The store: the one class that owns the service's transactions.

Everything the API, the web page and the workers read or write about jobs goes through
:class:`Store`. Every public method is keyword-only, runs in its own transaction (committed when
it returns, rolled back when it raises) and returns wire models from :mod:`bitscout.schemas`, never
ORM rows. Errors are :class:`bitscout.errors.BitscoutError` subclasses (``NotFound``,
``Conflict``, ...), so the API turns them into responses unchanged.

Concurrency: on PostgreSQL, rows that a method changes conditionally are locked with
``SELECT ... FOR UPDATE`` (``SKIP LOCKED`` when claiming); on SQLite, every write transaction
starts with ``BEGIN IMMEDIATE`` and so holds the database's write lock from its first statement.
Either way, no two workers can claim one job, and a worker that lost a job (re-queued as stale,
then claimed by another) can no longer change it: its calls raise :class:`JobNotOwned`.

Job life cycle::

    create_job -> queued --claim_next_job--> running --finish_job--> succeeded
                    ^                          |  \\--fail_job-----> failed
                    |   requeue_stale /        |   \\--mark_canceled-> canceled
                    +---- requeue_running -----+
    request_cancel: queued -> canceled at once; running -> cancel_requested (the worker sees
    heartbeat() return False and calls mark_canceled).

Status changes write job events themselves (``created``, ``claimed``, ``stage``, ``requeued``,
``cancel_requested``, ``canceled``, ``succeeded``, ``failed``); workers add their own with
:meth:`Store.add_event`.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import secrets
import uuid
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, BinaryIO

import sqlalchemy as sa
from sqlalchemy import func, select, update
from sqlalchemy.engine import Engine
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from bitscout.errors import BitscoutError, Conflict, ErrorCode, InvalidRequest, NotFound
from bitscout.schemas import (
    HIGHER_IS_BETTER,
    BudgetSpec,
    JobList,
    JobRead,
    JobSpec,
    JobStatus,
    ParetoPointRead,
    ParetoRead,
    SensitivityRead,
    UploadKind,
    UploadRead,
)
from service.blobs import BlobStore
from service.db import SQLITE_IMMEDIATE, SQLITE_NO_BEGIN, make_engine
from service.models import (
    JobEventRow,
    JobRow,
    PointRow,
    SensitivityRow,
    SpaceRow,
    TokenRow,
    UploadRow,
    utcnow,
)

__all__ = ["JobNotOwned", "JobRecord", "Principal", "Store", "TokenInfo"]

TOKEN_PREFIX = "bst_"


class JobNotOwned(Conflict):
    """The worker calling no longer owns the job (it was re-queued, claimed by another worker,
    canceled or finished): the caller must stop working on it and write nothing more."""


class JobRecord(JobRead):
    """A job as the workers see it: :class:`JobRead` plus who claimed it."""

    claimed_by: str | None = None
    idempotency_key: str | None = None


@dataclass(frozen=True)
class Principal:
    """Who a request comes from: the token's id, its user name (jobs' ``owner``) and whether it is an admin."""

    token_id: str
    name: str
    admin: bool


@dataclass(frozen=True)
class TokenInfo:
    """A stored API token (never the secret itself)."""

    id: str
    name: str
    prefix: str
    admin: bool
    created_at: datetime
    last_used_at: datetime | None
    revoked_at: datetime | None


def hash_token(secret: str) -> str:
    """How tokens are stored: SHA-256 of the secret (tokens carry 256 random bits)."""
    return hashlib.sha256(secret.encode("utf-8")).hexdigest()


def json_safe(value: Any) -> Any:
    """A copy of ``value`` that any JSON column accepts: non-finite floats become None, tuples lists,
    keys strings."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, bool | int | str) or value is None:
        return value
    if isinstance(value, Mapping):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        return [json_safe(v) for v in value]
    if hasattr(value, "item"):  # numpy scalars
        return json_safe(value.item())
    if hasattr(value, "to_dict"):
        return json_safe(value.to_dict())
    return str(value)


def space_key_of(space: Mapping[str, Any]) -> str:
    """A stable checksum of a serialised search space."""
    text = json.dumps(json_safe(space), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _option(value: Any) -> dict[str, Any]:
    """Normalise one precision-map entry to ``{"bits": int, "symmetric": bool}``."""
    if isinstance(value, Mapping):
        return {"bits": int(value["bits"]), "symmetric": bool(value.get("symmetric", True))}
    if isinstance(value, bool):
        raise InvalidRequest(f"bad bit option {value!r}", field="precision_map")
    if isinstance(value, int):
        return {"bits": value, "symmetric": True}
    if isinstance(value, str):
        text = value.strip()
        sym = not text.endswith("a")
        return {"bits": int(text.rstrip("as")), "symmetric": sym}
    raise InvalidRequest(f"bad bit option {value!r}", field="precision_map")


def _finite(value: Any) -> float | None:
    try:
        f = float(value)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


class Store:
    """Durable record of jobs, events, sensitivities, points, uploads and tokens.

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
    def from_settings(cls, settings: Any) -> Store:
        """Open the store described by a :class:`service.settings.Settings`."""
        return cls(make_engine(settings.url, pool_size=settings.pool_size), blob_dir=settings.blob_dir)

    def close(self) -> None:
        """Close every pooled connection."""
        self.engine.dispose()

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

    def ping(self) -> None:
        """Run ``SELECT 1``; raises when the database cannot be reached."""
        with self.engine.connect() as conn:
            conn.execute(sa.text("SELECT 1"))

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

    @staticmethod
    def _point_read(row: PointRow, recommended: int | None) -> ParetoPointRead:
        return ParetoPointRead.model_validate(
            {
                "id": row.idx,
                "method": row.method,
                "label": row.label or "",
                "precision_map": row.precision_map,
                "cost": {
                    "size_bytes": row.size_bytes,
                    "size_mb": row.size_bytes / 1e6,
                    "avg_bits": row.avg_bits,
                    "bops": row.bops,
                    "latency_ms": row.latency_ms,
                },
                "metrics": row.metrics or {},
                "refined": row.refined,
                "refined_from": row.refined_from,
                "on_front": row.on_front,
                "meets_budget": row.meets_budget,
                "recommended": recommended is not None and row.idx == recommended,
                "predicted": row.predicted,
                "artifact_available": row.artifact_sha256 is not None,
            }
        )

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
            kind=kind[:32],
            stage=stage[:128] if stage else stage,
            message=message,
            data=json_safe(dict(data)) if data else None,
        )
        s.add(ev)
        return ev

    # ------------------------------------------------------------------ jobs

    def create_job(
        self,
        *,
        owner: str,
        spec: JobSpec | Mapping[str, Any],
        idempotency_key: str | None = None,
        max_active: int | None = None,
    ) -> JobRead:
        """Write a new ``queued`` job (and its ``created`` event) and return it.

        The row is committed before this returns, so nothing can be queued anywhere before it
        exists. With an ``idempotency_key`` that ``owner`` already used, returns that job
        instead of creating one, provided the spec is the same; a different spec raises
        ``Conflict`` (field ``idempotency_key``). With ``max_active``, raises ``Conflict`` when the
        owner already has that many queued or running jobs.
        """
        spec_model = spec if isinstance(spec, JobSpec) else JobSpec.model_validate(spec)
        spec_json = json_safe(spec_model.model_dump(mode="json"))
        if idempotency_key is not None:
            existing = self._find_idempotent(owner, idempotency_key, spec_json)
            if existing is not None:
                return existing
        now = utcnow()
        row = JobRow(
            id=uuid.uuid4().hex,
            owner=owner,
            status=JobStatus.queued.value,
            spec=spec_json,
            idempotency_key=idempotency_key,
            progress=0.0,
            stage="queued",
            message=None,
            created_at=now,
            updated_at=now,
            attempts=0,
            cancel_requested=False,
            n_points=0,
        )
        try:
            with self._write() as s:
                if max_active is not None:
                    active = s.execute(
                        select(func.count())
                        .select_from(JobRow)
                        .where(JobRow.owner == owner, JobRow.status.in_(("queued", "running")))
                    ).scalar_one()
                    if active >= max_active:
                        raise Conflict(
                            f"you already have {active} queued or running jobs (limit {max_active}); "
                            "wait for some to finish or cancel them",
                            details={"active": active, "limit": max_active},
                        )
                s.add(row)
                s.flush()
                self._event(s, row.id, "created", stage="queued", message="job submitted", at=now)
                result: JobRead = self._job_read(row)
            return result
        except IntegrityError:
            if idempotency_key is None:
                raise
            existing = self._find_idempotent(owner, idempotency_key, spec_json)
            if existing is None:  # pragma: no cover - the conflicting row vanished
                raise
            return existing

    def _find_idempotent(self, owner: str, key: str, spec_json: Any) -> JobRead | None:
        with self._read() as s:
            row = s.execute(
                select(JobRow).where(JobRow.owner == owner, JobRow.idempotency_key == key)
            ).scalar_one_or_none()
            if row is None:
                return None
            if row.spec != spec_json:
                raise Conflict(
                    f"idempotency key {key!r} was already used for job {row.id} with a different spec",
                    field="idempotency_key",
                    details={"job_id": row.id},
                )
            result: JobRead = self._job_read(row)
            return result

    def get_job(self, *, job_id: str, owner: str | None = None) -> JobRead:
        """The job ``job_id``; with ``owner``, only if that user owns it. Raises ``NotFound``."""
        # The status poll is the hottest path: a Core select, no ORM session.
        with self._single_read_engine.connect() as conn:
            row = conn.execute(self._select_job, {"job_id": job_id}).first()
        if row is None or (owner is not None and row.owner != owner):
            raise NotFound(f"no job {job_id!r}", field="job_id")
        result: JobRead = self._job_read(row)
        return result

    def get_job_record(self, *, job_id: str) -> JobRecord:
        """The job with its worker-side fields (``claimed_by``). Raises ``NotFound``."""
        with self._read() as s:
            row = s.get(JobRow, job_id)
            if row is None:
                raise NotFound(f"no job {job_id!r}", field="job_id")
            result: JobRecord = self._job_read(row, JobRecord)
            return result

    def list_jobs(
        self,
        *,
        owner: str | None = None,
        status: JobStatus | str | None = None,
        limit: int = 50,
        offset: int = 0,
    ) -> JobList:
        """A page of jobs, newest first, optionally only ``owner``'s and only those in ``status``."""
        limit = max(1, int(limit))
        offset = max(0, int(offset))
        conds = []
        if owner is not None:
            conds.append(JobRow.owner == owner)
        if status is not None:
            conds.append(JobRow.status == JobStatus(status).value)
        with self._read() as s:
            total = s.execute(select(func.count()).select_from(JobRow).where(*conds)).scalar_one()
            rows = (
                s.execute(
                    select(JobRow)
                    .where(*conds)
                    .order_by(JobRow.created_at.desc(), JobRow.id.desc())
                    .limit(limit)
                    .offset(offset)
                )
                .scalars()
                .all()
            )
            items = [self._job_read(r) for r in rows]
        nxt = offset + len(items) if offset + len(items) < total else None
        return JobList(items=items, total=total, limit=limit, offset=offset, next_offset=nxt)

    def count_jobs(self) -> dict[str, int]:
        """Jobs per status (every status present, zero where none)."""
        with self._read() as s:
            rows = s.execute(select(JobRow.status, func.count()).group_by(JobRow.status)).all()
        out = {st.value: 0 for st in JobStatus}
        out.update({str(k): int(v) for k, v in rows})
        return out

    def request_cancel(self, *, job_id: str, owner: str | None = None) -> JobRead:
        """Ask for a job to stop.

        A queued job is canceled at once. A running job gets ``cancel_requested``; its worker
        sees :meth:`heartbeat` return False and calls :meth:`mark_canceled`. Canceling a canceled
        job (or one whose cancel is already requested) changes nothing. A job that already
        succeeded or failed raises ``Conflict``. Another user's job raises ``NotFound``.
        """
        with self._write() as s:
            row = self._lock_job(s, job_id)
            if row is None or (owner is not None and row.owner != owner):
                raise NotFound(f"no job {job_id!r}", field="job_id")
            now = utcnow()
            if row.status == JobStatus.queued.value:
                row.status = JobStatus.canceled.value
                row.finished_at = now
                row.updated_at = now
                row.stage = "canceled"
                row.error_code = ErrorCode.canceled.value
                row.error_message = "canceled before it started"
                self._event(s, row.id, "canceled", stage="canceled", message="canceled while queued")
            elif row.status == JobStatus.running.value:
                if not row.cancel_requested:
                    row.cancel_requested = True
                    row.updated_at = now
                    self._event(s, row.id, "cancel_requested", stage=row.stage, message="cancel requested")
            elif row.status in (JobStatus.succeeded.value, JobStatus.failed.value):
                raise Conflict(
                    f"job {job_id} already {row.status}; there is nothing to cancel", field="job_id"
                )
            result: JobRead = self._job_read(row)
            return result

    def claim_next_job(self, *, worker_id: str) -> JobRecord | None:
        """Atomically take the oldest queued job for ``worker_id``; None when nothing is queued.

        The job becomes ``running`` with ``attempts`` + 1, ``claimed_by = worker_id``, a fresh
        heartbeat and ``started_at``; a ``claimed`` event is written. Concurrent callers never get
        the same job (PostgreSQL ``FOR UPDATE SKIP LOCKED``; SQLite ``BEGIN IMMEDIATE`` plus an
        UPDATE conditional on ``status = 'queued'``).
        """
        for _ in range(5):
            with self._write() as s:
                stmt = (
                    select(JobRow.id)
                    .where(JobRow.status == JobStatus.queued.value)
                    .order_by(JobRow.created_at, JobRow.id)
                    .limit(1)
                )
                if self.dialect == "postgresql":
                    stmt = stmt.with_for_update(skip_locked=True)
                job_id = s.execute(stmt).scalar_one_or_none()
                if job_id is None:
                    return None
                now = utcnow()
                res = s.execute(
                    update(JobRow)
                    .where(JobRow.id == job_id, JobRow.status == JobStatus.queued.value)
                    .values(
                        status=JobStatus.running.value,
                        attempts=JobRow.attempts + 1,
                        claimed_by=worker_id,
                        heartbeat_at=now,
                        started_at=now,
                        updated_at=now,
                        stage="starting",
                        message=None,
                        progress=0.0,
                    )
                    .execution_options(synchronize_session=False)
                )
                if res.rowcount != 1:  # type: ignore[attr-defined]  # pragma: no cover
                    continue
                row = s.get(JobRow, job_id, populate_existing=True)
                assert row is not None  # noqa: S101
                self._event(
                    s, job_id, "claimed", stage="starting", message=f"started by {worker_id}",
                    data={"worker_id": worker_id, "attempt": row.attempts},
                )  # fmt: skip
                result: JobRecord = self._job_read(row, JobRecord)
                return result
        return None  # pragma: no cover

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

    def heartbeat(
        self,
        *,
        job_id: str,
        worker_id: str,
        progress: float | None = None,
        stage: str | None = None,
        message: str | None = None,
    ) -> bool:
        """Record that ``worker_id`` is alive on ``job_id``, with optional progress (0-1, clamped),
        stage and message. A new stage writes a ``stage`` event.

        Returns True to go on, False when a cancel was requested (the heartbeat is still recorded;
        the worker should stop and call :meth:`mark_canceled`). Raises :class:`JobNotOwned` when the
        job is not running under ``worker_id`` (nothing is written: the worker must stop) and
        ``NotFound`` when there is no such job.
        """
        with self._write() as s:
            row = self._owned(s, job_id, worker_id)
            now = utcnow()
            row.heartbeat_at = now
            row.updated_at = now
            if progress is not None:
                p = _finite(progress)
                if p is not None:
                    row.progress = min(max(p, 0.0), 1.0)
            if stage is not None and stage != row.stage:
                row.stage = stage[:128]
                self._event(s, job_id, "stage", stage=row.stage, message=message)
            if message is not None:
                row.message = message[:2000]
            return not row.cancel_requested

    def add_event(
        self,
        *,
        job_id: str,
        kind: str,
        stage: str | None = None,
        message: str | None = None,
        data: Mapping[str, Any] | None = None,
    ) -> int:
        """Append an event to the job's log; returns its id. Raises ``NotFound``."""
        with self._write() as s:
            if s.get(JobRow, job_id) is None:
                raise NotFound(f"no job {job_id!r}", field="job_id")
            ev = self._event(s, job_id, kind, stage=stage, message=message, data=data)
            s.flush()
            return int(ev.id)

    def list_events(
        self, *, job_id: str, owner: str | None = None, after: int | None = None, limit: int = 500
    ) -> list[Any]:
        """The job's events in order, those with id > ``after`` only, at most ``limit``."""
        from bitscout.schemas import JobEventRead

        with self._read() as s:
            job = s.get(JobRow, job_id)
            if job is None or (owner is not None and job.owner != owner):
                raise NotFound(f"no job {job_id!r}", field="job_id")
            stmt = select(JobEventRow).where(JobEventRow.job_id == job_id)
            if after is not None:
                stmt = stmt.where(JobEventRow.id > after)
            rows = s.execute(stmt.order_by(JobEventRow.id).limit(max(1, limit))).scalars().all()
            return [
                JobEventRead(id=r.id, at=r.at, kind=r.kind, stage=r.stage, message=r.message, data=r.data)
                for r in rows
            ]

    def finish_job(
        self,
        *,
        job_id: str,
        worker_id: str,
        points: Sequence[Mapping[str, Any]],
        front_info: Mapping[str, Any] | None = None,
        artifacts: Mapping[int, str | os.PathLike[str]] | None = None,
    ) -> JobRead:
        """Store every point of a finished search and mark the job ``succeeded``, in ONE transaction.

        ``points`` are dicts in the form of ``search.result.ParetoPoint.to_dict()``
        (``precision_map``, ``cost`` {size_bytes, avg_bits, bops, latency_ms}, ``metrics``, ``method``,
        ``refined``, ``label``, ``predicted``, ``budget``) with optional ``on_front`` (default True),
        ``meets_budget`` (default: computed from the job's budget) and ``refined_from`` (index of
        another point in this list). A point's id is its index in the list. Other keys are kept in
        the row's ``extra``.

        ``front_info`` holds ``metric``, ``higher_is_better``, ``baseline_metrics`` and optionally
        ``recommended`` (a point index); without it the recommended point is the best point (by the
        metric) that meets the budget. Anything else in it (timings, versions) is kept.

        ``artifacts`` maps point indexes to exported models (a file or a directory, as
        :meth:`put_artifact` takes them): their content goes to the file store first, and the points
        carry them from the same transaction on, so a job is never seen succeeded without them.

        Raises :class:`JobNotOwned` when ``worker_id`` no longer owns the job: nothing is stored, so
        a result can never be stored twice. Raises ``InvalidRequest`` for malformed points.
        """
        info = dict(front_info or {})
        blobs: dict[int, tuple[str, int, str]] = {}
        for idx, path in (artifacts or {}).items():
            if not 0 <= int(idx) < len(points):
                raise InvalidRequest(f"artifact of point {idx}: not a point index", field="artifacts")
            blobs[int(idx)] = self._put_blob(job_id, int(idx), path, None)
        with self._write() as s:
            row = self._owned(s, job_id, worker_id)
            spec = JobSpec.model_validate(row.spec)
            metric = str(info.get("metric") or (spec.metric.value if spec.metric else ""))
            higher = bool(
                info.get("higher_is_better", HIGHER_IS_BETTER.get(spec.metric, True) if spec.metric else True)
            )
            info["metric"] = metric
            info["higher_is_better"] = higher
            rows = [self._point_row(job_id, i, p, spec.budget) for i, p in enumerate(points)]
            n = len(rows)
            for r in rows:
                if r.refined_from is not None and not 0 <= r.refined_from < n:
                    raise InvalidRequest(f"point {r.idx}: refined_from {r.refined_from} is not a point index")
            recommended = info.get("recommended")
            if recommended is not None:
                recommended = int(recommended)
                if not 0 <= recommended < n:
                    raise InvalidRequest(f"recommended point {recommended} is not a point index")
            else:
                recommended = self._pick_recommended(rows, metric, higher)
            info["recommended"] = recommended
            for r in rows:
                if r.idx in blobs:
                    r.artifact_sha256, r.artifact_size, r.artifact_name = blobs[r.idx]
            s.execute(sa.delete(PointRow).where(PointRow.job_id == job_id))
            s.add_all(rows)
            now = utcnow()
            row.status = JobStatus.succeeded.value
            row.progress = 1.0
            row.stage = "done"
            row.message = f"{n} points stored"
            row.finished_at = now
            row.updated_at = now
            row.heartbeat_at = now
            row.result_info = json_safe(info)
            row.n_points = n
            row.recommended_point = recommended
            row.error_code = None
            row.error_message = None
            self._event(
                s, job_id, "succeeded", stage="done", message=f"{n} points stored",
                data={"n_points": n, "recommended": recommended},
            )  # fmt: skip
            result: JobRead = self._job_read(row)
            return result

    @staticmethod
    def _point_row(job_id: str, idx: int, p: Mapping[str, Any], budget: BudgetSpec) -> PointRow:
        try:
            pmap_raw = p["precision_map"]
            if hasattr(pmap_raw, "to_dict"):
                pmap_raw = pmap_raw.to_dict()
            pmap = {str(k): _option(v) for k, v in dict(pmap_raw).items()}
            cost_raw = p["cost"]
            if hasattr(cost_raw, "to_dict"):
                cost_raw = cost_raw.to_dict()
            cost = dict(cost_raw)
            if "size_bytes" not in cost and "size_mb" in cost:
                cost["size_bytes"] = float(cost["size_mb"]) * 1e6
            size_bytes = _finite(cost.get("size_bytes")) or 0.0
            avg_bits = _finite(cost.get("avg_bits")) or 0.0
            bops = _finite(cost.get("bops")) or 0.0
            latency_ms = _finite(cost.get("latency_ms")) or 0.0
            metrics = {str(k): _finite(v) for k, v in dict(p.get("metrics") or {}).items()}
            method = str(p.get("method") or "unknown")[:32]
        except (KeyError, TypeError, ValueError) as exc:
            raise InvalidRequest(f"point {idx} is malformed: {exc!r}", field=f"points.{idx}") from exc
        meets = p.get("meets_budget")
        if meets is None:
            limits = {
                "max_size_mb": size_bytes / 1e6,
                "max_avg_bits": avg_bits,
                "max_bops": bops,
                "max_latency_ms": latency_ms,
            }
            meets = all(limits[k] <= v * (1 + 1e-9) for k, v in budget.limits().items())
        known = {
            "precision_map", "cost", "metrics", "method", "refined", "label", "predicted", "budget",
            "on_front", "meets_budget", "refined_from", "id", "index", "recommended",
        }  # fmt: skip
        extra = {k: v for k, v in p.items() if k not in known}
        refined_from = p.get("refined_from")
        return PointRow(
            job_id=job_id,
            idx=idx,
            method=method,
            label=str(p.get("label") or ""),
            precision_map=pmap,
            size_bytes=size_bytes,
            avg_bits=avg_bits,
            bops=bops,
            latency_ms=latency_ms,
            metrics=metrics,
            refined=bool(p.get("refined", False)),
            refined_from=None if refined_from is None else int(refined_from),
            on_front=bool(p.get("on_front", True)),
            meets_budget=bool(meets),
            predicted=_finite(p.get("predicted")),
            budget=json_safe(p.get("budget")) if p.get("budget") else None,
            extra=json_safe(extra) if extra else None,
        )

    @staticmethod
    @staticmethod
    def _pick_recommended(rows: Sequence[PointRow], metric: str, higher: bool) -> int | None:
        """The best point by ``metric`` among those meeting the budget (ties: the smaller one)."""
        best: tuple[float, float, int] | None = None
        for r in rows:
            value = (r.metrics or {}).get(metric)
            if not r.meets_budget or value is None:
                continue
            key = (-value if higher else value, r.size_bytes, r.idx)
            if best is None or key < best:
                best = key
        return None if best is None else best[2]

    def fail_job(self, *, job_id: str, worker_id: str | None, code: ErrorCode | str, message: str) -> JobRead:
        """Mark the job ``failed`` with an error ``code`` and a ``message`` a user can act on.

        ``worker_id`` must own the running job (else :class:`JobNotOwned`); ``worker_id=None``
        fails a queued or running job whoever holds it (operators, the dispatcher's clean-up).
        A finished job raises ``Conflict``. Points and sensitivities already stored are kept.
        """
        try:
            code_value = ErrorCode(code).value
        except ValueError:
            code_value = ErrorCode.internal.value
        with self._write() as s:
            row = self._owned(s, job_id, worker_id)
            if JobStatus(row.status).finished:
                raise Conflict(f"job {job_id} already {row.status}", field="job_id")
            now = utcnow()
            row.status = JobStatus.failed.value
            row.error_code = code_value
            row.error_message = message[:4000]
            row.finished_at = now
            row.updated_at = now
            row.message = message[:2000]
            self._event(s, job_id, "failed", stage=row.stage, message=message, data={"code": code_value})
            result: JobRead = self._job_read(row)
            return result

    def mark_canceled(self, *, job_id: str, worker_id: str | None) -> JobRead:
        """Mark the job ``canceled`` (after its worker stopped on a cancel request).

        Same ownership rules as :meth:`fail_job`. What was stored (events, sensitivities) is kept.
        """
        with self._write() as s:
            row = self._owned(s, job_id, worker_id)
            if JobStatus(row.status).finished:
                if row.status == JobStatus.canceled.value:
                    result0: JobRead = self._job_read(row)
                    return result0
                raise Conflict(f"job {job_id} already {row.status}", field="job_id")
            now = utcnow()
            row.status = JobStatus.canceled.value
            row.error_code = ErrorCode.canceled.value
            row.error_message = "canceled at the user's request"
            row.finished_at = now
            row.updated_at = now
            row.cancel_requested = False
            self._event(s, job_id, "canceled", stage=row.stage, message="canceled")
            result: JobRead = self._job_read(row)
            return result

    def requeue_stale(self, *, older_than_s: float, max_attempts: int) -> list[str]:
        """Recover running jobs whose heartbeat is older than ``older_than_s`` seconds.

        Each such job goes back to ``queued`` (``claimed_by`` cleared, a ``requeued`` event), or, if
        it has already been started ``max_attempts`` times, becomes ``failed`` (code ``internal``,
        the reason in the message); a stale job whose cancel was requested becomes ``canceled``.
        The old worker's later calls raise :class:`JobNotOwned`. Returns the ids of every job
        changed. Safe to run from several dispatchers at once.
        """
        cutoff = utcnow() - timedelta(seconds=float(older_than_s))
        changed: list[str] = []
        with self._write() as s:
            stmt = select(JobRow).where(
                JobRow.status == JobStatus.running.value,
                sa.or_(
                    JobRow.heartbeat_at < cutoff,
                    sa.and_(JobRow.heartbeat_at.is_(None), JobRow.updated_at < cutoff),
                ),
            )
            if self.dialect == "postgresql":
                stmt = stmt.with_for_update(skip_locked=True)
            for row in s.execute(stmt).scalars().all():
                changed.append(row.id)
                self._requeue_row(s, row, f"no heartbeat for more than {older_than_s:g} s", max_attempts)
        return changed

    def requeue_running(
        self,
        *,
        worker_id: str | None = None,
        max_attempts: int | None = None,
        reason: str = "its worker was restarted",
    ) -> list[str]:
        """Send running jobs (only those claimed by ``worker_id`` if given) back to ``queued``.

        For a restarted dispatcher that cannot adopt what it was running, or one whose worker
        died. Jobs whose cancel was requested become ``canceled``; with ``max_attempts``, jobs
        started that often become ``failed``. ``reason`` (why the worker was lost) goes into the
        ``requeued`` event and the failure message. Returns the ids of the jobs changed.
        """
        changed: list[str] = []
        with self._write() as s:
            stmt = select(JobRow).where(JobRow.status == JobStatus.running.value)
            if worker_id is not None:
                stmt = stmt.where(JobRow.claimed_by == worker_id)
            if self.dialect == "postgresql":
                stmt = stmt.with_for_update(skip_locked=True)
            for row in s.execute(stmt).scalars().all():
                changed.append(row.id)
                self._requeue_row(s, row, reason, max_attempts)
        return changed

    def _requeue_row(self, s: Session, row: JobRow, reason: str, max_attempts: int | None) -> None:
        now = utcnow()
        previous = row.claimed_by
        row.updated_at = now
        row.claimed_by = None
        if row.cancel_requested:
            row.status = JobStatus.canceled.value
            row.cancel_requested = False
            row.finished_at = now
            row.error_code = ErrorCode.canceled.value
            row.error_message = "canceled at the user's request"
            self._event(s, row.id, "canceled", stage=row.stage, message=f"canceled ({reason})")
        elif max_attempts is not None and row.attempts >= max_attempts:
            row.status = JobStatus.failed.value
            row.finished_at = now
            row.error_code = ErrorCode.internal.value
            row.error_message = (
                f"the job's worker was lost ({reason}) on each of {row.attempts} attempts; giving up. "
                "Check the workers' logs (out of memory?) and submit it again."
            )
            self._event(
                s, row.id, "failed", stage=row.stage, message=row.error_message,
                data={"code": row.error_code, "previous_worker": previous},
            )  # fmt: skip
        else:
            row.status = JobStatus.queued.value
            row.stage = "queued"
            row.message = f"re-queued: {reason}"
            row.heartbeat_at = None
            self._event(
                s, row.id, "requeued", stage="queued", message=f"re-queued: {reason}",
                data={"previous_worker": previous, "attempts": row.attempts},
            )  # fmt: skip

    # ------------------------------------------------------------------ space and sensitivities

    def put_space(self, *, job_id: str, space: Mapping[str, Any]) -> str:
        """Store (or replace) the job's serialised search space with its per-option cost tables;
        returns its key (a checksum). Resolve reads it back with :meth:`get_space`."""
        data = json_safe(dict(space))
        key = space_key_of(data)
        with self._write() as s:
            if s.get(JobRow, job_id) is None:
                raise NotFound(f"no job {job_id!r}", field="job_id")
            row = s.get(SpaceRow, job_id)
            if row is None:
                s.add(SpaceRow(job_id=job_id, space_key=key, space=data, created_at=utcnow()))
            else:
                row.space = data
                row.space_key = key
                row.created_at = utcnow()
        return key

    def get_space(self, *, job_id: str) -> dict[str, Any] | None:
        """The job's stored search space, or None when none is stored yet."""
        with self._read() as s:
            row = s.get(SpaceRow, job_id)
            return None if row is None else dict(row.space)

    def put_sensitivity(
        self, *, job_id: str, method: str, table: Mapping[str, Any], space_key: str | None = None
    ) -> None:
        """Store a sensitivity table (``search.result.SensitivityTable.to_dict()`` form).

        Idempotent per (job, method, space key): storing again replaces the table. ``space_key``
        defaults to the key of the job's stored space ("" when none), so a re-run of the same job
        finds its tables with :meth:`get_sensitivities` and need not recompute them.
        """
        data = json_safe(dict(table))
        data.setdefault("method", method)
        with self._write() as s:
            if s.get(JobRow, job_id) is None:
                raise NotFound(f"no job {job_id!r}", field="job_id")
            if space_key is None:
                sp = s.get(SpaceRow, job_id)
                space_key = sp.space_key if sp is not None else ""
            values = {
                "job_id": job_id,
                "method": method[:32],
                "space_key": space_key,
                "table": data,
                "created_at": utcnow(),
            }
            if self.dialect == "postgresql":
                from sqlalchemy.dialects.postgresql import insert as pg_insert

                ins = pg_insert(SensitivityRow).values(**values)
                s.execute(
                    ins.on_conflict_do_update(
                        constraint="uq_sensitivities_job_method_space",
                        set_={"table": ins.excluded.table, "created_at": ins.excluded.created_at},
                    )
                )
            else:
                from sqlalchemy.dialects.sqlite import insert as lite_insert

                ins2 = lite_insert(SensitivityRow).values(**values)
                s.execute(
                    ins2.on_conflict_do_update(
                        index_elements=["job_id", "method", "space_key"],
                        set_={"table": ins2.excluded.table, "created_at": ins2.excluded.created_at},
                    )
                )

    def get_sensitivity_tables(self, *, job_id: str, space_key: str | None = None) -> list[dict[str, Any]]:
        """The raw stored tables (dicts as given to :meth:`put_sensitivity`), oldest first."""
        with self._read() as s:
            stmt = select(SensitivityRow).where(SensitivityRow.job_id == job_id)
            if space_key is not None:
                stmt = stmt.where(SensitivityRow.space_key == space_key)
            rows = s.execute(stmt.order_by(SensitivityRow.id)).scalars().all()
            return [dict(r.table) for r in rows]

    def get_sensitivities(self, *, job_id: str, owner: str | None = None) -> list[SensitivityRead]:
        """The job's sensitivity tables as wire models. Raises ``NotFound`` for another user's job."""
        with self._read() as s:
            job = s.get(JobRow, job_id)
            if job is None or (owner is not None and job.owner != owner):
                raise NotFound(f"no job {job_id!r}", field="job_id")
            rows = (
                s.execute(
                    select(SensitivityRow).where(SensitivityRow.job_id == job_id).order_by(SensitivityRow.id)
                )
                .scalars()
                .all()
            )
            out = []
            for r in rows:
                t = r.table or {}
                out.append(
                    SensitivityRead(
                        method=str(t.get("method") or r.method),
                        samples=int(t.get("samples") or 0),
                        scores=t.get("scores") or {},
                        errors=t.get("errors") or {},
                        extra=t.get("extra") or {},
                        created_at=r.created_at,
                    )
                )
            return out

    # ------------------------------------------------------------------ points and artifacts

    def get_points(self, *, job_id: str, owner: str | None = None) -> list[ParetoPointRead]:
        """Every stored point of the job, by id."""
        return self.get_pareto(job_id=job_id, owner=owner).points

    def get_pareto(self, *, job_id: str, owner: str | None = None) -> ParetoRead:
        """The job's points with the metric, its direction, the baseline and the recommended point."""
        with self._read() as s:
            job = s.get(JobRow, job_id)
            if job is None or (owner is not None and job.owner != owner):
                raise NotFound(f"no job {job_id!r}", field="job_id")
            rows = (
                s.execute(select(PointRow).where(PointRow.job_id == job_id).order_by(PointRow.idx))
                .scalars()
                .all()
            )
            info = job.result_info or {}
            spec = job.spec or {}
            metric = info.get("metric") or spec.get("metric")
            higher = info.get("higher_is_better")
            if higher is None:
                higher = metric not in ("kl", "perplexity")
            return ParetoRead(
                job_id=job_id,
                metric=metric,
                higher_is_better=bool(higher),
                baseline_metrics=info.get("baseline_metrics") or {},
                budget=spec.get("budget"),
                points=[self._point_read(r, job.recommended_point) for r in rows],
                recommended=job.recommended_point,
            )

    def get_result_info(self, *, job_id: str) -> dict[str, Any]:
        """The ``front_info`` stored by :meth:`finish_job` (empty before)."""
        with self._read() as s:
            job = s.get(JobRow, job_id)
            if job is None:
                raise NotFound(f"no job {job_id!r}", field="job_id")
            return dict(job.result_info or {})

    def get_point(self, *, job_id: str, point_id: int, owner: str | None = None) -> ParetoPointRead:
        """One point with its precision map. Raises ``NotFound``."""
        with self._read() as s:
            job = s.get(JobRow, job_id)
            if job is None or (owner is not None and job.owner != owner):
                raise NotFound(f"no job {job_id!r}", field="job_id")
            row = s.get(PointRow, (job_id, point_id))
            if row is None:
                raise NotFound(f"job {job_id} has no point {point_id}", field="point_id")
            return self._point_read(row, job.recommended_point)

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

    # ------------------------------------------------------------------ uploads

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

    # ------------------------------------------------------------------ tokens

    def create_token(self, *, name: str, admin: bool = False) -> tuple[TokenInfo, str]:
        """Create an API token for user ``name``; returns ``(info, secret)``. Only the hash is stored:
        the secret cannot be shown again."""
        name = name.strip()
        if not name or len(name) > 128:
            raise InvalidRequest("a token needs a name of 1 to 128 characters", field="name")
        secret = TOKEN_PREFIX + secrets.token_urlsafe(32)
        row = TokenRow(
            id=uuid.uuid4().hex,
            name=name,
            token_hash=hash_token(secret),
            prefix=secret[:10],
            admin=bool(admin),
            created_at=utcnow(),
        )
        with self._write() as s:
            s.add(row)
        return self._token_info(row), secret

    @staticmethod
    def _token_info(row: TokenRow) -> TokenInfo:
        return TokenInfo(
            id=row.id,
            name=row.name,
            prefix=row.prefix,
            admin=row.admin,
            created_at=row.created_at,
            last_used_at=row.last_used_at,
            revoked_at=row.revoked_at,
        )

    def list_tokens(self, *, include_revoked: bool = False) -> list[TokenInfo]:
        """Every token (not the secrets), oldest first."""
        with self._read() as s:
            stmt = select(TokenRow).order_by(TokenRow.created_at, TokenRow.id)
            if not include_revoked:
                stmt = stmt.where(TokenRow.revoked_at.is_(None))
            return [self._token_info(r) for r in s.execute(stmt).scalars().all()]

    def revoke_token(self, *, token_id: str | None = None, name: str | None = None) -> list[str]:
        """Revoke the token ``token_id`` (or every token of user ``name``); returns the ids revoked.
        Raises ``NotFound`` when nothing matches."""
        if (token_id is None) == (name is None):
            raise InvalidRequest("give a token id or a name", field="token_id")
        with self._write() as s:
            stmt = select(TokenRow).where(TokenRow.revoked_at.is_(None))
            if token_id is not None:
                stmt = stmt.where(sa.or_(TokenRow.id == token_id, TokenRow.prefix == token_id))
            else:
                stmt = stmt.where(TokenRow.name == name)
            rows = s.execute(stmt).scalars().all()
            if not rows:
                raise NotFound(f"no active token {token_id or name!r}", field="token_id")
            now = utcnow()
            for r in rows:
                r.revoked_at = now
            return [r.id for r in rows]

    def verify_token(self, *, secret: str, touch: bool = False) -> Principal | None:
        """The principal of an active token, or None. With ``touch``, records ``last_used_at``."""
        if not secret or len(secret) > 256:
            return None
        digest = hash_token(secret)
        with self._read() as s:
            row = s.execute(
                select(TokenRow).where(TokenRow.token_hash == digest, TokenRow.revoked_at.is_(None))
            ).scalar_one_or_none()
            if row is None:
                return None
            principal = Principal(token_id=row.id, name=row.name, admin=row.admin)
        if touch:
            with self._write() as s:
                s.execute(
                    update(TokenRow).where(TokenRow.id == principal.token_id).values(last_used_at=utcnow())
                )
        return principal
