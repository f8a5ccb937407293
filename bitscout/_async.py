"""The asynchronous client (the methods of :class:`~bitscout.Client` as coroutines)."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

import httpx2

from bitscout._base import (
    DEFAULT_TIMEOUT,
    EVENTS_ADAPTER,
    EVENTS_PAGE,
    EXPORT_TIMEOUT_S,
    SENSITIVITIES_ADAPTER,
    TRANSFER_TIMEOUT,
    ExportWait,
    M,
    RetryPolicy,
    TimeoutTypes,
    _BaseClient,
    _Call,
    _Upload,
    download_tmp,
    filename_from,
    finish_download,
    materialize,
    prepare_submission,
    upload_from_path,
)
from bitscout._base import seg as _seg
from bitscout._front import Front
from bitscout._job import AsyncJob
from bitscout._progress import ProgressFile
from bitscout.formats import DEFAULT_EXPORT_FORMAT
from bitscout.schemas import (
    BudgetSpec,
    JobEventRead,
    JobList,
    JobRead,
    JobStatus,
    ParetoPointRead,
    ParetoRead,
    ResolveRead,
    SearchSpaceSpec,
    SensitivityRead,
    Task,
    UploadKind,
    UploadRead,
)

__all__ = ["AsyncClient"]

_EVENTS = EVENTS_ADAPTER
_SENSITIVITIES = SENSITIVITIES_ADAPTER


class AsyncClient(_BaseClient):
    """An asynchronous client of the bitscout service: :class:`Client`'s methods as coroutines,
    the same configuration, retries and typed errors. ``transport`` is any
    ``httpx2.AsyncBaseTransport``, e.g. ``httpx2.ASGITransport(app=...)`` to run against the app
    in-process, or ``httpx2.MockTransport``.

    Example::

        >>> import bitscout
        >>> async def main() -> None:
        ...     async with bitscout.AsyncClient() as client:
        ...         job = await client.submit(model="./minilm-bbc", data="bbc.jsonl",
        ...                                   methods=["kl"], budget={"max_size_mb": 30})
        ...         await job.wait(progress=False)
        ...         front = await job.pareto()
        ...         print(front.best(max_size_mb=20).id)
    """

    def __init__(
        self,
        url: str | None = None,
        token: str | None = None,
        *,
        timeout: TimeoutTypes = DEFAULT_TIMEOUT,
        retries: int | RetryPolicy = 3,
        transport: httpx2.AsyncBaseTransport | None = None,
        config_path: str | os.PathLike[str] | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(
            url, token, timeout=timeout, retries=retries, config_path=config_path, headers=headers
        )
        self._http = httpx2.AsyncClient(
            base_url=self.url,
            transport=transport,
            timeout=self.timeout,
            headers=self._headers(),
            follow_redirects=True,
        )
        self._sleep = asyncio.sleep

    # -- life cycle ----------------------------------------------------------------------------
    async def close(self) -> None:
        """Close the connections."""
        await self._http.aclose()

    aclose = close

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    # -- transport -----------------------------------------------------------------------------
    async def _send(self, call: _Call) -> httpx2.Response:
        retry = 0
        while True:
            fh: ProgressFile | None = None
            try:
                if call.upload is not None:
                    up = call.upload
                    fh = ProgressFile(
                        open(up.path, "rb"),
                        up.size,
                        desc=f"uploading {up.label or up.filename}",
                        enabled=bool(up.progress),
                    )
                request = self._http.build_request(**self._request_args(call, fh))  # type: ignore[arg-type]
                response = await self._http.send(request, stream=call.stream)
            except httpx2.TransportError as exc:
                if not self.retry.should_retry_error(exc, attempt=retry):
                    raise self._unreachable(exc, retry + 1) from exc
                retry += 1
                await self._sleep(self.retry.delay(retry))
                continue
            finally:
                if fh is not None:
                    fh.close()
            if self.retry.should_retry_status(response.status_code, attempt=retry):
                wait = self.retry.wait(retry + 1, self._retry_after(response))
                if wait is not None:  # None: the service asked for a longer pause than we wait
                    await response.aclose()
                    retry += 1
                    await self._sleep(wait)
                    continue
            if response.is_error:
                await response.aread()
                await response.aclose()
                raise self._error(response)
            return response

    async def _get(self, path: str, model: type[M], **params: Any) -> M:
        return self._parse(await self._send(_Call("GET", path, params=params or None)), model)

    async def _post(self, path: str, model: type[M], body: Any = None) -> M:
        return self._parse(await self._send(_Call("POST", path, json=body)), model)

    # -- service -------------------------------------------------------------------------------
    async def version(self) -> dict[str, str]:
        """The server's version, wire-schema version and database revision."""
        response = await self._send(_Call("GET", "/version"))
        data = response.json()
        return {str(k): str(v) for k, v in data.items()} if isinstance(data, dict) else {}

    # -- uploads -------------------------------------------------------------------------------
    async def upload(
        self, path: str | os.PathLike[str], kind: UploadKind | str | None = None, *, progress: bool = True
    ) -> UploadRead:
        """Upload a model directory (sent as an archive of its safetensors, config and tokenizer
        files), a model archive, or a data file (JSONL, JSON, CSV, TSV); returns the upload's
        record, whose ``id`` a job names as ``upload_id``.

        Example::

            >>> client.upload("./minilm-bbc").id      # doctest: +SKIP
            '3f2a...'
        """
        prepared, up = upload_from_path(path, kind, progress=progress)
        try:
            return await self._upload(materialize(up, prepared))
        finally:
            prepared.cleanup()

    async def _upload(self, up: _Upload) -> UploadRead:
        call = _Call("POST", "/uploads", data={"kind": up.kind.value}, upload=up, timeout=TRANSFER_TIMEOUT)
        return self._parse(await self._send(call), UploadRead)

    # -- jobs ----------------------------------------------------------------------------------
    async def submit(
        self,
        *,
        model: Any,
        data: Any,
        budget: BudgetSpec | Mapping[str, Any] | None,
        methods: Sequence[str] | str = ("kl",),
        task: Task | str | None = None,
        space: SearchSpaceSpec | Mapping[str, Any] | None = None,
        metric: str | None = None,
        seed: int | None = None,
        idempotency_key: str | None = None,
        data_options: Mapping[str, Any] | None = None,
        front_points: int | None = None,
        device: str | None = None,
        resources: Mapping[str, Any] | None = None,
        refine: Mapping[str, Any] | None = None,
        method_options: Mapping[str, Mapping[str, Any]] | None = None,
        loop: Mapping[str, Any] | None = None,
        progress: bool = True,
    ) -> AsyncJob:
        """Submit a search and return its :class:`AsyncJob` (queued); see :meth:`Client.submit`.

        Example::

            >>> job = await client.submit(model="./minilm-bbc", data="bbc.jsonl",
            ...                           budget={"max_avg_bits": 4})   # doctest: +SKIP
        """
        prepared = prepare_submission(
            model=model, data=data, methods=methods, budget=budget, task=task, space=space, metric=metric,
            seed=seed, idempotency_key=idempotency_key, data_options=data_options,
            extra={"front_points": front_points, "device": device, "resources": resources, "refine": refine,
                   "method_options": method_options, "loop": loop},
            progress=progress,
        )  # fmt: skip
        try:
            model_id = data_id = None
            if prepared.model_upload is not None:
                model_id = (await self._upload(materialize(prepared.model_upload, prepared))).id
            if prepared.data_upload is not None:
                data_id = (await self._upload(prepared.data_upload)).id
            body = prepared.with_uploads(model_id, data_id)
        finally:
            prepared.cleanup()
        read = await self._post("/jobs", JobRead, body.model_dump(mode="json", exclude_none=True))
        return AsyncJob(self, read)

    async def job(self, job_id: str) -> AsyncJob:
        """The job ``job_id`` (raises :class:`NotFound`, also for another user's job)."""
        return AsyncJob(self, await self._get(f"/jobs/{_seg(job_id)}", JobRead))

    get_job = job

    async def jobs(
        self, *, status: JobStatus | str | None = None, limit: int = 50, offset: int = 0
    ) -> JobList:
        """One page of your jobs (every user's with an admin token), newest first."""
        st = status.value if isinstance(status, JobStatus) else status
        return await self._get("/jobs", JobList, status=st, limit=limit, offset=offset)

    async def cancel(self, job_id: str) -> AsyncJob:
        """Cancel a job (see :meth:`Job.cancel`)."""
        return AsyncJob(self, await self._post(f"/jobs/{_seg(job_id)}/cancel", JobRead))

    async def events(self, job_id: str, *, after: int | None = None) -> list[JobEventRead]:
        """The job's events after ``after``, oldest first (every page)."""
        out: list[JobEventRead] = []
        while True:
            response = await self._send(
                _Call("GET", f"/jobs/{_seg(job_id)}/events", params={"after": after, "limit": EVENTS_PAGE})
            )
            page = _EVENTS.validate_json(response.content)
            out.extend(page)
            if len(page) < EVENTS_PAGE:
                return out
            after = page[-1].id

    async def pareto(self, job_id: str) -> Front:
        """Every stored point of the job (see :class:`Front`)."""
        return Front.from_read(await self._get(f"/jobs/{_seg(job_id)}/pareto", ParetoRead))

    async def point(self, job_id: str, point_id: int) -> ParetoPointRead:
        """One point of a job with its precision map."""
        return await self._get(f"/jobs/{_seg(job_id)}/points/{int(point_id)}", ParetoPointRead)

    async def sensitivity(self, job_id: str) -> list[SensitivityRead]:
        """The job's sensitivity tables."""
        response = await self._send(_Call("GET", f"/jobs/{_seg(job_id)}/sensitivity"))
        return _SENSITIVITIES.validate_json(response.content)

    async def resolve(
        self,
        job_id: str,
        budget: BudgetSpec | Mapping[str, Any] | None = None,
        *,
        methods: Sequence[str] | None = None,
        **limits: float,
    ) -> ResolveRead:
        """The best map under a new budget from the job's stored sensitivities (see :meth:`Job.resolve`).

        Example::

            >>> client.resolve(job_id, max_size_mb=12, max_avg_bits=4).precision_map   # doctest: +SKIP
        """
        body = self._resolve_body(budget, methods, limits)
        return await self._post(f"/jobs/{_seg(job_id)}/resolve", ResolveRead, body)

    async def download(
        self,
        job_id: str,
        point_id: int,
        dir: str | os.PathLike[str] = ".",
        *,
        format: str = DEFAULT_EXPORT_FORMAT,
        timeout: float | None = EXPORT_TIMEOUT_S,
        extract: bool = True,
    ) -> Path:
        """Download a point's exported model in ``format`` into ``dir``, waiting while the service
        exports it (see :meth:`Job.download`)."""
        wait = ExportWait(job_id, point_id, format, timeout)
        while (response := await self._send(wait.call())).status_code == 202:
            await response.aread()
            await response.aclose()
            await self._sleep(wait.pause(response))
        dest, tmp, fh = download_tmp(dir)
        try:
            with fh:
                async for chunk in response.aiter_bytes(1024 * 1024):
                    fh.write(chunk)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        finally:
            await response.aclose()
        name = filename_from(response, f"job-{job_id}-point-{point_id}-{wait.format}.bin")
        return finish_download(tmp, name, dest, extract=extract)
