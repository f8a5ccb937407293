"""Results: the points of a finished search, its front info, and reading them back.

:class:`PointsMixin` owns the ``points`` rows and the job's ``result_info``. Its one write,
:meth:`PointsMixin.finish_job`, is the success transition of a job: every point, the front info,
the recommended point and the ``succeeded`` status are committed in ONE transaction, only while
the calling worker still owns the job, and replace whatever an earlier attempt stored. Points
arrive as :class:`~service.store.records.PointRecord` s (mappings are validated into them first),
so a malformed result is refused with the field named and nothing written.

Reads (``get_pareto``, ``get_points``, ``get_point``, ``get_result_info``) return wire models and
hide another user's job as ``NotFound``.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import sqlalchemy as sa
from sqlalchemy import select

from bitscout import rules
from bitscout.errors import InvalidRequest, NotFound
from bitscout.formats import EXPORT_FORMATS, NATIVE
from bitscout.schemas import (
    HIGHER_IS_BETTER,
    BudgetSpec,
    JobRead,
    JobSpec,
    JobStatus,
    ParetoPointRead,
    ParetoRead,
)
from service.models import JobRow, PointRow, utcnow
from service.store._json import json_safe
from service.store.exports import ExportsMixin
from service.store.records import FrontInfo, PointRecord, front_info_of, point_records


class PointsMixin(ExportsMixin):
    """A job's stored result (see the module docstring for the guarantees)."""

    def finish_job(
        self,
        *,
        job_id: str,
        worker_id: str,
        points: Sequence[PointRecord | Mapping[str, Any]],
        front_info: FrontInfo | Mapping[str, Any] | None = None,
        artifacts: Mapping[int, str | os.PathLike[str]] | None = None,
    ) -> JobRead:
        """Store every point of a finished search and mark the job ``succeeded``, in ONE transaction.

        ``points`` are :class:`~service.store.records.PointRecord` s (or mappings in their shape:
        ``search.result.ParetoPoint.to_dict()`` with optional ``on_front``, ``meets_budget`` and
        ``refined_from``); ``meets_budget`` defaults to whether the point meets the job's budget,
        ``refined_from`` is the index of another point in this list. A point's id is its index in
        the list. Other keys are kept in the row's ``extra``.

        ``front_info`` (a :class:`~service.store.records.FrontInfo` or a mapping in its shape)
        holds ``metric``, ``higher_is_better``, ``baseline_metrics`` and optionally ``recommended``
        (a point index); without it the recommended point is the best point (by the metric) that
        meets the budget. Anything else in it (timings, versions) is kept.

        ``artifacts`` maps point indexes to exported models (a file or a directory, as
        :meth:`put_artifact` takes them): their content goes to the file store first, and the points
        carry them from the same transaction on, so a job is never seen succeeded without them.

        Raises :class:`JobNotOwned` when ``worker_id`` no longer owns the job: nothing is stored, so
        a result can never be stored twice. Raises ``InvalidRequest`` (``field`` naming the bad value,
        e.g. ``points.3.cost.avg_bits``) for malformed points or front info, before anything is
        written.
        """
        records = point_records(points)
        info = front_info_of(front_info).model_dump(exclude_unset=True)
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
            rows = [self._point_row(job_id, i, p, spec.budget) for i, p in enumerate(records)]
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
    def _point_row(job_id: str, idx: int, p: PointRecord, budget: BudgetSpec) -> PointRow:
        pmap = {k: o.model_dump(exclude_none=True) for k, o in p.precision_map.items()}
        size_bytes = p.cost.size_bytes
        avg_bits = p.cost.avg_bits
        bops = p.cost.bops
        latency_ms = p.cost.latency_ms
        meets = p.meets_budget
        if meets is None:
            meets = rules.meets(p.cost.model_dump(), rules.cost_limits(budget.limits()))
        extra = dict(p.model_extra or {})
        return PointRow(
            job_id=job_id,
            idx=idx,
            method=p.method,
            label=p.label,
            precision_map=pmap,
            size_bytes=size_bytes,
            avg_bits=avg_bits,
            bops=bops,
            latency_ms=latency_ms,
            metrics=dict(p.metrics),
            refined=p.refined,
            refined_from=p.refined_from,
            on_front=p.on_front,
            meets_budget=bool(meets),
            predicted=p.predicted,
            budget=json_safe(p.budget) if p.budget else None,
            extra=json_safe(extra) if extra else None,
        )

    @staticmethod
    def _pick_recommended(rows: Sequence[PointRow], metric: str, higher: bool) -> int | None:
        """The best point by ``metric`` among those meeting the budget (:func:`bitscout.rules.recommended`)."""
        return rules.recommended(
            ((r.idx, (r.metrics or {}).get(metric), r.size_bytes, bool(r.meets_budget)) for r in rows), higher
        )

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
            stored = self._stored_formats(s, job_id)
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
                points=[self._point_read(r, job.recommended_point, stored.get(r.idx, [])) for r in rows],
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
            return self._point_read(row, job.recommended_point, self._stored_formats(s, job_id).get(point_id, []))

    @staticmethod
    def _point_read(row: PointRow, recommended: int | None, exported: Sequence[str] = ()) -> ParetoPointRead:
        native = [NATIVE] if row.artifact_sha256 is not None else []
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
                "artifact_formats": sorted({*native, *exported}, key=EXPORT_FORMATS.index),
                "provenance": (row.extra or {}).get("provenance"),
            }
        )
