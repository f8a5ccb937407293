"""The synchronous client."""

from __future__ import annotations

import os
import time
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
from bitscout._job import Job
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

__all__ = ["Client"]

_EVENTS = EVENTS_ADAPTER
_SENSITIVITIES = SENSITIVITIES_ADAPTER


class Client(_BaseClient):
    """A synchronous client of the bitscout service.

    The URL and the token come from the arguments, else ``BITSCOUT_URL`` / ``BITSCOUT_TOKEN``,
    else the config file ``bitscout serve`` writes (``~/.config/bitscout/config.json`` or
    ``$BITSCOUT_CONFIG``), else ``http://127.0.0.1:8000``. Requests that fail to connect or get
    429, 502, 503 or 504 are retried with exponential backoff and full jitter, never sooner than
    the service's ``Retry-After`` (``retries``: a count or a :class:`RetryPolicy`); other 4xx
    answers never are. Errors are typed: :class:`NotFound`, :class:`InvalidRequest` (with
    ``.field``), :class:`Unauthorized`, :class:`Conflict`, :class:`ServiceUnavailable`...
    ``transport`` replaces the network (any ``httpx2.BaseTransport``, e.g. ``httpx2.MockTransport``
    or an in-process transport over the app).

    Example::

        >>> import bitscout
        >>> with bitscout.Client("http://127.0.0.1:8000", token="bst_...") as client:   # doctest: +SKIP
        ...     job = client.submit(model="./minilm-bbc", data="bbc.jsonl", task="sequence_classification",
        ...                         methods=["kl"], budget={"max_size_mb": 30})
        ...     job.wait()
        ...     print(job.pareto().to_pandas())
    """

    def __init__(
        self,
        url: str | None = None,
        token: str | None = None,
        *,
        timeout: TimeoutTypes = DEFAULT_TIMEOUT,
        retries: int | RetryPolicy = 3,
        transport: httpx2.BaseTransport | None = None,
        config_path: str | os.PathLike[str] | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(
            url, token, timeout=timeout, retries=retries, config_path=config_path, headers=headers
        )
        self._http = httpx2.Client(
            base_url=self.url,
            transport=transport,
            timeout=self.timeout,
            headers=self._headers(),
            follow_redirects=True,
        )
        self._sleep = time.sleep

    # -- life cycle ----------------------------------------------------------------------------
    def close(self) -> None:
        """Close the connections."""
        self._http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    # -- transport -----------------------------------------------------------------------------
    def _send(self, call: _Call) -> httpx2.Response:
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
                response = self._http.send(request, stream=call.stream)
            except httpx2.TransportError as exc:
                if not self.retry.should_retry_error(exc, attempt=retry):
                    raise self._unreachable(exc, retry + 1) from exc
                retry += 1
                self._sleep(self.retry.delay(retry))
                continue
            finally:
                if fh is not None:
                    fh.close()
            if self.retry.should_retry_status(response.status_code, attempt=retry):
                wait = self.retry.wait(retry + 1, self._retry_after(response))
                if wait is not None:  # None: the service asked for a longer pause than we wait
                    response.close()
                    retry += 1
                    self._sleep(wait)
                    continue
            if response.is_error:
                response.read()
                response.close()
                raise self._error(response)
            return response

    def _get(self, path: str, model: type[M], **params: Any) -> M:
        return self._parse(self._send(_Call("GET", path, params=params or None)), model)

    def _post(self, path: str, model: type[M], body: Any = None) -> M:
        return self._parse(self._send(_Call("POST", path, json=body)), model)

    # -- service -------------------------------------------------------------------------------
    def version(self) -> dict[str, str]:
        """The server's version, wire-schema version and database revision."""
        response = self._send(_Call("GET", "/version"))
        data = response.json()
        return {str(k): str(v) for k, v in data.items()} if isinstance(data, dict) else {}

    # -- uploads -------------------------------------------------------------------------------
    def upload(
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
            return self._upload(materialize(up, prepared))
        finally:
            prepared.cleanup()

    def _upload(self, up: _Upload) -> UploadRead:
        call = _Call("POST", "/uploads", data={"kind": up.kind.value}, upload=up, timeout=TRANSFER_TIMEOUT)
        return self._parse(self._send(call), UploadRead)

    # -- jobs ----------------------------------------------------------------------------------
    def submit(
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
    ) -> Job:
        """Submit a search and return its :class:`Job` (queued).

        ``model``: a local model directory or archive (uploaded first), ``"server:<dir>"`` (under the
        server's model root), ``"hf:<org/name>@<40-hex revision>"``, ``"upload:<id>"``, or a
        :class:`ModelSource` / mapping. A plain string that is no local path is a server path, or a
        Hugging Face id when it has ``@revision``.
        ``data``: a local JSONL/JSON/CSV/TSV file (uploaded), ``"server:<file>"``,
        ``"dataset:<name>"``, ``"upload:<id>"``, or a :class:`DataSource` / mapping; a plain string
        is a server path when it ends like a data file, else a ``datasets`` name. ``data_options``
        adds the data fields (``text_field``, ``label_field``, ``calibration_size``...).
        ``task`` is read from a local model's config when omitted. ``budget``: a
        :class:`BudgetSpec` or a mapping such as ``{"max_size_mb": 30}``. ``space``: a
        :class:`SearchSpaceSpec` or mapping. Everything is validated before any upload starts
        (:class:`InvalidRequest` with ``.field``); large uploads show a progress bar.
        ``idempotency_key``: submitting again with it returns the same job (one is made up when
        omitted, so a retried request never makes two jobs).
        ``loop``: the closed loop's options (:class:`bitscout.methods.LoopOptions`), e.g.
        ``{"enabled": False}`` for the first allocation only or ``{"local_steps": 64}``.

        Example::

            >>> job = client.submit(
            ...     model="./minilm-bbc", data="bbc.jsonl", methods=["kl", "hessian"],
            ...     budget={"max_size_mb": 30}, space={"bits": [2, 4, 8], "granularity": "group"},
            ...     data_options={"label_field": "category"},
            ... )                                   # doctest: +SKIP
            >>> job.status                          # doctest: +SKIP
            <JobStatus.queued: 'queued'>
            >>> llm = client.submit(                # group-wise scales, q/k/v and gate/up tied
            ...     model="./my-llama", data="text.jsonl", methods=["kl"], budget={"max_size_mb": 300},
            ...     space={"bits": ["4g128", 8, "3g64"], "tie": ["qkv", "gate_up"]},
            ... )                                   # doctest: +SKIP
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
                model_id = self._upload(materialize(prepared.model_upload, prepared)).id
            if prepared.data_upload is not None:
                data_id = self._upload(prepared.data_upload).id
            body = prepared.with_uploads(model_id, data_id)
        finally:
            prepared.cleanup()
        read = self._post("/jobs", JobRead, body.model_dump(mode="json", exclude_none=True))
        return Job(self, read)

    def job(self, job_id: str) -> Job:
        """The job ``job_id`` (raises :class:`NotFound`, also for another user's job)."""
        return Job(self, self._get(f"/jobs/{_seg(job_id)}", JobRead))

    get_job = job

    def jobs(self, *, status: JobStatus | str | None = None, limit: int = 50, offset: int = 0) -> JobList:
        """One page of your jobs (every user's with an admin token), newest first."""
        st = status.value if isinstance(status, JobStatus) else status
        return self._get("/jobs", JobList, status=st, limit=limit, offset=offset)

    def cancel(self, job_id: str) -> Job:
        """Cancel a job (see :meth:`Job.cancel`)."""
        return Job(self, self._post(f"/jobs/{_seg(job_id)}/cancel", JobRead))

    def events(self, job_id: str, *, after: int | None = None) -> list[JobEventRead]:
        """The job's events after ``after``, oldest first (every page)."""
        out: list[JobEventRead] = []
        while True:
            response = self._send(
                _Call("GET", f"/jobs/{_seg(job_id)}/events", params={"after": after, "limit": EVENTS_PAGE})
            )
            page = _EVENTS.validate_json(response.content)
            out.extend(page)
            if len(page) < EVENTS_PAGE:
                return out
            after = page[-1].id

    def pareto(self, job_id: str) -> Front:
        """Every stored point of the job (see :class:`Front`)."""
        return Front.from_read(self._get(f"/jobs/{_seg(job_id)}/pareto", ParetoRead))

    def point(self, job_id: str, point_id: int) -> ParetoPointRead:
        """One point of a job with its precision map."""
        return self._get(f"/jobs/{_seg(job_id)}/points/{int(point_id)}", ParetoPointRead)

    def sensitivity(self, job_id: str) -> list[SensitivityRead]:
        """The job's sensitivity tables."""
        response = self._send(_Call("GET", f"/jobs/{_seg(job_id)}/sensitivity"))
        return _SENSITIVITIES.validate_json(response.content)

    def resolve(
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
        return self._post(f"/jobs/{_seg(job_id)}/resolve", ResolveRead, body)

    def download(
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
        while (response := self._send(wait.call())).status_code == 202:
            response.read()
            response.close()
            self._sleep(wait.pause(response))
        dest, tmp, fh = download_tmp(dir)
        try:
            with fh:
                for chunk in response.iter_bytes(1024 * 1024):
                    fh.write(chunk)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        finally:
            response.close()
        name = filename_from(response, f"job-{job_id}-point-{point_id}-{wait.format}.bin")
        return finish_download(tmp, name, dest, extract=extract)
