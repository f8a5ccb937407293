"""Progress, heartbeat and cancellation of a running job, at a bounded rate.

The search calls :meth:`Reporter.report` as often as it likes (it only records the latest stage,
fraction and message); a background thread writes them with the heartbeat through
:meth:`service.store.Store.heartbeat` every ``interval_s`` seconds, and sooner (but at most every
``min_interval_s``) when the stage changes, so stage events are not lost between heartbeats.

The heartbeat's answer is the cancel flag: False means a cancel was requested, and
:meth:`Reporter.should_stop` turns True; :class:`~service.store.JobNotOwned` means the job was
taken away from this worker (re-queued as stale, claimed by another): :attr:`Reporter.lost` turns
True and the runner must stop and write nothing more. Database errors are logged and retried at
the next beat: a short outage does not stop a job (a long one makes its heartbeat stale).
"""

from __future__ import annotations

import logging
import threading
import time

from service.store import JobNotOwned, Store

log = logging.getLogger("bitscout.workers.progress")


class Reporter:
    """Throttled progress writer and cancel watcher for one job (see the module docstring)."""

    def __init__(
        self, store: Store, *, job_id: str, worker_id: str, interval_s: float = 2.0, min_interval_s: float = 0.25
    ) -> None:
        self.store = store
        self.job_id = job_id
        self.worker_id = worker_id
        self.interval_s = float(interval_s)
        self.min_interval_s = min(float(min_interval_s), self.interval_s)
        self._lock = threading.Lock()
        self._stage: str | None = None
        self._fraction: float | None = None
        self._message: str | None = None
        self._stage_changed = False
        self._transitions: list[tuple[str, float, str | None]] = []
        self._wake = threading.Event()
        self._stopped = threading.Event()
        self._thread: threading.Thread | None = None
        self.cancel_requested = False
        self.lost = False
        self.beats = 0
        self.errors = 0

    # ---------------------------------------------------------------- the search's side

    def report(self, stage: str, fraction: float, message: str = "") -> None:
        """Record the latest progress (cheap; written by the background thread)."""
        with self._lock:
            if stage != self._stage:
                self._stage_changed = True
                self._transitions.append((stage, fraction, message or None))
            self._stage = stage
            self._fraction = fraction
            self._message = message or None
            wake = self._stage_changed
        if wake:
            self._wake.set()

    def should_stop(self) -> bool:
        """True once a cancel was requested or the job was taken away from this worker."""
        return self.cancel_requested or self.lost

    # ---------------------------------------------------------------- the thread

    def start(self) -> Reporter:
        self._thread = threading.Thread(target=self._loop, name=f"heartbeat-{self.job_id[:8]}", daemon=True)
        self._thread.start()
        return self

    def stop(self, *, flush: bool = False) -> None:
        """Stop the thread (writing the latest progress once more with ``flush``)."""
        self._stopped.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=max(5.0, 2 * self.interval_s))
        if flush and not self.lost:
            self.beat()

    def beat(self) -> bool:
        """Write the heartbeat (and the latest progress) now; returns False once the job must stop.

        Every stage entered since the last beat is written in order first, so that a short stage
        still gets its stage event."""
        with self._lock:
            stage, fraction, message = self._stage, self._fraction, self._message
            transitions, self._transitions = self._transitions[:-1], []
            self._stage_changed = False
        try:
            for t_stage, t_fraction, t_message in transitions:
                self.store.heartbeat(
                    job_id=self.job_id, worker_id=self.worker_id, progress=t_fraction, stage=t_stage, message=t_message
                )
            go_on = self.store.heartbeat(
                job_id=self.job_id, worker_id=self.worker_id, progress=fraction, stage=stage, message=message
            )
        except JobNotOwned as exc:
            log.warning("job %s: no longer ours (%s); stopping", self.job_id, exc.message)
            self.lost = True
            return False
        except Exception as exc:  # noqa: BLE001 - a database blip must not kill the job
            self.errors += 1
            log.warning("job %s: heartbeat failed (%s: %s); retrying", self.job_id, type(exc).__name__, exc)
            return not self.should_stop()
        self.beats += 1
        if not go_on and not self.cancel_requested:
            log.info("job %s: cancel requested", self.job_id)
            self.cancel_requested = True
        return go_on

    def _loop(self) -> None:
        last = 0.0
        while not self._stopped.is_set():
            now = time.monotonic()
            with self._lock:
                urgent = self._stage_changed
            due = last + (self.min_interval_s if urgent else self.interval_s)
            if now >= due:
                self.beat()
                last = time.monotonic()
                if self.lost:
                    return
                continue
            self._wake.wait(timeout=due - now)
            self._wake.clear()
