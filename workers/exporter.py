"""The export of a stored point: one claimed export request, start to end, on a Ray worker.

:class:`PointExporter.run` opens the store, checks that the export is still claimed by this worker,
loads the job's model the way its search did (:func:`workers.runner.prepare_job`: the same model
directory, task, head and device), reads the point's stored precision map and the job's stored search
space and clip rule, and writes the point with :func:`search.export.formats.export_point` in the format
asked for into the work directory. The directory is stored as the point's artifact for that format (a
``.tar.gz`` of its files, as refined points' artifacts are: :meth:`service.store.Store.finish_export`),
and what the export reports (groups stored quantized or dense, warnings) goes into the job's
``exported`` event. Every failure ends the export with an error code and a one-line message the user
can act on (:func:`workers.runner.error_of`; server paths named as the user knows them), which every
later download of that point in that format answers. An export that is no longer this worker's (its
worker was taken for lost and it was claimed again) stores nothing.

A refined point's native artifact is served by the store and never comes here; its other formats do.
Its learned step sizes and refined weights exist only in that artifact, so the exporter unpacks it
from the file store and writes it in the format asked for with
:func:`search.export.formats.export_stored` (loaded onto the job's model, its map written with the
artifact's own scales and zero points, the codes checked against the stored ones), never from the
unrefined weights.
"""

from __future__ import annotations

import logging
import os
import shutil
import socket
import time
import traceback
from pathlib import Path
from typing import Any

from bitscout.errors import ErrorCode
from search.errors import InvalidInputError, SearchError
from search.export.formats import export_point, export_stored
from search.space import PrecisionMap, space_from_dict
from service.blobs import unpack_dir
from service.db import make_engine
from service.store import ExportNotOwned, ExportTask, Store
from workers import sources
from workers.runner import _one_line, error_of, job_inputs, prepare_job
from workers.settings import RunnerConfig, process_label

log = logging.getLogger("bitscout.workers.exporter")


class PointExporter:
    """Runs one claimed export (see the module docstring)."""

    def __init__(self, task: ExportTask, config: RunnerConfig, *, store: Store | None = None) -> None:
        self.task = task
        self.config = config
        self._own_store = store is None
        self.store = store
        self.paths = sources.ServerPaths(config)
        self.out = Path(config.work_dir) / "exports" / f"{task.job_id}-{task.point_id}-{task.format}-{task.attempts}"

    def run(self) -> dict[str, Any]:
        """Export and store; returns ``{"status": succeeded | failed | lost, ...}`` (never raises)."""
        t0 = time.perf_counter()
        if self.store is None:
            self.store = Store(make_engine(self.config.database_url, pool_size=2), blob_dir=self.config.blob_dir)
        try:
            status, code, message = self._run()
        finally:
            shutil.rmtree(self.out, ignore_errors=True)
            if self._own_store:
                self.store.close()
        return {"status": status, "code": code, "message": message, "seconds": time.perf_counter() - t0,
                **self.task.model_dump()}  # fmt: skip

    def _run(self) -> tuple[str, str | None, str | None]:
        store, task = self.store, self.task
        assert store is not None  # noqa: S101
        try:
            store.add_event(job_id=task.job_id, kind="export_runner",
                            message=f"point {task.point_id} as {task.format}: exporting on {process_label()}",
                            data={"point": task.point_id, "format": task.format, "worker_id": task.worker_id,
                                  "attempt": task.attempts, "pid": os.getpid(), "host": socket.gethostname()})  # fmt: skip
            report = self._export()
            store.finish_export(task=task, path_or_bytes=self.out, report=report)
            return "succeeded", None, None
        except ExportNotOwned as exc:
            log.warning("export %s: no longer ours: %s", task, exc.message)
            return "lost", None, exc.message
        except Exception as exc:  # noqa: BLE001 - every failure ends the export with a code
            code, message = error_of(exc)
            message = self.paths.scrub(message)
            field = "format" if isinstance(exc, SearchError) and exc.field == "format" else None
            if code == ErrorCode.internal.value:
                log.error("export %s failed:\n%s", task, "".join(traceback.format_exception(exc)))
            try:
                store.fail_export(task=task, code=code, message=message, field=field)
            except ExportNotOwned as lost:
                return "lost", None, lost.message
            return "failed", code, message

    def _export(self) -> dict[str, Any]:
        store, task = self.store, self.task
        assert store is not None  # noqa: S101
        job = store.get_job_record(job_id=task.job_id)
        point = store.get_point(job_id=task.job_id, point_id=task.point_id)
        info = store.get_result_info(job_id=task.job_id)
        stored = store.get_space(job_id=task.job_id)
        if stored is None or not isinstance(stored.get("space"), dict):
            raise InvalidInputError(f"job {task.job_id} has no stored search space to export point {task.point_id} over")
        space = space_from_dict(stored["space"])
        pmap = PrecisionMap.from_dict({g: o.model_dump(exclude_none=True) for g, o in point.precision_map.items()})
        search = prepare_job(job.spec, job_inputs(job.spec, store, self.config, self.paths))
        metadata = {
            "job_id": task.job_id, "point": task.point_id, "method": point.method, "label": point.label,
            "metric": info.get("metric"), "higher_is_better": info.get("higher_is_better"),
            "metrics": dict(point.metrics), "cost": point.cost.model_dump(mode="json"), "task": search.task,
            "refined": point.refined, "refined_from": point.refined_from, "format": task.format,
        }  # fmt: skip
        shutil.rmtree(self.out, ignore_errors=True)
        if point.refined:
            native = self.out.with_name(f"{self.out.name}-native")
            try:
                archive, _, _ = store.get_artifact(job_id=task.job_id, point_id=task.point_id)
                unpack_dir(archive, native)
                report = export_stored(task.format, native, search.model, self.out, metadata=metadata,
                                       model_dir=search.model_path)  # fmt: skip
            finally:
                shutil.rmtree(native, ignore_errors=True)
        else:
            report = export_point(task.format, search.model, space, pmap, self.out, clip=search.options.clip,
                                  metadata=metadata, model_dir=search.model_path)  # fmt: skip
        return {
            "format": report.format,
            "files": list(report.files),
            "quantized": len(report.quantized),
            "dense": len(report.dense),
            "warnings": [self.paths.scrub(w) for w in report.warnings][:50],
        }


def run_export(task: dict[str, Any], config: RunnerConfig, threads: int = 1) -> dict[str, Any]:
    """Run one claimed export in this process (what the dispatcher's Ray task runs); never raises."""
    import torch

    torch.set_num_threads(max(1, int(threads)))
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    parsed = ExportTask.model_validate(task)
    try:
        return PointExporter(parsed, config).run()
    except Exception as exc:  # noqa: BLE001 - reported to the dispatcher, which re-queues the export
        log.exception("export %s: the exporter crashed", parsed)
        return {"status": "crashed", "code": ErrorCode.internal.value,
                "message": sources.ServerPaths(config).scrub(_one_line(exc)), **parsed.model_dump()}  # fmt: skip
