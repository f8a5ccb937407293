"""Jobs: their life cycle, claims, heartbeats, cancellation, recovery and event log.

:class:`JobsMixin` owns the ``jobs`` and ``job_events`` tables except the success transition,
which stores points and so lives with them (:meth:`~service.store.points.PointsMixin.finish_job`).

Guarantees:

* ``create_job`` commits the ``queued`` row (and its ``created`` event) before it returns; an
  ``idempotency_key`` reused with the same spec returns the first job.
* ``claim_next_job`` never hands one job to two workers (PostgreSQL ``FOR UPDATE SKIP LOCKED``;
  SQLite ``BEGIN IMMEDIATE`` plus an UPDATE conditional on ``status = 'queued'``).
* Worker-side writes (``heartbeat``, ``fail_job``, ``mark_canceled``) first check that the caller
  still owns the running job and otherwise raise :class:`~service.store.records.JobNotOwned`
  having written nothing.
* ``requeue_stale`` / ``requeue_running`` send lost jobs back to ``queued`` (or end them as
  ``canceled`` / ``failed``) and are safe to run from several dispatchers at once.
* Every status change writes its job event in the same transaction.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from datetime import timedelta
from typing import Any

import sqlalchemy as sa
from sqlalchemy import func, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from bitscout.errors import Conflict, ErrorCode, NotFound
from bitscout.schemas import JobList, JobRead, JobSpec, JobStatus
from service.models import JobEventRow, JobRow, utcnow
from service.store._base import StoreBase
from service.store._json import finite, json_safe, storable
from service.store.records import JobRecord


class JobsMixin(StoreBase):
    """Jobs and their events (see the module docstring for the guarantees)."""

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
                p = finite(progress)
                if p is not None:
                    row.progress = min(max(p, 0.0), 1.0)
            if stage is not None and stage != row.stage:
                row.stage = storable(stage[:128])
                self._event(s, job_id, "stage", stage=row.stage, message=message)
            if message is not None:
                row.message = storable(message[:2000])
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
        message = storable(message)
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
        reason = storable(reason)
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
