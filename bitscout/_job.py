"""A submitted job: :class:`Job` (with a :class:`~bitscout.Client`) and :class:`AsyncJob` (with an
:class:`~bitscout.AsyncClient`). Both hold the latest :class:`~bitscout.schemas.JobRead` and share
everything but I/O through :class:`_JobBase`."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from bitscout._base import EXPORT_TIMEOUT_S
from bitscout._front import Front
from bitscout._progress import JobBar
from bitscout.errors import ErrorCode, JobFailed, NotFound
from bitscout.formats import DEFAULT_EXPORT_FORMAT
from bitscout.schemas import (
    BudgetSpec,
    JobEventRead,
    JobRead,
    JobSpec,
    JobStatus,
    ParetoPointRead,
    ResolveRead,
    SensitivityRead,
)

if TYPE_CHECKING:
    from bitscout._async import AsyncClient
    from bitscout._sync import Client

__all__ = ["AsyncJob", "Job", "PointRef"]

#: A point: its id, the point itself, or ``"recommended"`` (the job's recommended point).
PointRef = int | ParetoPointRead | Literal["recommended"]


class _JobBase:
    """The state of a job and what needs no I/O."""

    def __init__(self, data: JobRead) -> None:
        self.data = data

    # -- the job's state -----------------------------------------------------------------------
    @property
    def id(self) -> str:
        """The job's id."""
        return self.data.id

    @property
    def status(self) -> JobStatus:
        """queued, running, succeeded, failed or canceled (as of the last refresh)."""
        return self.data.status

    @property
    def progress(self) -> float:
        """Fraction done, 0 to 1."""
        return self.data.progress

    @property
    def stage(self) -> str | None:
        """The current stage, e.g. ``"sensitivity"``."""
        return self.data.stage

    @property
    def message(self) -> str | None:
        """The latest progress message."""
        return self.data.message

    @property
    def spec(self) -> JobSpec:
        """What was asked, with the server's defaults filled in."""
        return self.data.spec

    @property
    def finished(self) -> bool:
        """The job succeeded, failed or was canceled."""
        return self.data.status.finished

    @property
    def succeeded(self) -> bool:
        return self.data.status is JobStatus.succeeded

    def __repr__(self) -> str:
        extra = f", stage={self.stage!r}, progress={self.progress:.0%}" if not self.finished else ""
        return f"{type(self).__name__}(id={self.id!r}, status={self.status.value!r}{extra})"

    def failure(self) -> JobFailed | None:
        """The :class:`JobFailed` error of a failed or canceled job; None otherwise."""
        d = self.data
        if d.status is JobStatus.failed:
            return JobFailed(
                d.error_message or "the job failed", job_id=d.id, code=d.error_code or ErrorCode.internal
            )
        if d.status is JobStatus.canceled:
            return JobFailed(
                d.error_message or "the job was canceled",
                job_id=d.id,
                code=d.error_code or ErrorCode.canceled,
            )
        return None

    def raise_for_status(self) -> None:
        """Raise :class:`JobFailed` when the job failed or was canceled."""
        err = self.failure()
        if err is not None:
            raise err

    def _point_id(self, point: PointRef) -> int:
        if isinstance(point, ParetoPointRead):
            return point.id
        if point == "recommended":
            if self.data.recommended_point is None:
                state = "has no result yet" if not self.finished else "has no point that meets its budget"
                raise NotFound(f"job {self.id} {state}: no recommended point", field="point_id")
            return self.data.recommended_point
        if isinstance(point, bool) or not isinstance(point, int):
            raise TypeError(f"point must be an id, a point or 'recommended', not {point!r}")
        return point

    def _next_poll(
        self, bar: JobBar, deadline: float | None, poll_interval: float, timeout: float | None
    ) -> float | None:
        """One step of waiting: show the state; None when the job ended, else the seconds to
        sleep before the next poll. Raises TimeoutError past the deadline."""
        bar.update(progress=self.progress, stage=self.stage, message=self.message, status=self.status.value)
        if self.finished:
            return None
        if deadline is None:
            return poll_interval
        left = deadline - time.monotonic()
        if left <= 0:
            raise _timed_out(self, timeout)
        return min(poll_interval, left)

    def _apply_options(self) -> dict[str, Any]:
        s = self.spec.space
        return {
            "granularity": s.granularity,
            "ffn_block_size": s.ffn_block_size,
            "include": list(s.include) or None,
            "exclude": list(s.exclude) or None,
            "include_head": s.include_head,
            "include_embeddings": s.include_embeddings,
        }


def _deadline(timeout: float | None) -> float | None:
    return None if timeout is None else time.monotonic() + timeout


def _timed_out(job: _JobBase, timeout: float | None) -> TimeoutError:
    return TimeoutError(
        f"job {job.id} still {job.status.value} after {timeout:g} s "
        f"(stage {job.stage or '-'}, {job.progress:.0%}); it keeps running on the server"
    )


class Job(_JobBase):
    """A job on the service, from :meth:`Client.submit` or :meth:`Client.job`.

    Example::

        >>> import bitscout
        >>> client = bitscout.Client()                                   # doctest: +SKIP
        >>> job = client.submit(model="./minilm-bbc", data="bbc.jsonl",
        ...                     methods=["kl"], budget={"max_size_mb": 30})  # doctest: +SKIP
        >>> job.wait()                    # a progress bar; raises JobFailed if it failed  # doctest: +SKIP
        >>> best = job.best(max_size_mb=20)                              # doctest: +SKIP
        >>> job.download(best, "out/")                                   # doctest: +SKIP
    """

    def __init__(self, client: Client, data: JobRead) -> None:
        super().__init__(data)
        self.client = client

    def refresh(self) -> Job:
        """Fetch the job's current state; returns self."""
        self.data = self.client.get_job(self.id).data
        return self

    def wait(
        self,
        *,
        progress: bool = True,
        poll_interval: float = 2.0,
        timeout: float | None = None,
        raise_on_failure: bool = True,
    ) -> Job:
        """Poll until the job ends and return self. With ``progress``, show a bar with the stage and
        the latest message (a widget in notebooks). Raises :class:`JobFailed` (``code`` and
        ``message`` are the job's error) when it failed or was canceled, unless
        ``raise_on_failure=False``; ``TimeoutError`` after ``timeout`` seconds (the job goes on).

        Example::

            >>> job.wait(poll_interval=5, timeout=3600).status    # doctest: +SKIP
            <JobStatus.succeeded: 'succeeded'>
        """
        deadline = _deadline(timeout)
        bar = JobBar(self.id, enabled=progress)
        try:
            while (sleep := self._next_poll(bar, deadline, poll_interval, timeout)) is not None:
                time.sleep(sleep)
                self.refresh()
        finally:
            bar.close()
        if raise_on_failure:
            self.raise_for_status()
        return self

    def cancel(self) -> Job:
        """Ask the service to stop the job (a queued job ends at once, a running one within
        seconds); returns self. Raises :class:`Conflict` when it already succeeded or failed."""
        self.data = self.client.cancel(self.id).data
        return self

    def events(self, *, after: int | None = None) -> list[JobEventRead]:
        """The job's event log, oldest first (only events with an id above ``after``)."""
        return self.client.events(self.id, after=after)

    def pareto(self) -> Front:
        """Every stored point of the job as a :class:`Front` (empty until the job succeeded)."""
        return self.client.pareto(self.id)

    def point(self, point: PointRef = "recommended") -> ParetoPointRead:
        """One point with its precision map."""
        return self.client.point(self.id, self._point_id(point))

    def best(
        self,
        *,
        max_size_mb: float | None = None,
        max_avg_bits: float | None = None,
        max_bops: float | None = None,
        max_latency_ms: float | None = None,
        metric: str | None = None,
        higher_is_better: bool | None = None,
        methods: Sequence[str] | None = None,
        on_front: bool = False,
    ) -> ParetoPointRead:
        """The best point within the given limits (the job's budget when none is given), by the
        job's metric: see :meth:`Front.best`.

        Example::

            >>> job.best(max_size_mb=15, max_avg_bits=4).cost.size_mb    # doctest: +SKIP
            14.2
        """
        return self.pareto().best(
            max_size_mb=max_size_mb,
            max_avg_bits=max_avg_bits,
            max_bops=max_bops,
            max_latency_ms=max_latency_ms,
            metric=metric,
            higher_is_better=higher_is_better,
            methods=methods,
            on_front=on_front,
        )

    def resolve(
        self,
        budget: BudgetSpec | Mapping[str, Any] | None = None,
        *,
        methods: Sequence[str] | None = None,
        **limits: float,
    ) -> ResolveRead:
        """The best map under a new budget, computed by the service from the job's stored
        sensitivities without running the model. Raises :class:`ServiceUnavailable` when the
        server has no allocator, :class:`Conflict` when no sensitivities are stored yet,
        :class:`InvalidRequest` (code ``budget_infeasible``) when nothing fits.

        Example::

            >>> job.resolve(max_size_mb=12).cost.size_mb    # doctest: +SKIP
            11.97
        """
        return self.client.resolve(self.id, budget, methods=methods, **limits)

    def sensitivity(self) -> list[SensitivityRead]:
        """The job's sensitivity tables."""
        return self.client.sensitivity(self.id)

    def plot(self, ax: Any = None, **kwargs: Any) -> Any:
        """Plot the front with matplotlib (see :meth:`Front.plot`); returns the Axes."""
        return self.pareto().plot(ax, **kwargs)

    def download(
        self,
        point: PointRef = "recommended",
        dir: str | os.PathLike[str] = ".",
        *,
        format: str = DEFAULT_EXPORT_FORMAT,
        timeout: float | None = EXPORT_TIMEOUT_S,
        extract: bool = True,
    ) -> Path:
        """Download a point's exported model into ``dir`` (created if needed), in ``format``:
        ``native`` (bitscout's packed artifact, for :func:`bitscout.apply`), ``compressed-tensors`` or
        ``dense`` (checkpoints plain transformers loads; :mod:`bitscout.formats`). Any point of the
        job can be downloaded: one not stored in that format yet is exported by the service first,
        and this waits for it (asking again after each ``Retry-After``) up to ``timeout`` seconds
        (None: no limit), then raises ``TimeoutError`` (the export goes on; download again later).
        A refined point's other formats are written from its stored native artifact (its learned
        step sizes and refined weights). An unknown format raises :class:`InvalidRequest` (field
        ``format``). An export that failed raises its error (e.g. :class:`InvalidRequest` for a map the format
        cannot express), every time. An archive is unpacked there (``extract=True``) and the
        directory returned; otherwise the file's path is returned.

        Example::

            >>> path = job.download("recommended", "quantized/")          # doctest: +SKIP
            >>> model = bitscout.apply(AutoModel.from_pretrained(...), path)  # doctest: +SKIP
            >>> job.download(best, "ct/", format="compressed-tensors")     # doctest: +SKIP
        """
        return self.client.download(self.id, self._point_id(point), dir, format=format, timeout=timeout,
                                    extract=extract)  # fmt: skip

    def apply(self, model: Any, point: PointRef = "recommended", *, materialize: bool = False, **kwargs: Any) -> Any:
        """Quantize ``model`` in place under a point's precision map, with the space settings
        (granularity, FFN block size, globs) of this job; returns the model. Packed in memory by
        default, float weights with ``materialize=True`` (see :func:`bitscout.apply`). Needs
        ``pip install 'bitscout[search]'``."""
        # through the package, so that `bitscout.apply` stays the function (importing the submodule
        # directly would bind the package's attribute to the module)
        from bitscout import apply

        p = point if isinstance(point, ParetoPointRead) else self.point(point)
        options = {**self._apply_options(), **kwargs}
        return apply(model, {k: v.model_dump() for k, v in p.precision_map.items()}, materialize=materialize, **options)


class AsyncJob(_JobBase):
    """A job on the service, from :meth:`AsyncClient.submit`: the methods of :class:`Job` as
    coroutines (``best`` / ``plot`` work on the :class:`Front` that ``await job.pareto()`` returns).

    Example::

        >>> async with bitscout.AsyncClient() as client:                    # doctest: +SKIP
        ...     job = await client.submit(model="./m", data="d.jsonl", budget={"max_avg_bits": 4})
        ...     await job.wait(progress=False)
        ...     front = await job.pareto()
    """

    def __init__(self, client: AsyncClient, data: JobRead) -> None:
        super().__init__(data)
        self.client = client

    async def refresh(self) -> AsyncJob:
        """Fetch the job's current state; returns self."""
        self.data = (await self.client.get_job(self.id)).data
        return self

    async def wait(
        self,
        *,
        progress: bool = True,
        poll_interval: float = 2.0,
        timeout: float | None = None,
        raise_on_failure: bool = True,
    ) -> AsyncJob:
        """Poll until the job ends (see :meth:`Job.wait`)."""
        deadline = _deadline(timeout)
        bar = JobBar(self.id, enabled=progress)
        try:
            while (sleep := self._next_poll(bar, deadline, poll_interval, timeout)) is not None:
                await asyncio.sleep(sleep)
                await self.refresh()
        finally:
            bar.close()
        if raise_on_failure:
            self.raise_for_status()
        return self

    async def cancel(self) -> AsyncJob:
        """Ask the service to stop the job; returns self."""
        self.data = (await self.client.cancel(self.id)).data
        return self

    async def events(self, *, after: int | None = None) -> list[JobEventRead]:
        """The job's event log, oldest first."""
        return await self.client.events(self.id, after=after)

    async def pareto(self) -> Front:
        """Every stored point of the job as a :class:`Front`."""
        return await self.client.pareto(self.id)

    async def point(self, point: PointRef = "recommended") -> ParetoPointRead:
        """One point with its precision map."""
        return await self.client.point(self.id, self._point_id(point))

    async def best(
        self,
        *,
        max_size_mb: float | None = None,
        max_avg_bits: float | None = None,
        max_bops: float | None = None,
        max_latency_ms: float | None = None,
        metric: str | None = None,
        higher_is_better: bool | None = None,
        methods: Sequence[str] | None = None,
        on_front: bool = False,
    ) -> ParetoPointRead:
        """The best point within the given limits (see :meth:`Front.best`)."""
        return (await self.pareto()).best(
            max_size_mb=max_size_mb,
            max_avg_bits=max_avg_bits,
            max_bops=max_bops,
            max_latency_ms=max_latency_ms,
            metric=metric,
            higher_is_better=higher_is_better,
            methods=methods,
            on_front=on_front,
        )

    async def resolve(
        self,
        budget: BudgetSpec | Mapping[str, Any] | None = None,
        *,
        methods: Sequence[str] | None = None,
        **limits: float,
    ) -> ResolveRead:
        """The best map under a new budget from the stored sensitivities (see :meth:`Job.resolve`)."""
        return await self.client.resolve(self.id, budget, methods=methods, **limits)

    async def sensitivity(self) -> list[SensitivityRead]:
        """The job's sensitivity tables."""
        return await self.client.sensitivity(self.id)

    async def plot(self, ax: Any = None, **kwargs: Any) -> Any:
        """Plot the front with matplotlib (see :meth:`Front.plot`)."""
        return (await self.pareto()).plot(ax, **kwargs)

    async def download(
        self,
        point: PointRef = "recommended",
        dir: str | os.PathLike[str] = ".",
        *,
        format: str = DEFAULT_EXPORT_FORMAT,
        timeout: float | None = EXPORT_TIMEOUT_S,
        extract: bool = True,
    ) -> Path:
        """Download a point's exported model in ``format`` into ``dir``, waiting while the service
        exports it (see :meth:`Job.download`)."""
        return await self.client.download(self.id, self._point_id(point), dir, format=format, timeout=timeout,
                                          extract=extract)  # fmt: skip

    async def apply(
        self, model: Any, point: PointRef = "recommended", *, materialize: bool = False, **kwargs: Any
    ) -> Any:
        """Quantize ``model`` under a point's map (see :meth:`Job.apply`)."""
        from bitscout import apply  # the function, as in Job.apply

        p = point if isinstance(point, ParetoPointRead) else await self.point(point)
        options = {**self._apply_options(), **kwargs}
        return apply(model, {k: v.model_dump() for k, v in p.precision_map.items()}, materialize=materialize, **options)
