"""The job runner: one job, start to end, on a Ray worker.

:class:`JobRunner.run` opens the store, checks that the job is still claimed by this runner's
``worker_id``, finds the model and the data (:mod:`workers.sources`), builds the live search
(:func:`search.local.prepare`, options from :mod:`workers.spec`), stores the search space, and
runs the search's one orchestration (:func:`search.orchestration.run_search`) with the job's
parts swapped in: sensitivity tables read from and stored to the store as soon as they exist (a
re-run after a lost worker reuses them), evaluation on a Ray pool (:class:`workers.pool.EvalPool`),
progress and events into the job, NSGA-II's study in the work directory, and each refined point
exported as an artifact. It then stores every point and the job's success in ONE transaction
(:meth:`service.store.Store.finish_job`). The runner keeps only the job's books.

Progress and the heartbeat go through :class:`workers.progress.Reporter` (a background thread,
bounded rate); cancellation is the heartbeat's answer. Every failure ends the job with an error
code: the search library's errors carry theirs (``exc.code``, the field named by the job spec's
path), running out of memory is ``out_of_memory``, anything else is ``internal`` with a one-line
message (the traceback goes to the worker's log). Messages name the user's inputs as the user
knows them, never the server's paths (:class:`workers.sources.ServerPaths`). A runner that lost its job (re-queued as stale, claimed elsewhere) stops and
writes nothing more.

:func:`run_job` is what the dispatcher's Ray task (:data:`workers.tasks.run_job_task`) runs; Ray
reuses its worker processes, so a job after the first starts with torch and transformers already
imported.
"""

from __future__ import annotations

import logging
import os
import shutil
import socket
import time
import traceback
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bitscout.errors import BitscoutError, ErrorCode
from bitscout.schemas import JobSpec, JobStatus
from search.errors import CanceledError, SearchError
from search.local import DataOptions, prepare
from search.orchestration import SearchHooks, run_search
from search.pipeline import Search, SearchOptions
from search.result import ParetoPoint, SensitivityTable
from search.space import PrecisionMap
from service.db import make_engine
from service.store import FrontInfo, JobNotOwned, PointRecord, Store
from workers import sources
from workers.pool import EvalPool, ScorePool
from workers.progress import Reporter
from workers.settings import RunnerConfig
from workers.spec import data_options, notes, search_options, wire_field

log = logging.getLogger("bitscout.workers.runner")

#: fractions of the job's progress: loading up to P_LOADED, the search's stages
#: (:func:`search.orchestration.run_search`) up to P_EVALUATED, then storing
P_LOADED, P_EVALUATED = 0.05, 0.98


@dataclass
class Outcome:
    """How a run ended: ``succeeded``, ``failed``, ``canceled``, or ``lost`` (the job was taken
    away, or was no longer this runner's when it started)."""

    status: str
    job_id: str
    worker_id: str
    code: str | None = None
    message: str | None = None
    pid: int = field(default_factory=os.getpid)
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "status": self.status,
            "job_id": self.job_id,
            "worker_id": self.worker_id,
            "code": self.code,
            "message": self.message,
            "pid": self.pid,
            "seconds": self.seconds,
        }


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:500] if text else type(exc).__name__


def _is_oom(exc: BaseException) -> bool:
    if isinstance(exc, MemoryError):
        return True
    try:
        import torch

        if isinstance(exc, torch.cuda.OutOfMemoryError):
            return True
    except Exception:  # noqa: BLE001, S110 - torch without CUDA support
        pass
    return isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower()


def error_of(exc: BaseException, spec: JobSpec | None = None) -> tuple[str, str]:
    """``(error code, message for the user)`` of an exception that ended a job; a search error's
    field is named by the job spec's path (``space.include``, :func:`workers.spec.wire_field`)
    when ``spec`` is given."""
    if isinstance(exc, SearchError):
        field = exc.field if spec is None else wire_field(spec, exc.field)
        return str(exc.code), f"{field}: {exc.message}" if field else exc.message
    if _is_oom(exc):
        return (
            ErrorCode.out_of_memory.value,
            f"the job ran out of memory ({_one_line(exc)}); use fewer evaluation or calibration rows, a shorter "
            "max_length, or ask for more resources",
        )
    if isinstance(exc, BitscoutError):
        return exc.code.value, exc.message
    return ErrorCode.internal.value, f"internal error in the job runner: {type(exc).__name__}: {_one_line(exc)}"


@dataclass(frozen=True)
class JobInputs:
    """What a job's search is built from: the model directory, the data options and the search options."""

    model_dir: Path
    data: DataOptions
    options: SearchOptions


def job_inputs(spec: JobSpec, store: Store, config: RunnerConfig, paths: sources.ServerPaths) -> JobInputs:
    """A job's model and data found on this worker (:mod:`workers.sources`, store reads only) and its
    options; ``paths`` learns what the user calls the server's paths, so messages name them as the user
    knows them."""
    model_name, data_name = sources.model_name(spec, store), sources.data_name(spec, store)
    model_dir = sources.model_dir(spec, store, config)
    paths.name(model_dir, model_name)
    data_src = sources.data_source(spec, store, config)
    if data_name is not None:
        paths.name(data_src, data_name)
    table = sources.latency_table(spec, store)
    options = search_options(spec, latency_table=table)
    return JobInputs(Path(model_dir), data_options(spec, data_src, name=data_name), options)


def prepare_job(spec: JobSpec, inputs: JobInputs) -> Search:
    """The live search of a job (:func:`search.local.prepare`: the model and the data loaded, split and
    tokenized as the spec says). The job runner and the export of a stored point
    (:mod:`workers.exporter`) build the same search from the same spec."""
    return prepare(inputs.model_dir, inputs.data, inputs.options, task=spec.task.value, device=spec.device.value)


class JobRunner:
    """Runs one claimed job (see the module docstring)."""

    def __init__(self, job_id: str, worker_id: str, config: RunnerConfig, *, store: Store | None = None) -> None:
        self.job_id = job_id
        self.worker_id = worker_id
        self.config = config
        self._own_store = store is None
        self.store = store
        self.reporter: Reporter | None = None
        self.pool: EvalPool | None = None
        self.spec: JobSpec | None = None
        self.where = f"{socket.gethostname()}:{os.getpid()}"
        #: seconds the job's own thread spent writing to / reading from the store (bookkeeping)
        self.store_s = 0.0
        #: origin point index -> exported model directory of its refined point
        self._refined_artifacts: dict[int, Path] = {}
        #: point index -> exported model directory (refined points), stored with the points
        self.artifacts: dict[int, Path] = {}
        #: what the job's messages call the server's paths (the user never reads them)
        self.paths = sources.ServerPaths(config)

    @contextmanager
    def _books(self) -> Iterator[None]:
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.store_s += time.perf_counter() - t0

    # ---------------------------------------------------------------- helpers

    def _event(self, kind: str, message: str, *, stage: str | None = None, data: dict[str, Any] | None = None) -> None:
        assert self.store is not None  # noqa: S101
        try:
            with self._books():
                self.store.add_event(
                    job_id=self.job_id, kind=kind, stage=stage, message=self.paths.scrub(message), data=data
                )
        except Exception as exc:  # noqa: BLE001 - the log is best effort
            log.warning("job %s: could not write event %s: %s", self.job_id, kind, exc)

    def _should_stop(self) -> bool:
        return self.reporter is not None and self.reporter.should_stop()

    def _progress(self, lo: float, hi: float) -> Any:
        rep = self.reporter
        scrub = self.paths.scrub

        def report(stage: str, fraction: float, message: str) -> None:
            if rep is not None:
                f = min(max(float(fraction), 0.0), 1.0)
                rep.report(stage, lo + (hi - lo) * f, scrub(message))

        return report

    # ---------------------------------------------------------------- the run

    def run(self) -> Outcome:
        t0 = time.perf_counter()
        if self.store is None:
            self.store = Store(make_engine(self.config.database_url, pool_size=3), blob_dir=self.config.blob_dir)
        try:
            outcome = self._run()
        finally:
            if self._own_store:
                self.store.close()
        outcome.seconds = time.perf_counter() - t0
        return outcome

    def _run(self) -> Outcome:
        store = self.store
        assert store is not None  # noqa: S101
        try:
            job = store.get_job_record(job_id=self.job_id)
        except Exception as exc:  # noqa: BLE001
            log.error("job %s: cannot read the job: %s", self.job_id, exc)
            return Outcome("lost", self.job_id, self.worker_id, message=_one_line(exc))
        if job.status != JobStatus.running or job.claimed_by != self.worker_id:
            log.warning("job %s is %s under %s, not ours (%s)", self.job_id, job.status, job.claimed_by, self.worker_id)
            return Outcome("lost", self.job_id, self.worker_id, message="not claimed by this runner")
        self.reporter = Reporter(
            store, job_id=self.job_id, worker_id=self.worker_id, interval_s=self.config.heartbeat_interval_s
        )
        self.reporter.report("loading", 0.0, f"runner started on {self.where}")
        self.reporter.start()
        self._event(
            "runner",
            f"runner started on {self.where} (attempt {job.attempts})",
            stage="starting",
            data={"pid": os.getpid(), "host": socket.gethostname(), "attempt": job.attempts, "worker_id": self.worker_id},
        )
        try:
            t_search = time.perf_counter()
            result = self._search(job.spec)
            # What orchestration costs inside the runner, for the benchmark: the search's own time is
            # the job thread's time minus its store calls (the heartbeat thread runs alongside).
            result[1]["orchestration"] = {
                "runner_search_s": time.perf_counter() - t_search - self.store_s,
                "runner_store_s": self.store_s,
                "heartbeats": self.reporter.beats,
            }
            if self.reporter.should_stop():
                raise CanceledError("search canceled")
            self.reporter.stop(flush=True)  # the last stages' events, before the result
            points, front_info = result
            store.finish_job(
                job_id=self.job_id, worker_id=self.worker_id,
                points=[PointRecord.model_validate(p) for p in points],
                front_info=FrontInfo.model_validate(front_info),
                artifacts=self.artifacts,
            )  # fmt: skip
            shutil.rmtree(Path(self.config.work_dir) / "refine" / self.job_id, ignore_errors=True)
            return Outcome("succeeded", self.job_id, self.worker_id)
        except JobNotOwned as exc:
            return Outcome("lost", self.job_id, self.worker_id, message=exc.message)
        except Exception as exc:  # noqa: BLE001 - every failure ends the job with a code
            return self._ended_by(exc)
        finally:
            if self.pool is not None:
                self.pool.close()
            self.reporter.stop()

    def _ended_by(self, exc: Exception) -> Outcome:
        store = self.store
        rep = self.reporter
        assert store is not None and rep is not None  # noqa: S101
        if rep.lost:
            return Outcome("lost", self.job_id, self.worker_id, message="the job was taken away from this runner")
        canceled = isinstance(exc, CanceledError) or rep.cancel_requested
        try:
            if canceled:
                store.mark_canceled(job_id=self.job_id, worker_id=self.worker_id)
                return Outcome("canceled", self.job_id, self.worker_id, code=ErrorCode.canceled.value)
            code, message = error_of(exc, self.spec)
            message = self.paths.scrub(message)
            if code == ErrorCode.internal.value:
                log.error("job %s failed:\n%s", self.job_id, "".join(traceback.format_exception(exc)))
            else:
                log.info("job %s failed: %s: %s", self.job_id, code, message)
            store.fail_job(job_id=self.job_id, worker_id=self.worker_id, code=code, message=message)
            return Outcome("failed", self.job_id, self.worker_id, code=code, message=message)
        except JobNotOwned as lost:
            return Outcome("lost", self.job_id, self.worker_id, message=lost.message)

    def _search(self, spec: JobSpec) -> tuple[list[dict[str, Any]], dict[str, Any]]:
        store, rep, cfg = self.store, self.reporter, self.config
        assert store is not None and rep is not None  # noqa: S101
        self.spec = spec
        for note in notes(spec):
            self._event("note", note)
        rep.report("loading", 0.0, "loading the model and the data")
        t_load = time.perf_counter()
        with self._books():
            inputs = job_inputs(spec, store, cfg, self.paths)
        search = prepare_job(spec, inputs)
        options = inputs.options
        self._event(
            "loaded",
            f"model and data loaded in {time.perf_counter() - t_load:.1f} s: {len(search.space.groups)} groups, "
            f"{sum(len(b) for b in search.calibration)} calibration and {sum(len(b) for b in search.evaluation)} "
            "evaluation sequences",
            stage="loading",
        )
        rep.report("loading", P_LOADED, "model and data loaded")
        with self._books():
            space_key = store.put_space(job_id=self.job_id, space=search.space_dict())
        result = run_search(search, self._hooks(search, space_key))
        rep.report("storing", P_EVALUATED, f"storing {len(result.points)} points")
        on_front = {id(p) for p in result.front}
        point_dicts = [{**p.to_dict(), "on_front": id(p) in on_front} for p in result.points]
        self.artifacts = {
            i: self._refined_artifacts[p.refined_from] for i, p in enumerate(result.points)
            if p.refined and p.refined_from in self._refined_artifacts
        }  # fmt: skip
        front_info: dict[str, Any] = {
            "metric": result.metric,
            "higher_is_better": result.higher_is_better,
            "baseline_metrics": result.baseline_metrics,
            "recommended": result.info.get("recommended"),
            "timings": result.timings,
            "versions": result.versions,
            "methods": list(options.methods),
            "groups": result.info.get("groups"),
            "granularity": result.info.get("granularity"),
            "space_key": space_key,
            "evaluation": self.pool.summary() if self.pool is not None else {},
            "loop": result.info.get("loop", {"enabled": False}),
        }
        nsga2_info = getattr(search, "nsga2_info", None)
        if nsga2_info:
            front_info["nsga2"] = nsga2_info
        return point_dicts, front_info

    def _hooks(self, search: Search, space_key: str) -> SearchHooks:
        """What the job swaps into the search's one orchestration: the store's tables, the Ray pool,
        progress into the job's share, the job's log, NSGA-II's resumable study, and the export of
        refined points (the job's artifacts)."""
        store, rep, cfg = self.store, self.reporter, self.config
        assert store is not None and rep is not None  # noqa: S101
        with self._books():
            stored = {
                str(t.get("method")): t for t in store.get_sensitivity_tables(job_id=self.job_id, space_key=space_key)
            }
        settings: dict[str, dict[str, Any]] = {}
        if "nsga2" in search.options.methods:
            studies = Path(cfg.work_dir) / "optuna"
            studies.mkdir(parents=True, exist_ok=True)
            settings["nsga2"] = {"storage": f"sqlite:///{studies / f'{self.job_id}.db'}", "study_name": f"job-{self.job_id}"}
        return SearchHooks(
            tables=_JobTables(self, stored, space_key),
            evaluator=_LazyPool(self, search),
            scorer=_LazyScorer(self, search),
            on_progress=self._progress(P_LOADED, P_EVALUATED),
            should_stop=self._should_stop,
            on_event=self._event,
            method_settings=settings,
            refine_dir=Path(cfg.work_dir) / "refine" / self.job_id,
            on_refined=lambda i, res, point: self._export_refined(search, i, res, point),
        )

    def _get_pool(self, search: Search) -> EvalPool:
        if self.pool is None:
            self.pool = EvalPool(search, size=self.config.eval_workers, cpus=self.config.eval_cpus,
                                 should_stop=self._should_stop)  # fmt: skip
        return self.pool

    def _export_refined(self, search: Search, origin: int, res: Any, refined: ParetoPoint) -> bool:
        """Export a refined point (packed weights with the learned step sizes) into the work
        directory; it becomes the point's artifact when the points are stored (the refined weights
        exist nowhere else). False when it could not be exported."""
        from search.export import export_artifact

        art = Path(self.config.work_dir) / "refine" / self.job_id / f"artifact-{origin}"
        try:
            shutil.rmtree(art, ignore_errors=True)
            export_artifact(
                res.model, search.space, refined.precision_map, art, clip=search.options.clip,
                qparams=res.qparams, tt_cores=getattr(res, "tt_cores", None) or None, model_dir=getattr(search, "model_path", None),
                metadata={"metrics": dict(res.metrics), "cost": refined.cost.to_dict(), "task": search.task,
                          "refined": True, "refined_from": origin, "steps": res.steps, "best_step": res.best_step},
            )  # fmt: skip
        except (SearchError, OSError) as exc:
            log.warning("job %s: the refined point of %d was not exported: %s", self.job_id, origin, exc)
            self._event("note", f"the refined point of point {origin} could not be exported: {_one_line(exc)}",
                        stage="refine")  # fmt: skip
            return False
        self._refined_artifacts[origin] = art
        return True


class _JobTables:
    """The job's sensitivity tables in the store (:class:`search.orchestration.TableStore`): a table
    stored by an earlier attempt for the same space is reused."""

    def __init__(self, runner: JobRunner, stored: dict[str, dict[str, Any]], space_key: str) -> None:
        self.runner, self.stored, self.space_key = runner, stored, space_key

    def load(self, method: str) -> SensitivityTable | None:
        raw = self.stored.get(method)
        if raw is None:
            return None
        try:
            return SensitivityTable.from_dict(raw)
        except (KeyError, TypeError, ValueError) as exc:
            log.warning("job %s: stored %s table unreadable (%s); recomputing", self.runner.job_id, method, exc)
            return None

    def save(self, table: SensitivityTable) -> None:
        store = self.runner.store
        assert store is not None  # noqa: S101
        with self.runner._books():
            store.put_sensitivity(job_id=self.runner.job_id, method=table.method, table=table.to_dict(),
                                  space_key=self.space_key)  # fmt: skip


class _LazyScorer:
    """The job's :class:`~workers.pool.ScorePool`: the search is shipped once, for the scoring and
    the evaluation's tasks alike."""

    def __init__(self, runner: JobRunner, search: Search) -> None:
        self.runner, self.search = runner, search

    def score(self, method: str, *, on_progress: Any = None) -> SensitivityTable | None:
        cfg = self.runner.config
        pool = ScorePool(self.search, self.runner._get_pool(self.search)._ship, size=cfg.eval_workers,
                         cpus=cfg.eval_cpus, should_stop=self.runner._should_stop)  # fmt: skip
        table = pool.score(method, on_progress=on_progress)
        if table is not None:
            where = pool.placement.get(method, {})
            self.runner._event("sensitivity_split", f"{method} sensitivity scored in {len(where)} processes "
                               f"({', '.join(f'{n} batches' for n in where.values())})",
                               stage=f"sensitivity:{method}", data={"method": method, "processes": where})  # fmt: skip
        return table


class _LazyPool:
    """The job's :class:`~workers.pool.EvalPool`, started on first use."""

    def __init__(self, runner: JobRunner, search: Search) -> None:
        self.runner, self.search = runner, search

    def evaluate_many(self, maps: list[PrecisionMap], *, on_result: Any = None) -> list[dict[str, float]]:
        return self.runner._get_pool(self.search).evaluate_many(maps, on_result=on_result)

    def summary(self) -> dict[str, Any]:
        pool = self.runner.pool
        return pool.summary() if pool is not None else {}


def run_job(job_id: str, worker_id: str, config: RunnerConfig, threads: int = 1) -> dict[str, Any]:
    """Run one job attempt in this process; returns its :class:`Outcome` as a dict (never raises)."""
    import torch

    torch.set_num_threads(max(1, int(threads)))
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return JobRunner(job_id, worker_id, config).run().to_dict()
    except Exception as exc:  # noqa: BLE001 - reported to the dispatcher, which re-queues the job
        log.exception("job %s: the runner crashed", job_id)
        message = sources.ServerPaths(config).scrub(_one_line(exc))
        return Outcome("crashed", job_id, worker_id, ErrorCode.internal.value, message).to_dict()
