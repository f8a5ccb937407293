"""bitscout: mixed-precision quantization and group-pruning search for transformer models, as a
service. This package is the SDK (and the wire schemas the service shares with it); it needs only
pydantic, httpx2, tqdm and PyYAML. :func:`apply` alone needs ``pip install 'bitscout[search]'``.

Example::

    >>> import bitscout
    >>> client = bitscout.Client()          # URL and token from BITSCOUT_URL / BITSCOUT_TOKEN or the config file
    >>> job = client.submit(                                             # doctest: +SKIP
    ...     model="./minilm-bbc",           # a local model directory: uploaded for you
    ...     data="bbc.jsonl",               # a local JSONL / CSV file: uploaded too
    ...     methods=["kl"],
    ...     budget={"max_size_mb": 30},
    ... )
    >>> job.wait()                          # progress bar; raises bitscout.JobFailed if it failed  # doctest: +SKIP
    >>> front = job.pareto()                # every point; front.to_pandas(), front.plot()         # doctest: +SKIP
    >>> point = job.best(max_size_mb=20)                                 # doctest: +SKIP
    >>> path = job.download(point, "quantized/")                        # doctest: +SKIP
    >>> model = bitscout.apply(my_model, path)                           # doctest: +SKIP
"""

from __future__ import annotations

import importlib.metadata as _metadata
import typing as _typing

try:
    __version__: str = _metadata.version("bitscout")
except _metadata.PackageNotFoundError:  # pragma: no cover - running from a source tree
    __version__ = "0.1.0"

if _typing.TYPE_CHECKING:
    from bitscout._apply import apply
    from bitscout._async import AsyncClient
    from bitscout._base import RetryPolicy
    from bitscout._config import DEFAULT_URL, default_config_path
    from bitscout._front import Front, Point
    from bitscout._job import AsyncJob, Job
    from bitscout._sync import Client
    from bitscout.errors import (
        BitscoutError,
        Conflict,
        ErrorCode,
        Forbidden,
        InternalError,
        InvalidRequest,
        JobFailed,
        NotFound,
        PayloadTooLarge,
        RateLimited,
        ServiceUnavailable,
        Unauthorized,
    )
    from bitscout.schemas import (
        BudgetSpec,
        DataSource,
        Device,
        JobEventRead,
        JobRead,
        JobSpec,
        JobStatus,
        Method,
        Metric,
        ModelSource,
        ParetoPointRead,
        ResolveRead,
        SearchSpaceSpec,
        Task,
        UploadRead,
    )

#: Public name -> the module that defines it. ``import bitscout`` loads none of them: a name is
#: imported on first use (PEP 562), so ``import bitscout.errors`` or ``bitscout.rules`` (which the
#: search library and the service import) stays cheap and pulls no HTTP client.
_EXPORTS: dict[str, str] = {
    "AsyncClient": "bitscout._async",
    "RetryPolicy": "bitscout._base",
    "DEFAULT_URL": "bitscout._config",
    "default_config_path": "bitscout._config",
    "Front": "bitscout._front",
    "Point": "bitscout._front",
    "AsyncJob": "bitscout._job",
    "Job": "bitscout._job",
    "Client": "bitscout._sync",
    "apply": "bitscout._apply",
    "BitscoutError": "bitscout.errors",
    "Conflict": "bitscout.errors",
    "ErrorCode": "bitscout.errors",
    "Forbidden": "bitscout.errors",
    "InternalError": "bitscout.errors",
    "InvalidRequest": "bitscout.errors",
    "JobFailed": "bitscout.errors",
    "NotFound": "bitscout.errors",
    "PayloadTooLarge": "bitscout.errors",
    "RateLimited": "bitscout.errors",
    "ServiceUnavailable": "bitscout.errors",
    "Unauthorized": "bitscout.errors",
    "BudgetSpec": "bitscout.schemas",
    "DataSource": "bitscout.schemas",
    "Device": "bitscout.schemas",
    "JobEventRead": "bitscout.schemas",
    "JobRead": "bitscout.schemas",
    "JobSpec": "bitscout.schemas",
    "JobStatus": "bitscout.schemas",
    "Method": "bitscout.schemas",
    "Metric": "bitscout.schemas",
    "ModelSource": "bitscout.schemas",
    "ParetoPointRead": "bitscout.schemas",
    "PointProvenance": "bitscout.schemas",
    "ResolveRead": "bitscout.schemas",
    "SearchSpaceSpec": "bitscout.schemas",
    "Task": "bitscout.schemas",
    "UploadRead": "bitscout.schemas",
}


def __getattr__(name: str) -> _typing.Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'bitscout' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))


__all__ = [
    "DEFAULT_URL",
    "AsyncClient",
    "AsyncJob",
    "BitscoutError",
    "BudgetSpec",
    "Client",
    "Conflict",
    "DataSource",
    "Device",
    "ErrorCode",
    "Forbidden",
    "Front",
    "InternalError",
    "InvalidRequest",
    "Job",
    "JobEventRead",
    "JobFailed",
    "JobRead",
    "JobSpec",
    "JobStatus",
    "Method",
    "Metric",
    "ModelSource",
    "NotFound",
    "ParetoPointRead",
    "PayloadTooLarge",
    "Point",
    "PointProvenance",
    "RateLimited",
    "ResolveRead",
    "RetryPolicy",
    "SearchSpaceSpec",
    "ServiceUnavailable",
    "Task",
    "Unauthorized",
    "UploadRead",
    "__version__",
    "apply",
    "default_config_path",
]
