"""Parallel evaluation of candidate maps: the runner plus Ray tasks across the cluster.

The live search (model, evaluation batches and the full-precision reference outputs) is put in
Ray's object store once per job; each evaluation is a small Ray task (:data:`evaluate_map_task`)
that finds the search in its worker's cache, or fetches it once, and evaluates one map. Ray reuses
its worker processes, so a worker deserialises the model once per job, not once per map: in effect
a pool of workers that hold the model once, sized by Ray's scheduler.

:meth:`EvalPool.evaluate_many` keeps at most ``size`` tasks in flight (``eval_workers``; each asks
for ``eval_cpus`` CPUs) and evaluates maps in the runner's own process at the same time, so it
makes progress even when the cluster has no room for a single task (two jobs on two CPUs, say):
the tasks are an addition, never a requirement. A task whose worker died has its map evaluated
again; an error raised inside an evaluation is raised in the runner as it was raised in the task.
Tasks still out when the list is done (or the job canceled) are
left to finish their one map, never interrupted: an interrupt that lands in an import would break
the worker process, which Ray reuses.

A worker's cached search is dropped when a task of another job arrives, or after
:data:`CACHE_TTL_S` idle seconds. Searches on a GPU are not shipped (a cached model would hold GPU
memory in an idle worker): the runner evaluates them alone.

:class:`ScorePool` splits a sensitivity stage the same way: parts of the calibration batches in Ray
tasks and in the runner, combined into the table one process computes.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

import ray

from search.errors import CanceledError
from search.pipeline import Search
from search.space import PrecisionMap

log = logging.getLogger("bitscout.workers.pool")

Metrics = dict[str, float]

#: seconds an idle worker keeps a job's search in memory
CACHE_TTL_S = 60.0

_cache: dict[str, Any] = {"key": None, "search": None, "used": 0.0}
_cache_lock = threading.Lock()
_janitor: threading.Thread | None = None


def _janitor_loop() -> None:
    while True:
        time.sleep(CACHE_TTL_S / 4)
        with _cache_lock:
            if _cache["search"] is not None and time.monotonic() - _cache["used"] > CACHE_TTL_S:
                _cache.update(key=None, search=None)


def _cached_search(holder: list[Any]) -> Search:
    global _janitor
    ref = holder[0]
    key = ref.hex()
    with _cache_lock:
        if _cache["key"] == key and _cache["search"] is not None:
            _cache["used"] = time.monotonic()
            return _cache["search"]  # type: ignore[no-any-return]
        _cache.update(key=None, search=None)
    search = ray.get(ref)
    with _cache_lock:
        _cache.update(key=key, search=search, used=time.monotonic())
        if _janitor is None:
            _janitor = threading.Thread(target=_janitor_loop, name="bitscout-eval-cache", daemon=True)
            _janitor.start()
    return search  # type: ignore[no-any-return]


def evaluate_map(holder: list[Any], pmap: dict[str, Any], threads: int = 1) -> tuple[Metrics, str]:
    """Evaluate one map with the search in ``holder[0]`` (an ObjectRef, wrapped in a list so Ray
    does not fetch it before the cache is consulted); returns the metrics and ``host:pid``."""
    import torch

    torch.set_num_threads(max(1, int(threads)))
    search = _cached_search(holder)
    return search.evaluate(PrecisionMap.from_dict(pmap)), f"{socket.gethostname()}:{os.getpid()}"


evaluate_map_task = ray.remote(max_retries=0, retry_exceptions=False)(evaluate_map)


def sensitivity_part(holder: list[Any], method: str, batch_ids: list[int], threads: int = 1) -> tuple[Any, str]:
    """Score ``method`` on the calibration batches ``batch_ids`` with the search in ``holder[0]``
    (:meth:`search.pipeline.Search.sensitivity_part`); returns the part and ``host:pid``."""
    import torch

    torch.set_num_threads(max(1, int(threads)))
    search = _cached_search(holder)
    return search.sensitivity_part(method, batch_ids), f"{socket.gethostname()}:{os.getpid()}"


sensitivity_part_task = ray.remote(max_retries=0, retry_exceptions=False)(sensitivity_part)


class ScorePool:
    """Splits a sensitivity stage across the cluster: the calibration batches are cut into
    ``size + 1`` consecutive runs (:func:`search.pipeline.split_batches`), ``size`` of them scored
    by Ray tasks (each asks for ``cpus`` CPUs and finds the search in its worker's cache, as the
    evaluation's tasks do) and the first in the runner's process meanwhile; the parts are combined
    into the table one process computes (:meth:`search.pipeline.Search.combine_parts`, to the last
    bit). A part whose task was lost is scored in the runner; an error raised in a task is raised
    here as it was raised there. It declines (:meth:`score` returns None, the table is scored in
    this process) for a method that is not scored in parts, a single calibration batch, no room
    for a task, a GPU search, or ``size`` 0.
    """

    def __init__(
        self,
        search: Search,
        ship: Callable[[], list[Any]],
        *,
        size: int,
        cpus: float = 1.0,
        should_stop: Callable[[], bool] | None = None,
    ) -> None:
        self.search = search
        self.ship = ship
        self.size = max(0, int(size)) if search.device.type != "cuda" else 0
        self.cpus = float(cpus)
        self.threads = max(1, int(cpus))
        self.should_stop = should_stop or (lambda: False)
        self.here = f"{socket.gethostname()}:{os.getpid()}"
        #: per method: {host:pid: calibration batches scored there}
        self.placement: dict[str, dict[str, int]] = {}

    def _slots(self) -> int:
        try:
            free = float(ray.available_resources().get("CPU", 0.0))
        except Exception:  # noqa: BLE001
            return 0
        return min(self.size, int(free // self.cpus)) if self.cpus > 0 else 0

    def score(self, method: str, *, on_progress: Callable[[str, float, str], None] | None = None) -> Any:
        from search.pipeline import split_batches

        search = self.search
        n = len(search.calibration)
        if self.size == 0 or n < 2 or not search.splits(method):
            return None
        slots = self._slots()
        if slots == 0:
            return None
        t0 = time.perf_counter()
        runs = split_batches(n, slots + 1)
        holder = self.ship()
        in_flight = {
            sensitivity_part_task.options(num_cpus=self.cpus).remote(holder, method, ids, self.threads): k
            for k, ids in enumerate(runs[1:], start=1)
        }
        parts: list[Any] = [None] * len(runs)
        where: dict[str, int] = {}
        parts[0] = search.sensitivity_part(method, runs[0], on_progress=on_progress, should_stop=self.should_stop)
        where[self.here] = len(runs[0])
        while in_flight:
            if self.should_stop():
                raise CanceledError("search canceled")
            ready, _ = ray.wait(list(in_flight), num_returns=1, timeout=1.0)
            for r in ready:
                k = in_flight.pop(r)
                try:
                    parts[k], host = ray.get(r)
                except ray.exceptions.RayTaskError as exc:
                    cause = getattr(exc, "cause", None)
                    raise (cause if isinstance(cause, BaseException) else exc) from None
                except ray.exceptions.RayError as exc:  # the worker died: score that part here
                    log.warning("a sensitivity task was lost (%s); its batches are scored in the runner", exc)
                    parts[k] = search.sensitivity_part(method, runs[k], should_stop=self.should_stop)
                    host = self.here
                where[host] = where.get(host, 0) + len(runs[k])
        self.placement[method] = where
        table = search.combine_parts(method, parts, seconds=time.perf_counter() - t0)
        table.extra["processes"] = dict(where)
        return table


class EvalPool:
    """Evaluates lists of maps in the runner and in up to ``size`` Ray tasks at once (see the
    module docstring).

    Args:
        search: the live search (its reference outputs are computed before it is shipped).
        size: Ray tasks in flight at most (0: evaluate in this process only).
        cpus: what each task asks Ray for.
        should_stop: checked between maps; True raises :class:`CanceledError`.
        on_result: called after each map with ``(done, total)``.
    """

    def __init__(
        self,
        search: Search,
        *,
        size: int,
        cpus: float = 1.0,
        should_stop: Callable[[], bool] | None = None,
        on_result: Callable[[int, int], None] | None = None,
    ) -> None:
        self.search = search
        self.size = max(0, int(size)) if search.device.type != "cuda" else 0
        self.cpus = float(cpus)
        self.threads = max(1, int(cpus))
        self.should_stop = should_stop or (lambda: False)
        self.on_result = on_result
        self.here = f"{socket.gethostname()}:{os.getpid()}"
        self.counts: Counter[str] = Counter()
        self.remote_failures = 0
        self._holder: list[Any] | None = None
        self._in_flight: dict[Any, int] = {}
        self._abandoned: list[Any] = []

    def _ship(self) -> list[Any]:
        if self._holder is None:
            self.search.reference()  # computed once, shipped with the search
            self._holder = [ray.put(self.search)]
        return self._holder

    def evaluate_many(
        self, maps: list[PrecisionMap], *, on_result: Callable[[int, int], None] | None = None
    ) -> list[Metrics]:
        """The metrics of every map, in order; ``on_result(done, total)`` after each (the pool's own
        ``on_result`` when not given)."""
        report = on_result or self.on_result
        n = len(maps)
        results: list[Metrics | None] = [None] * n
        pending = list(range(n))
        done = 0
        in_flight = self._in_flight

        def finished(i: int, metrics: Metrics, where: str) -> None:
            nonlocal done
            results[i] = metrics
            self.counts[where] += 1
            done += 1
            if report is not None:
                report(done, n)

        try:
            while pending or in_flight:
                if self.should_stop():
                    raise CanceledError("search canceled")
                if in_flight:
                    self._collect(in_flight, results, pending, finished)
                # Keep the remote slots busy with maps from the front, leaving one for this process...
                while len(pending) > 1 and len(in_flight) < self.size and self._room():
                    i = pending.pop(0)
                    task = evaluate_map_task.options(num_cpus=self.cpus)
                    in_flight[task.remote(self._ship(), maps[i].to_dict(), self.threads)] = i
                # ... and evaluate one here meanwhile: the last pending map, or else the oldest one
                # still out (a cold or busy worker must never make the runner wait; its task is
                # left to finish, never interrupted, and its result ignored).
                local: int | None = None
                if pending:
                    local = pending.pop()
                elif in_flight:
                    ref = next(iter(in_flight))
                    local = in_flight.pop(ref)
                    self._abandoned.append(ref)
                if local is not None and results[local] is None:
                    finished(local, self.search.evaluate(maps[local], should_stop=self.should_stop), self.here)
        finally:
            self.cancel()
        return [r if r is not None else {} for r in results]

    def _collect(
        self,
        in_flight: dict[Any, int],
        results: list[Metrics | None],
        pending: list[int],
        finished: Callable[[int, Metrics, str], None],
    ) -> None:
        ready, _ = ray.wait(list(in_flight), num_returns=len(in_flight), timeout=0)
        for r in ready:
            i = in_flight.pop(r)
            try:
                metrics, where = ray.get(r)
            except ray.exceptions.RayTaskError as exc:
                cause = getattr(exc, "cause", None)
                raise (cause if isinstance(cause, BaseException) else exc) from None
            except ray.exceptions.RayError as exc:  # the worker died, the task was lost
                self.remote_failures += 1
                log.warning("an evaluation task was lost (%s); map %d is evaluated again", exc, i)
                if results[i] is None:
                    pending.append(i)
                if self.remote_failures >= 3 * max(1, self.size):
                    self.size = 0  # the cluster keeps losing them: go on alone
                continue
            if results[i] is None:
                finished(i, metrics, where)

    def _room(self) -> bool:
        """Whether the cluster has a free slot for one more task now (so that tasks are not left
        queued behind other work, to start after they are no longer wanted)."""
        try:
            return float(ray.available_resources().get("CPU", 0.0)) >= self.cpus
        except Exception:  # noqa: BLE001
            return False

    def cancel(self) -> None:
        """Forget the tasks still out. They are not interrupted: an interrupt that lands in an
        import would break the worker process, which Ray reuses; each evaluates one map and ends."""
        self._abandoned.extend(self._in_flight)
        self._in_flight.clear()
        self._abandoned = [r for r in self._abandoned if not ray.wait([r], timeout=0)[0]]

    def summary(self) -> dict[str, Any]:
        """Where the maps were evaluated: ``processes`` ({host:pid: maps}), ``remote_maps`` (maps
        evaluated by Ray tasks), ``max_tasks`` (tasks in flight at most) and ``runner`` (host:pid)."""
        remote = sum(c for w, c in self.counts.items() if w != self.here)
        return {"processes": dict(self.counts), "remote_maps": remote, "max_tasks": self.size, "runner": self.here}

    def close(self) -> None:
        self.cancel()
        self._holder = None
