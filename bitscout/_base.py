"""What the synchronous and the asynchronous clients share: configuration, retry policy, request
building, response parsing and the preparation of a submission. The subclasses in ``_sync`` and
``_async`` only do I/O (the layout of httpx's own ``BaseClient`` / ``Client`` / ``AsyncClient``).
"""

from __future__ import annotations

import gzip
import json
import os
import random
import tarfile
import tempfile
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, TypeVar

import httpx2
from pydantic import BaseModel, TypeAdapter, ValidationError

from bitscout._config import ClientConfig, resolve_config
from bitscout.architectures import read_config, task_of, unsupported
from bitscout.errors import (
    BitscoutError,
    ErrorCode,
    InvalidRequest,
    ServiceUnavailable,
    Unauthorized,
    error_from_body,
)
from bitscout.formats import parse_export_format
from bitscout.schemas import (
    BudgetSpec,
    DataSource,
    ExportRead,
    JobCreate,
    JobEventRead,
    ModelSource,
    ResolveRequest,
    SearchSpaceSpec,
    SensitivityRead,
    Task,
    UploadKind,
)

#: response parsers and the events page size, shared by the sync and async clients
EVENTS_ADAPTER: TypeAdapter[list[JobEventRead]] = TypeAdapter(list[JobEventRead])
SENSITIVITIES_ADAPTER: TypeAdapter[list[SensitivityRead]] = TypeAdapter(list[SensitivityRead])
EVENTS_PAGE = 500

__all__ = ["API_PREFIX", "RetryPolicy", "TimeoutTypes"]

API_PREFIX = "/api/v1"

#: A timeout in seconds for every phase, an ``httpx2.Timeout``, or None for no limit.
TimeoutTypes = float | httpx2.Timeout | None

DEFAULT_TIMEOUT = httpx2.Timeout(30.0, connect=10.0)
#: Uploads and downloads move large files: no read/write limit per chunk beyond this.
TRANSFER_TIMEOUT = httpx2.Timeout(600.0, connect=10.0)
#: How long a download waits, by default, for a point to be exported into the format asked for.
EXPORT_TIMEOUT_S = 600.0

#: File endings a model archive may hold (the server's list); anything else in a model directory
#: (pickled weights, code, optimizer states) is left out of the upload.
MODEL_FILE_SUFFIXES: tuple[str, ...] = (
    ".safetensors", ".json", ".txt", ".model", ".md", ".tiktoken", ".jinja", ".spm",
)  # fmt: skip
ARCHIVE_SUFFIXES: tuple[str, ...] = (".zip", ".tar", ".tar.gz", ".tgz")
DATA_SUFFIXES: tuple[str, ...] = (".jsonl", ".json", ".csv", ".tsv")

M = TypeVar("M", bound=BaseModel)


@dataclass(frozen=True)
class RetryPolicy:
    """When and how often a request is tried again.

    A request is retried, at most ``max_retries`` times, when the connection fails (connect or
    read errors, timeouts: the service was unreachable or went away) or when the service answers
    one of ``retry_statuses``: 429 *rate limited*, 503 *unavailable*, and the gateway errors
    502 / 504 a proxy gives. It is never retried on another 4xx answer, which would not change.

    The n-th retry waits a random time in ``[(1 - jitter) * b, b]`` with the exponential backoff
    ``b = min(max_backoff, backoff * 2**(n-1))``: the default ``jitter=1.0`` is *full jitter*
    (uniform in ``[0, b]``), which spreads out clients that failed at the same moment; ``0``
    waits exactly ``b``. When the service sent ``Retry-After`` (seconds, or an HTTP date) the
    retry never comes sooner: it waits that long plus the jittered backoff (so that clients told
    the same time do not all return at once), and a ``Retry-After`` longer than
    ``max_retry_after`` is not waited for: the error is raised at once
    (:class:`~bitscout.errors.RateLimited` carries ``retry_after``).

    Every request the SDK makes can be repeated safely: reads are reads, a submission carries an
    idempotency key (the SDK makes one when none is given), a cancel of a canceled job is a no-op.

    Example::

        >>> RetryPolicy(max_retries=2, backoff=0.5, jitter=0).delay(2)
        1.0
        >>> 0.0 <= RetryPolicy(backoff=0.5).delay(2) <= 1.0
        True
        >>> RetryPolicy(max_retries=0).should_retry_status(503, attempt=0)
        False
        >>> RetryPolicy(jitter=0).wait(1, retry_after=2.0), RetryPolicy().wait(1, retry_after=600.0)
        (2.25, None)
    """

    max_retries: int = 3
    backoff: float = 0.25
    max_backoff: float = 8.0
    jitter: float = 1.0
    retry_statuses: tuple[int, ...] = (429, 502, 503, 504)
    max_retry_after: float = 30.0

    def __post_init__(self) -> None:
        if not 0.0 <= self.jitter <= 1.0:
            raise ValueError(f"jitter must be between 0 and 1, got {self.jitter!r}")
        if self.max_retries < 0:
            raise ValueError(f"max_retries must be >= 0, got {self.max_retries!r}")

    def delay(self, retry: int, retry_after: float | None = None) -> float:
        """Seconds to wait before the ``retry``-th retry (1-based), ``Retry-After`` honoured
        whatever its length (see :meth:`wait` for the bounded form the clients use)."""
        base = min(self.max_backoff, self.backoff * (2 ** max(0, retry - 1)))
        jittered = base - random.uniform(0, self.jitter * base) if self.jitter > 0 else base  # noqa: S311
        if retry_after is not None and retry_after > 0:
            return float(retry_after + jittered)
        return float(jittered)

    def wait(self, retry: int, retry_after: float | None = None) -> float | None:
        """Like :meth:`delay`, or None when ``retry_after`` is over ``max_retry_after`` (give up now)."""
        if retry_after is not None and retry_after > self.max_retry_after:
            return None
        return self.delay(retry, retry_after)

    def should_retry_status(self, status: int, *, attempt: int) -> bool:
        """Whether an answer with ``status`` after ``attempt`` earlier retries is tried again."""
        return attempt < self.max_retries and status in self.retry_statuses

    def should_retry_error(self, exc: Exception, *, attempt: int) -> bool:
        """Whether a transport failure is tried again (never a request the client got wrong)."""
        if attempt >= self.max_retries:
            return False
        if isinstance(exc, httpx2.UnsupportedProtocol | httpx2.LocalProtocolError | httpx2.ProxyError):
            return False
        return isinstance(exc, httpx2.TransportError)


@dataclass
class _Call:
    """One logical request (tried one or more times)."""

    method: str
    path: str
    params: dict[str, Any] | None = None
    json: Any = None
    data: dict[str, str] | None = None
    upload: _Upload | None = None
    timeout: httpx2.Timeout | None = None
    stream: bool = False


@dataclass
class _Upload:
    """A local file to send as the multipart field ``file``."""

    path: Path
    filename: str
    kind: UploadKind
    temporary: bool = False
    progress: bool | None = None
    label: str = ""

    @property
    def size(self) -> int:
        return self.path.stat().st_size


@dataclass
class _Prepared:
    """A submission whose local files still have to be uploaded."""

    body: dict[str, Any]
    model_upload: _Upload | None = None
    data_upload: _Upload | None = None
    temporaries: list[Path] = field(default_factory=list)

    def with_uploads(self, model_id: str | None, data_id: str | None) -> JobCreate:
        body = json.loads(json.dumps(self.body))
        if model_id is not None:
            body["model"] = {"upload_id": model_id}
        if data_id is not None:
            body["data"] = {**body["data"], "upload_id": data_id}
            body["data"].pop("path", None)
        return _validate(JobCreate, body)

    def cleanup(self) -> None:
        for p in self.temporaries:
            try:
                p.unlink()
            except OSError:
                pass


def parse_retry_after(value: str | None, *, now: float | None = None) -> float | None:
    """Seconds to wait from a ``Retry-After`` header: a number of seconds, or an HTTP date (then
    the time until it, at least 0); None when absent or unreadable.

    Example::

        >>> parse_retry_after("3"), parse_retry_after("soon"), parse_retry_after(None)
        (3.0, None, None)
        >>> parse_retry_after("Wed, 21 Oct 2015 07:28:05 GMT", now=1445412480.0)
        5.0
    """
    if value is None or not value.strip():
        return None
    text = value.strip()
    try:
        seconds = float(text)
    except ValueError:
        pass
    else:
        return max(0.0, seconds) if seconds == seconds and seconds != float("inf") else None
    import time
    from email.utils import parsedate_to_datetime

    try:
        when = parsedate_to_datetime(text)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:
        return None
    return max(0.0, when.timestamp() - (time.time() if now is None else now))


def _loc(loc: Sequence[Any]) -> str | None:
    parts = [str(p) for p in loc if not any(c in str(p) for c in "[(")]
    return ".".join(parts) or None


def _validate(model: type[M], data: Any, *, prefix: str = "") -> M:
    """``model.model_validate(data)``, turning a validation error into :class:`InvalidRequest`
    with the dotted path of the first offending input."""
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise invalid_from_validation(exc, prefix=prefix) from None


def invalid_from_validation(exc: ValidationError, *, prefix: str = "") -> InvalidRequest:
    """The :class:`InvalidRequest` the service would answer for this validation error."""
    errors = exc.errors()
    first = errors[0] if errors else {"loc": (), "msg": "invalid value"}
    fld = _loc(first.get("loc", ()))
    if prefix:
        fld = f"{prefix}.{fld}" if fld else prefix
    msg = str(first.get("msg", "invalid value")).removeprefix("Value error, ")
    message = f"{fld}: {msg}" if fld else msg
    if len(errors) > 1:
        message += f" (and {len(errors) - 1} more problem{'s' if len(errors) > 2 else ''})"
    details = {
        "errors": [{"field": _loc(e.get("loc", ())), "message": str(e.get("msg"))} for e in errors[:20]]
    }
    return InvalidRequest(message, field=fld, details=details)


def _dump(value: Any) -> Any:
    if isinstance(value, BaseModel):
        return value.model_dump(mode="json", exclude_none=True)
    if isinstance(value, Mapping):
        return {str(k): _dump(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_dump(v) for v in value]
    if hasattr(value, "value") and isinstance(getattr(value, "value", None), str):
        return value.value
    return value


def budget_from(budget: BudgetSpec | Mapping[str, Any] | None = None, /, **limits: Any) -> BudgetSpec:
    """A :class:`BudgetSpec` from a BudgetSpec, a mapping and/or keyword limits (keywords win).

    Example::

        >>> budget_from({"max_size_mb": 30}, max_avg_bits=4).limits()
        {'max_size_mb': 30.0, 'max_avg_bits': 4.0}
    """
    data: dict[str, Any] = {}
    if budget is not None:
        if isinstance(budget, BudgetSpec):
            data.update(budget.model_dump(exclude_none=True))
        elif isinstance(budget, Mapping):
            data.update(budget)
        else:
            raise InvalidRequest(
                f"budget must be a BudgetSpec or a mapping, not {type(budget).__name__}", field="budget"
            )
    data.update({k: v for k, v in limits.items() if v is not None})
    return _validate(BudgetSpec, data, prefix="budget")


def _is_archive(p: Path) -> bool:
    return p.name.lower().endswith(ARCHIVE_SUFFIXES)


def detect_task(model_dir: Path) -> Task | None:
    """The task a saved transformers model is for, from its ``config.json``
    (:func:`bitscout.architectures.task_of`); None when it names no architecture."""
    cfg = read_config(model_dir)
    if cfg is None or not cfg.get("architectures"):
        return None
    return Task(task_of(cfg))


def check_local_model(model_dir: Path, task: Task | str | None) -> None:
    """Refuse a local model bitscout cannot search (for ``task``), before anything is uploaded
    (:func:`bitscout.architectures.unsupported`)."""
    cfg = read_config(model_dir)
    if cfg is None:
        return  # packing the directory says what is missing
    reason = unsupported(cfg, None if task is None else _dump(task))
    if reason is not None:
        raise InvalidRequest(reason, field="model")


def model_files(model_dir: Path) -> list[Path]:
    """The files of a model directory that go into its upload: safetensors weights, config,
    tokenizer and other text files; hidden files and folders, pickles and code are left out."""
    out = []
    for p in sorted(model_dir.rglob("*")):
        rel = p.relative_to(model_dir)
        if any(part.startswith(".") for part in rel.parts):
            continue
        if p.is_symlink() or not p.is_file():
            continue
        if p.name.lower().endswith(MODEL_FILE_SUFFIXES):
            out.append(p)
    return out


def pack_model_dir(model_dir: Path, dest: Path | None = None) -> Path:
    """Write the model directory's uploadable files (see :func:`model_files`) into a gzip tar
    (reproducible: fixed times and owners) and return its path.

    Raises :class:`InvalidRequest` (field ``model``) when the directory has no ``config.json`` or
    no ``.safetensors`` weights (save the model with ``save_pretrained(..., safe_serialization=True)``).
    """
    files = model_files(model_dir)
    names = {p.relative_to(model_dir).as_posix() for p in files}
    if "config.json" not in {posixpath_base(n) for n in names}:
        raise InvalidRequest(
            f"{str(model_dir)!r} is not a transformers model directory: it has no config.json", field="model"
        )
    if not any(n.endswith(".safetensors") for n in names):
        pickles = [p.name for p in model_dir.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".ckpt")]
        hint = (
            f" (it has {pickles[0]}: save the model with save_pretrained(dir, safe_serialization=True))"
            if pickles
            else ""
        )
        raise InvalidRequest(f"{str(model_dir)!r} holds no .safetensors weights{hint}", field="model")
    if dest is None:
        fd, name = tempfile.mkstemp(prefix="bitscout-model-", suffix=".tar.gz")
        os.close(fd)
        dest = Path(name)
    with (
        open(dest, "wb") as raw,
        gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0, compresslevel=1) as gz,
        tarfile.open(fileobj=gz, mode="w", format=tarfile.PAX_FORMAT) as tar,
    ):
        for p in files:
            info = tar.gettarinfo(str(p), arcname=p.relative_to(model_dir).as_posix())
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            info.mtime = 0
            info.mode = 0o644
            with open(p, "rb") as fh:
                tar.addfile(info, fh)
    return dest


def posixpath_base(name: str) -> str:
    return name.rsplit("/", 1)[-1]


def _model_source(
    model: Any, *, progress: bool | None
) -> tuple[ModelSource | None, _Upload | None, Path | None]:
    """(a source to send as is, or a local file to upload first, the local model directory if any)."""
    if isinstance(model, ModelSource):
        return model, None, None
    if isinstance(model, Mapping):
        return _validate(ModelSource, dict(model), prefix="model"), None, None
    if isinstance(model, os.PathLike) or isinstance(model, str):
        text = os.fspath(model)
        if isinstance(text, bytes):  # pragma: no cover - PathLike[bytes]
            text = text.decode()
        for prefix, key in (("server:", "path"), ("upload:", "upload_id")):
            if text.startswith(prefix):
                return _validate(ModelSource, {key: text[len(prefix) :]}, prefix="model"), None, None
        if text.startswith("hf:"):
            hf_id, _, rev = text[3:].partition("@")
            return (
                _validate(ModelSource, {"hf_id": hf_id, "revision": rev or None}, prefix="model"),
                None,
                None,
            )
        p = Path(text).expanduser()
        if p.is_dir():
            return (
                None,
                _Upload(
                    p, p.name + ".tar.gz", UploadKind.model, temporary=True, progress=progress, label="model"
                ),
                p,
            )
        if p.is_file():
            if not _is_archive(p):
                raise InvalidRequest(
                    f"{text!r} is a file but not a model archive (.zip, .tar, .tar.gz) nor a model directory",
                    field="model",
                )
            return None, _Upload(p, p.name, UploadKind.model, progress=progress, label="model"), None
        hf_id, at, rev = text.partition("@")
        if at and "/" in hf_id:
            return _validate(ModelSource, {"hf_id": hf_id, "revision": rev}, prefix="model"), None, None
        if isinstance(model, os.PathLike) or text.startswith((".", "/", "~")):
            raise InvalidRequest(f"no model directory or archive at {text!r}", field="model")
        return _validate(ModelSource, {"path": text}, prefix="model"), None, None
    raise InvalidRequest(
        f"model must be a path, a ModelSource or a mapping, not {type(model).__name__}", field="model"
    )


def _data_source(
    data: Any, options: Mapping[str, Any], *, progress: bool | None
) -> tuple[dict[str, Any], _Upload | None]:
    """(the data source's fields without the upload id, a local file to upload first)."""
    opts = dict(options)
    if isinstance(data, DataSource):
        return {**data.model_dump(mode="json", exclude_none=True), **opts}, None
    if isinstance(data, Mapping):
        return {**dict(data), **opts}, None
    if isinstance(data, os.PathLike) or isinstance(data, str):
        text = os.fspath(data)
        if isinstance(text, bytes):  # pragma: no cover
            text = text.decode()
        for prefix, key in (("server:", "path"), ("upload:", "upload_id"), ("dataset:", "dataset")):
            if text.startswith(prefix):
                return {key: text[len(prefix) :], **opts}, None
        p = Path(text).expanduser()
        if p.is_file():
            if not p.name.lower().endswith(DATA_SUFFIXES):
                raise InvalidRequest(
                    f"{text!r}: a data file must end with one of {', '.join(DATA_SUFFIXES)}", field="data"
                )
            return dict(opts), _Upload(p, p.name, UploadKind.data, progress=progress, label="data")
        if p.is_dir():
            raise InvalidRequest(
                f"{text!r} is a directory; data must be a JSONL, JSON or CSV file", field="data"
            )
        if isinstance(data, os.PathLike) or text.startswith((".", "/", "~")):
            raise InvalidRequest(f"no data file at {text!r}", field="data")
        if text.lower().endswith(DATA_SUFFIXES):
            return {"path": text, **opts}, None
        return {"dataset": text, **opts}, None
    raise InvalidRequest(
        f"data must be a path, a DataSource or a mapping, not {type(data).__name__}", field="data"
    )


_PLACEHOLDER_ID = "0" * 32


def prepare_submission(
    *,
    model: Any,
    data: Any,
    methods: Sequence[str] | str,
    budget: BudgetSpec | Mapping[str, Any] | None,
    task: Task | str | None,
    space: SearchSpaceSpec | Mapping[str, Any] | None,
    metric: str | None,
    seed: int | None,
    idempotency_key: str | None,
    data_options: Mapping[str, Any] | None,
    extra: Mapping[str, Any],
    progress: bool | None,
) -> _Prepared:
    """Check a submission completely (before anything is uploaded) and say what to upload."""
    model_src, model_up, model_dir = _model_source(model, progress=progress)
    data_fields, data_up = _data_source(data, data_options or {}, progress=progress)
    if model_dir is not None:
        check_local_model(model_dir, task)
    if task is None and model_dir is not None:
        task = detect_task(model_dir)
    if task is None:
        raise InvalidRequest(f"task is required ({', '.join(t.value for t in Task)})", field="task")
    if isinstance(methods, str):
        methods = [m.strip() for m in methods.split(",") if m.strip()]
    if budget is None:
        raise InvalidRequest("budget is required, e.g. budget={'max_size_mb': 30}", field="budget")
    body: dict[str, Any] = {
        "model": model_src.model_dump(mode="json", exclude_none=True) if model_src is not None else None,
        "task": _dump(task),
        "data": data_fields,
        "methods": [_dump(m) for m in methods],
        "budget": _dump(budget_from(budget)),
    }
    if space is not None:
        body["space"] = _dump(space)
    if metric is not None:
        body["metric"] = _dump(metric)
    if seed is not None:
        body["seed"] = seed
    for k, v in extra.items():
        if v is not None:
            body[k] = _dump(v)
    body["idempotency_key"] = idempotency_key or f"sdk-{uuid.uuid4().hex}"
    # Validate everything now, with placeholder ids standing in for what is still to upload.
    probe = json.loads(json.dumps(body))
    if model_up is not None:
        probe["model"] = {"upload_id": _PLACEHOLDER_ID}
    if data_up is not None:
        probe["data"] = {**probe["data"], "upload_id": _PLACEHOLDER_ID}
    _validate(JobCreate, probe)
    return _Prepared(body=body, model_upload=model_up, data_upload=data_up)


def materialize(up: _Upload, prepared: _Prepared) -> _Upload:
    """Pack a model directory into its temporary archive (a no-op for files)."""
    if up.kind is UploadKind.model and up.path.is_dir():
        archive = pack_model_dir(up.path)
        prepared.temporaries.append(archive)
        return _Upload(archive, up.filename, up.kind, temporary=True, progress=up.progress, label=up.label)
    return up


class _BaseClient:
    """Configuration, retry policy, request building and response parsing (no I/O)."""

    def __init__(
        self,
        url: str | None = None,
        token: str | None = None,
        *,
        timeout: TimeoutTypes = DEFAULT_TIMEOUT,
        retries: int | RetryPolicy = 3,
        config_path: str | os.PathLike[str] | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        self._config: ClientConfig = resolve_config(url, token, config_path=config_path)
        self.timeout = timeout if isinstance(timeout, httpx2.Timeout) else httpx2.Timeout(timeout)
        self.retry = retries if isinstance(retries, RetryPolicy) else RetryPolicy(max_retries=int(retries))
        self._extra_headers = dict(headers or {})

    # -- configuration -------------------------------------------------------------------------
    @property
    def url(self) -> str:
        """The service's base URL (without ``/api/v1``)."""
        return self._config.url

    @property
    def token(self) -> str | None:
        """The bearer token sent with every request (None: none configured)."""
        return self._config.token

    def __repr__(self) -> str:
        return f"{type(self).__name__}(url={self.url!r}, token={'set' if self.token else 'none'})"

    def _headers(self) -> dict[str, str]:
        from bitscout import __version__

        h = {"User-Agent": f"bitscout-sdk/{__version__}", "Accept": "application/json", **self._extra_headers}
        if self.token:
            h["Authorization"] = f"Bearer {self.token}"
        return h

    # -- requests ------------------------------------------------------------------------------
    @staticmethod
    def _api(path: str) -> str:
        return API_PREFIX + path

    def _request_args(self, call: _Call, file: BinaryIO | None = None) -> dict[str, Any]:
        args: dict[str, Any] = {"method": call.method, "url": self._api(call.path)}
        if call.params:
            args["params"] = {k: v for k, v in call.params.items() if v is not None}
        if call.json is not None:
            args["json"] = call.json
        if call.data is not None:
            args["data"] = call.data
        if file is not None and call.upload is not None:
            args["files"] = {"file": (call.upload.filename, file, "application/octet-stream")}
        args["timeout"] = call.timeout if call.timeout is not None else self.timeout
        return args

    def _retry_after(self, response: httpx2.Response) -> float | None:
        return parse_retry_after(response.headers.get("retry-after"))

    # -- responses -----------------------------------------------------------------------------
    def _error(self, response: httpx2.Response) -> BitscoutError:
        """The typed exception for an error response (its body already read)."""
        try:
            body: Any = response.json()
        except ValueError:
            body = response.text
        err = error_from_body(response.status_code, body)
        if isinstance(err, Unauthorized) and not self.token:
            err = Unauthorized(
                f"{err.message} (no token is configured: pass token=..., set BITSCOUT_TOKEN, or run "
                f"`bitscout serve`, which writes one to {self._config.config_path})",
                field=err.field,
                details=err.details,
                status=err.status,
            )
        return err

    def _unreachable(self, exc: Exception, attempts: int) -> ServiceUnavailable:
        what = type(exc).__name__
        tries = f" after {attempts} attempts" if attempts > 1 else ""
        return ServiceUnavailable(
            f"cannot reach the bitscout service at {self.url}{tries}: {what}: {exc}".rstrip(": "),
            details={"url": self.url, "error": what, "attempts": attempts},
        )

    @staticmethod
    def _parse(response: httpx2.Response, model: type[M]) -> M:
        try:
            return model.model_validate_json(response.content)
        except ValidationError as exc:
            raise BitscoutError(
                ErrorCode.internal,
                f"the service answered {response.request.method} {response.request.url.path} with a body "
                f"this SDK cannot read ({exc.error_count()} problems); is the SDK older than the server?",
                status=response.status_code,
            ) from exc

    @staticmethod
    def _resolve_body(
        budget: BudgetSpec | Mapping[str, Any] | None,
        methods: Sequence[str] | None,
        limits: Mapping[str, Any],
    ) -> dict[str, Any]:
        body: dict[str, Any] = {"budget": _dump(budget_from(budget, **limits))}
        if methods is not None:
            body["methods"] = [_dump(m) for m in methods]
        return _validate(ResolveRequest, body).model_dump(mode="json", exclude_none=True)


# --------------------------------------------------------------------------- downloads


def filename_from(response: httpx2.Response, default: str) -> str:
    """The base name the service gave a download (``Content-Disposition``), made safe."""
    import re
    from urllib.parse import unquote

    cd = response.headers.get("content-disposition", "")
    name = None
    m = re.search(r"filename\*\s*=\s*[^']*'[^']*'([^;]+)", cd)
    if m:
        name = unquote(m.group(1).strip().strip('"'))
    else:
        m = re.search(r'filename\s*=\s*"?([^";]+)"?', cd)
        if m:
            name = m.group(1).strip()
    name = os.path.basename((name or "").replace("\\", "/")).strip()
    if not name or name in (".", "..") or name.startswith("."):
        name = default
    return name


def finish_download(tmp: Path, name: str, dest_dir: Path, *, extract: bool) -> Path:
    """Move a downloaded file into place, or unpack an archive into ``dest_dir`` (regular files
    and folders only, never outside it); returns the file or the directory."""
    lower = name.lower()
    if extract and lower.endswith((".tar.gz", ".tgz", ".tar")):
        try:
            with tarfile.open(tmp, "r:*") as tar:
                members = [m for m in tar.getmembers() if m.isfile() or m.isdir()]
                tar.extractall(dest_dir, members=members, filter="data")
        except (tarfile.TarError, OSError, EOFError) as exc:
            raise BitscoutError(
                ErrorCode.internal, f"the downloaded archive {name} cannot be unpacked: {exc}"
            ) from exc
        finally:
            tmp.unlink(missing_ok=True)
        return dest_dir
    target = dest_dir / name
    os.replace(tmp, target)
    return target


@dataclass
class ExportWait:
    """One download of a point in a format, waiting through the service's 202 answers (the point is
    being exported) up to ``timeout`` seconds (None: no limit), never sooner than ``Retry-After``.
    The sync and async clients share it and only do the I/O and the sleeping.

    Example::

        >>> w = ExportWait("j", 3, "Dense", timeout=10)
        >>> w.format, w.call().params
        ('dense', {'format': 'dense'})
        >>> ExportWait("j", 3, "gguf", timeout=10)
        Traceback (most recent call last):
        bitscout.errors.InvalidRequest: format must be one of native, compressed-tensors, dense; got 'gguf'
    """

    job_id: str
    point_id: int
    format: str
    timeout: float | None = EXPORT_TIMEOUT_S
    started: float = field(default=0.0)

    def __post_init__(self) -> None:
        import time

        try:
            self.format = parse_export_format(self.format)
        except ValueError as exc:
            raise InvalidRequest(str(exc), field="format") from None
        if self.timeout is not None and not self.timeout >= 0:
            raise InvalidRequest(f"timeout must be >= 0 seconds or None, got {self.timeout!r}", field="timeout")
        self.started = time.monotonic()

    def call(self) -> _Call:
        return _Call(
            "GET",
            f"/jobs/{seg(self.job_id)}/points/{int(self.point_id)}/artifact",
            params={"format": self.format},
            stream=True,
            timeout=TRANSFER_TIMEOUT,
        )

    def pause(self, response: httpx2.Response) -> float:
        """Seconds to sleep before asking again after a 202 (its body already read); raises
        ``TimeoutError`` once ``timeout`` has passed (the export goes on: download again later)."""
        import time

        try:
            state: ExportRead | None = ExportRead.model_validate_json(response.content)
        except ValidationError:
            state = None
        wait = parse_retry_after(response.headers.get("retry-after"))
        if wait is None:
            wait = state.retry_after_s if state is not None and state.retry_after_s is not None else 2.0
        if self.timeout is None:
            return wait
        left = self.started + self.timeout - time.monotonic()
        if left <= 0:
            what = state.state.value if state is not None else "pending"
            raise TimeoutError(
                f"point {self.point_id} of job {self.job_id} is still being exported as {self.format} ({what}) after "
                f"{self.timeout:g} s; download it again later (the export goes on), or pass a longer timeout"
            )
        return min(wait, left)


def download_tmp(dest_dir: str | os.PathLike[str]) -> tuple[Path, Path, BinaryIO]:
    """Create ``dest_dir`` and a temporary file in it for a download."""
    d = Path(dest_dir).expanduser()
    d.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=d, prefix=".bitscout-download-")
    return d, Path(name), os.fdopen(fd, "wb")


def upload_from_path(
    path: str | os.PathLike[str], kind: UploadKind | str | None, *, progress: bool | None
) -> tuple[_Prepared, _Upload]:
    """What :meth:`Client.upload` sends for a local path (a directory is a model)."""
    p = Path(path).expanduser()
    k = UploadKind(kind) if kind is not None else None
    if p.is_dir():
        if k is UploadKind.data:
            raise InvalidRequest(f"{str(p)!r} is a directory; a data upload is one file", field="file")
        return _Prepared(body={}), _Upload(
            p, p.name + ".tar.gz", UploadKind.model, temporary=True, progress=progress, label="model"
        )
    if not p.is_file():
        raise InvalidRequest(f"no file or directory at {str(p)!r}", field="file")
    if k is None:
        k = UploadKind.model if _is_archive(p) else UploadKind.data
    return _Prepared(body={}), _Upload(p, p.name, k, progress=progress, label=k.value)


def seg(value: str) -> str:
    """A URL path segment, percent-encoded."""
    from urllib.parse import quote

    return quote(str(value), safe="")
