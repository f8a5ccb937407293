"""Search spaces and sensitivity tables: what a re-run reuses and resolve answers new budgets from.

:class:`SensitivitiesMixin` owns ``job_spaces`` (one serialised search space per job, keyed by
its checksum :func:`space_key_of`) and ``sensitivities`` (one table per job, method and space
key). Both are written as soon as the runner has them, each in its own transaction, and are kept
whatever becomes of the job, so a re-run of the same job finds its tables and need not recompute
them. Storing again replaces (an upsert on PostgreSQL and SQLite alike).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from typing import Any

from sqlalchemy import select

from bitscout.errors import NotFound
from bitscout.schemas import SensitivityRead
from service.models import JobRow, SensitivityRow, SpaceRow, utcnow
from service.store._base import StoreBase
from service.store._json import json_safe


def space_key_of(space: Mapping[str, Any]) -> str:
    """A stable checksum of a serialised search space."""
    text = json.dumps(json_safe(space), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


class SensitivitiesMixin(StoreBase):
    """Jobs' search spaces and sensitivity tables (see the module docstring)."""

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
