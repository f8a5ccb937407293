"""The dispatcher: claims queued jobs and runs each on Ray, watches them, recovers lost ones.

One loop (:meth:`Dispatcher.step`, run every ``poll_interval_s`` by :meth:`Dispatcher.start` in a
thread, or by :meth:`Dispatcher.run_forever`):

1. **Stale jobs.** ``Store.requeue_stale`` sends running jobs whose heartbeat is older than
   ``stale_after_s`` back to the queue (or fails them after ``max_attempts`` starts): the path that
   recovers jobs whose worker *and* dispatcher were lost (a node gone, every process killed).
2. **Finished runners.** Each job attempt is a Ray task (:data:`workers.tasks.run_job_task`) with
   the CPUs and GPUs the job asks for. When its reference resolves, the store says what happened:
   a runner that ended the job itself (succeeded, failed, canceled) needs nothing more; a job still
   ``running`` under the runner's claim means the runner died (its worker process was killed, its
   node lost): the job is re-queued at once with the reason, up to ``max_attempts`` starts, then
   failed (Ray's own out-of-memory kill fails it as ``out_of_memory`` directly).
3. **Watching.** A runner Ray has not started yet (waiting for resources or a worker process) gets
   its heartbeat from the dispatcher, so it is not taken for stale, and is dropped from Ray's queue
   if the job is canceled meanwhile; a runner that has not stopped ``cancel_grace_s`` after a
   cancel request (stuck in a long computation) is killed (``ray.cancel(force=True)``) and its job
   marked canceled.
4. **Claiming.** While fewer than ``max_concurrent_jobs`` runners are active, the oldest queued
   job is claimed atomically (``Store.claim_next_job``) under a claim id unique to that start
   (``DISPATCHER_ID/RANDOM``) and its runner task is submitted; a job that asks for more than any
   node of the cluster has fails at once with the reason.

**Exports.** The same loop runs the exports of stored points that downloads asked for
(:meth:`Store.artifact_or_export` writes the row first): at most ``max_concurrent_exports`` at once,
each claimed atomically (``Store.claim_next_export``) under a claim id of its own and run as the Ray
task :data:`workers.tasks.run_export_task` with the job's resources. The dispatcher keeps the
heartbeat of the exports it runs; one whose task ended without storing anything (its worker died)
goes back to pending at once, up to ``max_attempts`` starts, then fails; one whose heartbeat went
stale (its dispatcher was lost too) goes back to pending on the stale path, and a restarted
dispatcher puts back those its previous run held. The store accepts a result only from the claim
that holds the row, so an export is never stored twice.

Every state change is a job event (the store writes ``claimed``, ``requeued``, ``canceled``,
``failed``, ``succeeded``; the dispatcher adds ``dispatched``, ``worker_lost``, ``runner_killed``).

**Restarts.** Ray ties a task to the process that submitted it: when a dispatcher process dies,
its runners die with it. :meth:`Dispatcher.recover` (called by :meth:`start`) therefore re-queues
at once the jobs that this dispatcher's id left ``running`` (instead of waiting for their
heartbeats to go stale); jobs of other dispatchers are left to their owners or to the stale path.
:meth:`stop` stops its runners and re-queues their jobs. A re-run reuses the sensitivity tables
already stored, and the store's ownership checks guarantee that a job's result is stored once.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import ray

from bitscout.errors import ErrorCode, NotFound
from bitscout.schemas import JobStatus
from service.store import ExportNotOwned, ExportTask, JobNotOwned, JobRecord, Store
from workers.settings import RunnerConfig, WorkerSettings
from workers.tasks import run_export_task, run_job_task

log = logging.getLogger("bitscout.workers.dispatcher")

#: stages a job has before its runner reports anything itself
_NOT_STARTED = ("starting",)


@dataclass
class RunnerHandle:
    """A runner this dispatcher watches."""

    job_id: str
    worker_id: str
    attempt: int
    ref: Any
    cpus: float = 1.0
    gpus: float = 0.0
    started: bool = False
    launched_at: float = field(default_factory=time.monotonic)
    last_beat: float = 0.0
    cancel_seen_at: float | None = None
    gone_seen_at: float | None = None


@dataclass
class ExportHandle:
    """An export this dispatcher runs."""

    task: ExportTask
    ref: Any
    launched_at: float = field(default_factory=time.monotonic)

    @property
    def key(self) -> tuple[str, int, str]:
        return (self.task.job_id, self.task.point_id, self.task.format)


class Dispatcher:
    """Claims jobs and exports and runs them on Ray (see the module docstring).

    Args:
        store: the service's store (SQLite or PostgreSQL).
        config: what each runner is handed (database URL, file store, roots, heartbeat rate...).
        settings: the workers' settings (concurrency, intervals, retry limit, dispatcher id).

    Ray must be initialised (:func:`workers.cluster.init_ray`) before :meth:`start`.
    """

    def __init__(self, store: Store, config: RunnerConfig, settings: WorkerSettings) -> None:
        self.store = store
        self.config = config
        self.settings = settings
        self.id = settings.dispatcher_id
        self.handles: dict[str, RunnerHandle] = {}
        #: claim id -> the export it runs
        self.exports: dict[str, ExportHandle] = {}
        self._lock = threading.RLock()
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self._last_stale = 0.0
        self._last_watch = 0.0
        self._recovered = False
        self.errors = 0

    # ------------------------------------------------------------------ life cycle

    @property
    def prefix(self) -> str:
        return f"{self.id}/"

    def new_claim_id(self) -> str:
        return f"{self.prefix}{uuid.uuid4().hex[:12]}"

    def start(self) -> Dispatcher:
        """Recover what a previous run left, then run the loop in a daemon thread."""
        if not self._recovered:
            self.recover()
        self._stop.clear()
        self._thread = threading.Thread(target=self._loop, name="bitscout-dispatcher", daemon=True)
        self._thread.start()
        log.info("dispatcher %s started (at most %d jobs at once)", self.id, self.settings.max_concurrent_jobs)
        return self

    def run_forever(self) -> None:
        """Recover, then run the loop in this thread until :meth:`stop` is called from another
        thread or a signal handler."""
        if not self._recovered:
            self.recover()
        self._loop()

    def wake(self) -> None:
        """Poll the queue now instead of at the next interval."""
        self._wake.set()

    def stop(self, *, timeout_s: float = 30.0) -> list[str]:
        """Stop the loop, stop the runners and send their jobs back to the queue (a re-run reuses
        what they stored). Returns the ids of the jobs re-queued."""
        self._stop.set()
        self._wake.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=timeout_s)
        self._thread = None
        requeued: list[str] = []
        with self._lock:
            handles = list(self.handles.values())
            self.handles.clear()
            exports = list(self.exports.values())
            self.exports.clear()
        for e in exports:
            _cancel(e.ref, force=True)
            try:
                self.store.requeue_exports(worker_id=e.task.worker_id, max_attempts=None,
                                           reason="its dispatcher was stopped")  # fmt: skip
            except Exception as exc:  # noqa: BLE001
                log.warning("export %s: could not put back to pending: %s", e.key, exc)
        for h in handles:
            _cancel(h.ref, force=True)
            try:
                requeued += self.store.requeue_running(worker_id=h.worker_id, reason="its dispatcher was stopped")
            except Exception as exc:  # noqa: BLE001
                log.warning("job %s: could not re-queue: %s", h.job_id, exc)
        log.info("dispatcher %s stopped; re-queued %s", self.id, requeued)
        return requeued

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self.step()
            except Exception:  # noqa: BLE001 - the loop must outlive a database or Ray blip
                self.errors += 1
                log.exception("dispatcher step failed; retrying")
            self._wake.wait(timeout=self.settings.poll_interval_s)
            self._wake.clear()

    # ------------------------------------------------------------------ recovery

    def _running_jobs(self) -> list[JobRecord]:
        out: list[JobRecord] = []
        offset = 0
        while True:
            page = self.store.list_jobs(status=JobStatus.running, limit=200, offset=offset)
            for j in page.items:
                try:
                    out.append(self.store.get_job_record(job_id=j.id))
                except NotFound:
                    continue
            if page.next_offset is None:
                return out
            offset = page.next_offset

    def recover(self) -> list[str]:
        """Re-queue the jobs a previous run of this dispatcher (same id) left running: their
        runners died with it. Returns the ids re-queued (or failed, past the retry limit)."""
        self._recovered = True
        changed: list[str] = []
        for job in self._running_jobs():
            claim = job.claimed_by or ""
            if not claim.startswith(self.prefix) or job.id in self.handles:
                continue
            changed += self.store.requeue_running(
                worker_id=claim,
                max_attempts=self.settings.max_attempts,
                reason="its dispatcher was restarted (its runner stopped with it)",
            )
        if changed:
            log.info("dispatcher %s: re-queued %d job(s) left running by its previous run", self.id, len(changed))
        if not self.exports:
            exports = self.store.requeue_exports(
                worker_prefix=self.prefix, max_attempts=self.settings.max_attempts,
                reason="its dispatcher was restarted (its exporter stopped with it)",
            )  # fmt: skip
            if exports:
                log.info("dispatcher %s: put back %d export(s) left running by its previous run", self.id, len(exports))
        return changed

    # ------------------------------------------------------------------ one iteration

    def step(self) -> None:
        """One pass: stale jobs, finished runners, watching, claiming."""
        with self._lock:
            now = time.monotonic()
            stale_every = min(max(self.settings.stale_after_s / 4, 0.5), 15.0)
            if now - self._last_stale >= stale_every:
                self._last_stale = now
                for job_id in self.store.requeue_stale(
                    older_than_s=self.settings.stale_after_s, max_attempts=self.settings.max_attempts
                ):
                    log.warning("job %s had a stale heartbeat: re-queued (or failed)", job_id)
                    h = self.handles.pop(job_id, None)
                    if h is not None:
                        _cancel(h.ref, force=True)
                stale = set(self.store.requeue_exports(
                    older_than_s=self.settings.stale_after_s, max_attempts=self.settings.max_attempts,
                    reason=f"no heartbeat for more than {self.settings.stale_after_s:g} s",
                ))  # fmt: skip
                for claim, e in list(self.exports.items()):
                    if e.key in stale:
                        self.exports.pop(claim, None)
                        _cancel(e.ref, force=True)
            self._reap()
            self._reap_exports()
            if now - self._last_watch >= min(1.0, self.settings.heartbeat_interval_s):
                self._last_watch = now
                self._watch()
                self.store.beat_exports(worker_ids=list(self.exports))
            self._claim()
            self._claim_exports()

    def _reap(self) -> None:
        if not self.handles:
            return
        by_ref = {h.ref: h for h in self.handles.values()}
        ready, _ = ray.wait(list(by_ref), num_returns=len(by_ref), timeout=0)
        for ref in ready:
            h = by_ref[ref]
            outcome: dict[str, Any] | None = None
            error: BaseException | None = None
            try:
                outcome = ray.get(ref)
            except Exception as exc:  # noqa: BLE001 - the worker died, for whatever reason
                error = exc
            self._finished(h, outcome, error)

    def _finished(self, h: RunnerHandle, outcome: dict[str, Any] | None, error: BaseException | None) -> None:
        self.handles.pop(h.job_id, None)
        try:
            job = self.store.get_job_record(job_id=h.job_id)
        except NotFound:
            return
        if job.status != JobStatus.running or job.claimed_by != h.worker_id:
            log.info("job %s ended: %s", h.job_id, (outcome or {}).get("status", job.status))
            return
        # The job is still running under this runner's claim, but the runner is gone.
        if error is not None and isinstance(error, ray.exceptions.OutOfMemoryError):
            self._fail(h, ErrorCode.out_of_memory.value,
                       "the job's worker was killed for running out of memory; use fewer evaluation or calibration "
                       "rows, a shorter max_length, or ask for more resources")  # fmt: skip
            return
        if error is not None:
            why = _short(error)
        else:
            why = f"the runner ended without finishing the job ({(outcome or {}).get('message')})"
        self._event(h.job_id, "worker_lost", f"runner lost: {why}", data={"worker_id": h.worker_id, "attempt": h.attempt})
        changed = self.store.requeue_running(
            worker_id=h.worker_id, max_attempts=self.settings.max_attempts, reason=f"its Ray worker died: {why}"
        )
        if changed:
            log.warning("job %s: runner lost (%s); re-queued, or failed after %d attempts", h.job_id, why, h.attempt)
            self.wake()

    def _fail(self, h: RunnerHandle, code: str, message: str) -> None:
        try:
            self.store.fail_job(job_id=h.job_id, worker_id=h.worker_id, code=code, message=message)
        except JobNotOwned:
            pass

    def _watch(self) -> None:
        now = time.monotonic()
        for h in list(self.handles.values()):
            try:
                job = self.store.get_job_record(job_id=h.job_id)
            except NotFound:
                self.handles.pop(h.job_id, None)
                _cancel(h.ref, force=True)
                continue
            if job.status != JobStatus.running or job.claimed_by != h.worker_id:
                # Finished (the reference resolves soon) or taken away (the runner stops at its
                # next heartbeat); a runner that lingers is killed.
                h.gone_seen_at = h.gone_seen_at or now
                if now - h.gone_seen_at > self.settings.cancel_grace_s:
                    self.handles.pop(h.job_id, None)
                    _cancel(h.ref, force=True)
                continue
            if not h.started and (job.stage or "starting") not in _NOT_STARTED:
                h.started = True
            if not h.started:
                self._beat_for(h, now)
                continue
            if job.cancel_requested:
                h.cancel_seen_at = h.cancel_seen_at or now
                if now - h.cancel_seen_at > self.settings.cancel_grace_s:
                    self.handles.pop(h.job_id, None)
                    _cancel(h.ref, force=True)
                    self._event(
                        h.job_id, "runner_killed",
                        f"the runner did not stop within {self.settings.cancel_grace_s:g} s of the cancel request; killed",
                    )  # fmt: skip
                    try:
                        self.store.mark_canceled(job_id=h.job_id, worker_id=h.worker_id)
                    except JobNotOwned:
                        pass

    def _beat_for(self, h: RunnerHandle, now: float) -> None:
        """Keep a not-yet-started runner's job fresh; drop it from Ray's queue if canceled."""
        if now - h.last_beat < self.settings.heartbeat_interval_s:
            return
        h.last_beat = now
        try:
            go_on = self.store.heartbeat(
                job_id=h.job_id, worker_id=h.worker_id, message=f"waiting for a Ray worker ({h.cpus:g} CPU, {h.gpus:g} GPU)"
            )
        except JobNotOwned:
            return
        if not go_on:
            self.handles.pop(h.job_id, None)
            _cancel(h.ref, force=True)
            try:
                self.store.mark_canceled(job_id=h.job_id, worker_id=h.worker_id)
            except JobNotOwned:
                pass

    def _claim(self) -> None:
        while len(self.handles) < self.settings.max_concurrent_jobs and not self._stop.is_set():
            claim = self.new_claim_id()
            job = self.store.claim_next_job(worker_id=claim)
            if job is None:
                return
            self._launch(job, claim)

    def _launch(self, job: JobRecord, claim: str) -> None:
        cpus = float(job.spec.resources.cpus)
        gpus = float(job.spec.resources.gpus)
        problem = _infeasible(cpus, gpus) if self.settings.check_resources else None
        if problem:
            self._fail(
                RunnerHandle(job.id, claim, job.attempts, None),
                ErrorCode.invalid_request.value,
                f"the job asks for {problem}; lower resources.cpus / resources.gpus",
            )
            return
        try:
            ref = run_job_task.options(num_cpus=cpus, num_gpus=gpus, name=f"bitscout-job-{job.id[:12]}").remote(
                job.id, claim, self.config, max(1, int(cpus))
            )
        except Exception as exc:
            log.exception("job %s: cannot start its runner on Ray", job.id)
            self.store.requeue_running(
                worker_id=claim, max_attempts=self.settings.max_attempts, reason=f"Ray could not start it: {_short(exc)}"
            )
            raise
        self.handles[job.id] = RunnerHandle(job.id, claim, job.attempts, ref, cpus=cpus, gpus=gpus)
        self._event(
            job.id, "dispatched", f"runner submitted to Ray ({cpus:g} CPU, {gpus:g} GPU)",
            data={"worker_id": claim, "attempt": job.attempts, "cpus": cpus, "gpus": gpus},
        )  # fmt: skip

    # ------------------------------------------------------------------ exports

    def _claim_exports(self) -> None:
        while len(self.exports) < self.settings.max_concurrent_exports and not self._stop.is_set():
            claim = self.new_claim_id()
            task = self.store.claim_next_export(worker_id=claim)
            if task is None:
                return
            self._launch_export(task)

    def _launch_export(self, task: ExportTask) -> None:
        spec = self.store.get_job_record(job_id=task.job_id).spec
        cpus, gpus = float(spec.resources.cpus), float(spec.resources.gpus)
        try:
            ref = run_export_task.options(
                num_cpus=cpus, num_gpus=gpus, name=f"bitscout-export-{task.job_id[:12]}-{task.point_id}"
            ).remote(task.model_dump(), self.config, max(1, int(cpus)))
        except Exception as exc:
            log.exception("export %s: cannot start it on Ray", task)
            self.store.requeue_exports(worker_id=task.worker_id, max_attempts=self.settings.max_attempts,
                                       reason=f"Ray could not start it: {_short(exc)}")  # fmt: skip
            raise
        self.exports[task.worker_id] = ExportHandle(task, ref)
        self._event(
            task.job_id, "export_dispatched",
            f"point {task.point_id} as {task.format}: exporter submitted to Ray ({cpus:g} CPU, {gpus:g} GPU)",
            data={"point": task.point_id, "format": task.format, "worker_id": task.worker_id, "attempt": task.attempts},
        )  # fmt: skip

    def _reap_exports(self) -> None:
        if not self.exports:
            return
        by_ref = {e.ref: e for e in self.exports.values()}
        ready, _ = ray.wait(list(by_ref), num_returns=len(by_ref), timeout=0)
        for ref in ready:
            e = by_ref[ref]
            self.exports.pop(e.task.worker_id, None)
            outcome: dict[str, Any] | None = None
            error: BaseException | None = None
            try:
                outcome = ray.get(ref)
            except Exception as exc:  # noqa: BLE001 - the worker died, for whatever reason
                error = exc
            if error is not None and isinstance(error, ray.exceptions.OutOfMemoryError):
                try:
                    self.store.fail_export(task=e.task, code=ErrorCode.out_of_memory.value,
                                           message="the exporter was killed for running out of memory")  # fmt: skip
                except ExportNotOwned:
                    pass
                continue
            why = _short(error) if error is not None else (
                f"the exporter ended without storing the export ({(outcome or {}).get('message')})")  # fmt: skip
            # A no-op when the exporter stored its result or its failure itself.
            changed = self.store.requeue_exports(worker_id=e.task.worker_id, max_attempts=self.settings.max_attempts,
                                                 reason=f"its Ray worker died: {why}")  # fmt: skip
            if changed:
                log.warning("export %s: exporter lost (%s); put back to pending, or failed", e.key, why)
                self.wake()

    # ------------------------------------------------------------------ helpers

    def _event(self, job_id: str, kind: str, message: str, *, data: dict[str, Any] | None = None) -> None:
        try:
            self.store.add_event(job_id=job_id, kind=kind, message=message, data=data)
        except Exception as exc:  # noqa: BLE001 - best effort
            log.warning("job %s: could not write event %s: %s", job_id, kind, exc)

    def status(self) -> dict[str, Any]:
        """What this dispatcher runs now (for logs and tests)."""
        with self._lock:
            return {
                "id": self.id,
                "running": self.running,
                "jobs": {j: {"worker_id": h.worker_id, "attempt": h.attempt, "started": h.started}
                         for j, h in self.handles.items()},
                "exports": {c: {"job_id": e.task.job_id, "point": e.task.point_id, "format": e.task.format,
                                "attempt": e.task.attempts} for c, e in self.exports.items()},
            }  # fmt: skip


def _cancel(ref: Any, *, force: bool) -> None:
    if ref is None:
        return
    try:
        ray.cancel(ref, force=force)
    except Exception:  # noqa: BLE001, S110 - finished meanwhile
        pass


def _short(exc: BaseException | None) -> str:
    if exc is None:
        return ""
    first = next((ln.strip() for ln in str(exc).splitlines() if ln.strip()), "")
    return f"{type(exc).__name__}: {first[:300]}" if first else type(exc).__name__


def _infeasible(cpus: float, gpus: float) -> str | None:
    """Why no node of the cluster can ever run a job asking for ``cpus`` / ``gpus`` (None: it can)."""
    try:
        nodes = [n for n in ray.nodes() if n.get("Alive")]
    except Exception:  # noqa: BLE001 - unknown: let Ray decide
        return None
    if not nodes:
        return None
    most_cpus = max(float(n.get("Resources", {}).get("CPU", 0.0)) for n in nodes)
    most_gpus = max(float(n.get("Resources", {}).get("GPU", 0.0)) for n in nodes)
    if gpus > most_gpus:
        return f"{gpus:g} GPU(s) but no node of the Ray cluster has more than {most_gpus:g}"
    if cpus > most_cpus:
        return f"{cpus:g} CPU(s) but no node of the Ray cluster has more than {most_cpus:g}"
    return None
