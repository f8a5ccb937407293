"""The job runner: one job, start to end, on a Ray worker.

:class:`JobRunner.run` opens the store, checks that the job is still claimed by this runner's
``worker_id``, finds the model and the data (:mod:`workers.sources`), builds the live search
(:func:`search.local.prepare`, options from :mod:`workers.spec`), stores the search space, then
for each method either reuses the sensitivity table already stored for this space (a re-run after
a lost worker) or computes it and stores it at once; allocates candidates; evaluates every
distinct map in parallel (:class:`workers.pool.EvalPool`); assembles the result and stores every
point and the job's success in ONE transaction (:meth:`service.store.Store.finish_job`).

Progress and the heartbeat go through :class:`workers.progress.Reporter` (a background thread,
bounded rate); cancellation is the heartbeat's answer. Every failure ends the job with an error
code: the search library's errors carry theirs (``exc.code``), running out of memory is
``out_of_memory``, anything else is ``internal`` with a one-line message (the traceback goes to
the worker's log). A runner that lost its job (re-queued as stale, claimed elsewhere) stops and
writes nothing more.

:func:`run_job` is what the dispatcher runs as a Ray task (:data:`run_job_task`); Ray reuses its
worker processes, so a job after the first starts with torch and transformers already imported.
"""

from __future__ import annotations

import inspect
import logging
import os
import shutil
import socket
import time
import traceback
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import ray

from bitscout.errors import BitscoutError, ErrorCode
from bitscout.schemas import JobSpec, JobStatus, RefineSpec
from search.errors import CanceledError, SearchError
from search.local import prepare
from search.pipeline import EXTRA_METHODS, SENSITIVITY_METHODS, Candidate, Search, load_method
from search.result import ParetoPoint, SearchResult, SensitivityTable
from search.space import PrecisionMap
from service.db import make_engine
from service.store import FrontInfo, JobNotOwned, PointRecord, Store
from workers import sources
from workers.pool import EvalPool
from workers.progress import Reporter
from workers.settings import RunnerConfig
from workers.spec import data_options, notes, search_options

log = logging.getLogger("bitscout.workers.runner")

#: fractions of the job's progress: loading, methods (sensitivities, NSGA-II), evaluation,
#: refinement (when asked for), storing
P_LOADED, P_METHODS, P_REFINE, P_EVALUATED = 0.05, 0.6, 0.8, 0.98


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


def error_of(exc: BaseException) -> tuple[str, str]:
    """``(error code, message for the user)`` of an exception that ended a job."""
    if isinstance(exc, SearchError):
        return str(exc.code), str(exc)
    if _is_oom(exc):
        return (
            ErrorCode.out_of_memory.value,
            f"the job ran out of memory ({_one_line(exc)}); use fewer evaluation or calibration rows, a shorter "
            "max_length, or ask for more resources",
        )
    if isinstance(exc, BitscoutError):
        return exc.code.value, exc.message
    return ErrorCode.internal.value, f"internal error in the job runner: {type(exc).__name__}: {_one_line(exc)}"


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
        self._eval_range: tuple[float, float] | None = None
        #: seconds the job's own thread spent writing to / reading from the store (bookkeeping)
        self.store_s = 0.0
        #: point index -> exported model directory (refined points), stored with the points
        self.artifacts: dict[int, Path] = {}

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
                self.store.add_event(job_id=self.job_id, kind=kind, stage=stage, message=message, data=data)
        except Exception as exc:  # noqa: BLE001 - the log is best effort
            log.warning("job %s: could not write event %s: %s", self.job_id, kind, exc)

    def _should_stop(self) -> bool:
        return self.reporter is not None and self.reporter.should_stop()

    def _progress(self, lo: float, hi: float) -> Any:
        rep = self.reporter

        def report(stage: str, fraction: float, message: str) -> None:
            if rep is not None:
                f = min(max(float(fraction), 0.0), 1.0)
                rep.report(stage, lo + (hi - lo) * f, message)

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
            code, message = error_of(exc)
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
            model_dir = sources.model_dir(spec, store, cfg)
            data_src = sources.data_source(spec, store, cfg)
        method_options: dict[str, dict[str, Any]] = {m.value: dict(v) for m, v in spec.method_options.items()}
        if any(m.value == "nsga2" for m in spec.methods):
            studies = Path(cfg.work_dir) / "optuna"
            studies.mkdir(parents=True, exist_ok=True)
            method_options["nsga2"] = {
                **method_options.get("nsga2", {}),
                "storage": f"sqlite:///{studies / f'{self.job_id}.db'}",
                "study_name": f"job-{self.job_id}",
            }
        options = search_options(spec, method_options=method_options)
        search = prepare(model_dir, data_options(spec, data_src), options, task=spec.task.value, device=spec.device.value)
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
            stored = {
                str(t.get("method")): t for t in store.get_sensitivity_tables(job_id=self.job_id, space_key=space_key)
            }

        tables: list[SensitivityTable] = []
        cands: list[Candidate] = []
        methods = list(options.methods)
        step = (P_METHODS - P_LOADED) / max(1, len(methods))
        for i, method in enumerate(methods):
            if self._should_stop():
                raise CanceledError("search canceled")
            lo, hi = P_LOADED + i * step, P_LOADED + (i + 1) * step
            if method in SENSITIVITY_METHODS:
                table = self._sensitivity(search, method, stored.get(method), space_key, lo, hi)
                tables.append(table)
                cands.extend(search.candidates(table))
            else:
                cands.extend(self._extra_method(search, method, lo, hi))
        cands.extend(search.uniform_candidates())

        eval_end = P_REFINE if spec.refine is not None else P_EVALUATED
        points = self._evaluate(search, cands, eval_end)
        result = search.assemble(points, tables)
        refined_from: dict[int, int] = {}
        if spec.refine is not None:
            extra = self._refine(search, result, spec.refine, eval_end, P_EVALUATED)
            if extra:
                for origin, point, artifact in extra:
                    refined_from[len(points)] = origin
                    if artifact is not None:
                        self.artifacts[len(points)] = artifact
                    points.append(point)
                result = search.assemble(points, tables)  # the front and the recommendation, refined points included
        rep.report("storing", P_EVALUATED, f"storing {len(points)} points")
        on_front = {id(p) for p in result.front}
        point_dicts = [
            {**p.to_dict(), "on_front": id(p) in on_front, **({"refined_from": refined_from[i]} if i in refined_from else {})}
            for i, p in enumerate(result.points)
        ]
        front_info: dict[str, Any] = {
            "metric": result.metric,
            "higher_is_better": result.higher_is_better,
            "baseline_metrics": result.baseline_metrics,
            "recommended": result.info.get("recommended"),
            "timings": result.timings,
            "versions": result.versions,
            "methods": methods,
            "groups": result.info.get("groups"),
            "granularity": result.info.get("granularity"),
            "space_key": space_key,
            "evaluation": self.pool.summary() if self.pool is not None else {},
        }
        nsga2_info = getattr(search, "nsga2_info", None)
        if nsga2_info:
            front_info["nsga2"] = nsga2_info
        return point_dicts, front_info

    def _sensitivity(
        self, search: Search, method: str, stored: dict[str, Any] | None, space_key: str, lo: float, hi: float
    ) -> SensitivityTable:
        assert self.store is not None  # noqa: S101
        if stored is not None:
            try:
                table = SensitivityTable.from_dict(stored)
            except (KeyError, TypeError, ValueError) as exc:
                log.warning("job %s: stored %s table unreadable (%s); recomputing", self.job_id, method, exc)
            else:
                self._event(
                    "sensitivity_reused",
                    f"{method} sensitivity table reused from an earlier attempt (not recomputed)",
                    stage=f"sensitivity:{method}",
                    data={"method": method, "space_key": space_key},
                )
                return table
        t0 = time.perf_counter()
        table = search.sensitivity(method, on_progress=self._progress(lo, hi), should_stop=self._should_stop)
        seconds = time.perf_counter() - t0
        with self._books():
            self.store.put_sensitivity(job_id=self.job_id, method=method, table=table.to_dict(), space_key=space_key)
        self._event(
            "sensitivity_stored",
            f"{method} sensitivity computed in {seconds:.1f} s and stored",
            stage=f"sensitivity:{method}",
            data={"method": method, "seconds": seconds, "space_key": space_key, "samples": table.samples},
        )
        return table

    def _get_pool(self, search: Search) -> EvalPool:
        if self.pool is None:
            rep = self.reporter
            self.pool = EvalPool(
                search,
                size=self.config.eval_workers,
                cpus=self.config.eval_cpus,
                should_stop=self._should_stop,
                on_result=None if rep is None else self._eval_progress,
            )
        return self.pool

    def _eval_progress(self, done: int, total: int) -> None:
        rep = self.reporter
        if rep is not None and self._eval_range is not None:
            lo, hi = self._eval_range
            rep.report("evaluate", lo + (hi - lo) * done / max(1, total), f"evaluated {done}/{total} maps")

    def _extra_method(self, search: Search, method: str, lo: float, hi: float) -> list[Candidate]:
        load_method(method)
        fn = EXTRA_METHODS[method]
        kwargs: dict[str, Any] = {"on_progress": self._progress(lo, hi), "should_stop": self._should_stop}
        params = inspect.signature(fn).parameters
        if "evaluate_many" in params or any(p.kind is p.VAR_KEYWORD for p in params.values()):
            pool = self._get_pool(search)
            self._eval_range = None  # the method reports its own progress
            kwargs["evaluate_many"] = pool.evaluate_many
        t0 = time.perf_counter()
        out = fn(search, **kwargs)
        info = getattr(search, f"{method}_info", None) or {}
        self._event(
            "method",
            f"{method}: {len(out)} candidate maps in {time.perf_counter() - t0:.1f} s"
            + (f" ({info.get('evaluated')} maps evaluated, {info.get('resumed', 0)} reused)" if info else ""),
            stage=method,
            data={"method": method, **({k: v for k, v in info.items() if isinstance(v, int | float | str)})},
        )
        return list(out)

    def _refine(
        self, search: Search, result: SearchResult, spec: RefineSpec, lo: float, hi: float
    ) -> list[tuple[int, ParetoPoint, Path | None]]:
        """Fine-tune the chosen points (the recommended one, or the ``k`` best front points that meet
        the budget); returns
        ``(index of the origin point, refined point, its exported model)``. The refined weights exist
        nowhere else, so each refined point is exported (packed weights with the learned step sizes)
        into the work directory and stored as the point's artifact. Checkpoints go to the work
        directory too, so a re-run after a lost worker resumes them."""
        from search.export import export_artifact
        from search.refine import RefineConfig, refine

        points = result.points
        if spec.points == "recommended":
            rec = result.info.get("recommended")
            chosen = [rec] if isinstance(rec, int) else []
            if not chosen:
                self._event("note", "no point meets the budget: nothing to refine", stage="refine")
        else:
            sign = 1.0 if result.higher_is_better else -1.0
            ids = {id(p): i for i, p in enumerate(points)}
            # the k best front points the user can use: those that meet the job's budget (refining a
            # point far over the budget, which is already close to full precision, buys nothing)
            budget = search.options.budget
            front = [
                p for p in result.front
                if p.method != "uniform" and result.metric in p.metrics and (budget.empty or budget.is_feasible(p.cost))
            ]  # fmt: skip
            front.sort(key=lambda p: -sign * p.metrics[result.metric])
            if not front:
                self._event("note", "no front point meets the budget: nothing to refine", stage="refine")
            chosen = [ids[id(p)] for p in front[: int(spec.points)]]
        out: list[tuple[int, ParetoPoint, Path | None]] = []
        step = (hi - lo) / max(1, len(chosen))
        # early stopping selects on held-back calibration batches, never on the evaluation rows the
        # refined point's metrics are reported on (selecting there would flatter the result)
        train, validation = split_validation(search.calibration)
        for k, i in enumerate(chosen):
            if self._should_stop():
                raise CanceledError("search canceled")
            origin = points[i]
            ckpt = Path(self.config.work_dir) / "refine" / self.job_id / f"point-{i}"
            t_refine = time.perf_counter()
            res = refine(
                search,
                origin.precision_map,
                config=RefineConfig(steps=spec.steps, seed=search.options.seed),
                train_batches=train,
                validation_batches=validation,
                on_progress=self._progress(lo + k * step, lo + (k + 1) * step),
                should_stop=self._should_stop,
                checkpoint_dir=ckpt,
            )
            seconds = time.perf_counter() - t_refine
            refined = res.point(origin)
            art: Path | None = ckpt.parent / f"artifact-{i}"
            try:
                shutil.rmtree(art, ignore_errors=True)
                export_artifact(
                    res.model, search.space, origin.precision_map, art, clip=search.options.clip,
                    qparams=res.qparams, model_dir=getattr(search, "model_path", None),
                    metadata={"metrics": dict(res.metrics), "cost": refined.cost.to_dict(), "task": search.task,
                              "refined": True, "refined_from": i, "steps": res.steps, "best_step": res.best_step},
                )  # fmt: skip
            except (SearchError, OSError) as exc:
                log.warning("job %s: the refined point of %d was not exported: %s", self.job_id, i, exc)
                self._event("note", f"the refined point of point {i} could not be exported: {_one_line(exc)}",
                            stage="refine")  # fmt: skip
                art = None
            out.append((i, refined, art))
            m = result.metric
            self._event(
                "refined",
                f"point {i} refined in {seconds:.1f} s ({res.steps} steps): {m} "
                f"{origin.metrics.get(m, float('nan')):.4g} -> {res.metrics.get(m, float('nan')):.4g}",
                stage="refine",
                data={"point": i, "steps": res.steps, "best_step": res.best_step, "resumed_from": res.resumed_from,
                      "seconds": seconds, "metrics": dict(res.metrics), "initial_metrics": dict(res.initial_metrics),
                      "exported": art is not None},
            )
        return out

    def _evaluate(self, search: Search, cands: list[Candidate], end: float = P_EVALUATED) -> list[ParetoPoint]:
        rep = self.reporter
        assert rep is not None  # noqa: S101
        unique: dict[tuple[PrecisionMap, str], Candidate] = {}
        for c in cands:
            unique.setdefault((c.precision_map, c.method), c)
        known: dict[PrecisionMap, dict[str, float]] = {}
        for c in unique.values():
            if c.metrics is not None:
                known.setdefault(c.precision_map, dict(c.metrics))
        todo = list(dict.fromkeys(c.precision_map for c in unique.values() if c.precision_map not in known))
        rep.report("evaluate", P_METHODS, f"evaluating {len(todo)} maps")
        t0 = time.perf_counter()
        search.baseline()
        if todo:
            pool = self._get_pool(search)
            self._eval_range = (P_METHODS, end)
            for pmap, metrics in zip(todo, pool.evaluate_many(todo), strict=True):
                known[pmap] = metrics
        search.timings["evaluation"] = time.perf_counter() - t0
        if self.pool is not None:
            summary = self.pool.summary()
            self._event(
                "evaluated",
                f"{len(todo)} maps evaluated in {search.timings['evaluation']:.1f} s on "
                f"{len(summary['processes'])} process(es)",
                stage="evaluate",
                data=summary,
            )
        return [
            ParetoPoint(
                precision_map=c.precision_map,
                cost=search.cost_model.cost(c.precision_map),
                metrics=known[c.precision_map],
                method=c.method,
                label=c.label,
                predicted=c.predicted,
                budget=c.budget,
            )
            for c in unique.values()
        ]


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
        return Outcome("crashed", job_id, worker_id, ErrorCode.internal.value, _one_line(exc)).to_dict()


#: The Ray task the dispatcher starts for each job attempt. Ray does not retry it: a lost worker
#: is the dispatcher's to handle (re-queue up to the retry limit, reusing what was stored).
run_job_task = ray.remote(max_retries=0, retry_exceptions=False)(run_job)


def split_validation(batches: Sequence[Any]) -> tuple[list[Any], list[Any]]:
    """Calibration batches split for refinement: training batches and the last quarter (at least one
    batch) held back for early stopping; with a single batch it serves both."""
    batches = list(batches)
    if len(batches) < 2:
        return batches, batches
    k = max(1, len(batches) // 4)
    return batches[:-k], batches[-k:]
