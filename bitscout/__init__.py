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

try:
    __version__: str = _metadata.version("bitscout")
except _metadata.PackageNotFoundError:  # pragma: no cover - running from a source tree
    __version__ = "0.1.0"

from bitscout._async import AsyncClient
from bitscout._base import RetryPolicy
from bitscout._config import DEFAULT_URL, default_config_path
from bitscout._front import Front, Point
from bitscout._job import AsyncJob, Job
from bitscout._sync import Client
from bitscout.apply import apply
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
