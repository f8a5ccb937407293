"""Process configuration of the workers (pydantic-settings).

Read only when a :class:`WorkerSettings` is constructed (at the process edge: ``bitscout serve``,
``bitscout dispatcher``, a test), never at import. Every field can be set by an environment
variable with the prefix ``BITSCOUT_`` (``BITSCOUT_MAX_CONCURRENT_JOBS``...); the Ray address also
from ``RAY_ADDRESS``. Where the database, the file store and the model / data roots are comes
from the service's :class:`~service.settings.Settings` (``BITSCOUT_DATA_DIR``, ``DATABASE_URL``...).

The runners on the cluster never read the environment: the dispatcher hands each one a
:class:`RunnerConfig` built here.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from pathlib import Path

from pydantic import AliasChoices, Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from service.settings import Settings


def default_dispatcher_id() -> str:
    """``dispatcher@HOST``: stable across restarts on one host, so a restarted dispatcher finds
    the runners its previous run started."""
    return f"dispatcher@{socket.gethostname()}"


class WorkerSettings(BaseSettings):
    """Configuration of the dispatcher and of the job runners it starts."""

    model_config = SettingsConfigDict(env_prefix="BITSCOUT_", extra="ignore", populate_by_name=True)

    ray_address: str | None = Field(
        default=None,
        validation_alias=AliasChoices("BITSCOUT_RAY_ADDRESS", "RAY_ADDRESS"),
        description="Ray cluster to connect to ('auto', 'HOST:PORT', 'ray://HOST:PORT'); None starts a local Ray.",
    )
    ray_namespace: str = Field(default="bitscout", min_length=1, description="Ray namespace of the runners.")
    ray_num_cpus: int | None = Field(default=None, ge=1, description="CPUs of a local Ray (default: all).")
    ray_num_gpus: int | None = Field(default=None, ge=0, description="GPUs of a local Ray (default: all).")

    dispatcher_id: str = Field(
        default_factory=default_dispatcher_id,
        min_length=1,
        max_length=96,
        description="Who claims jobs; runners started under this id are adopted after a restart.",
    )
    max_concurrent_jobs: int = Field(default=2, ge=1, le=1024, description="Jobs this dispatcher runs at once.")
    max_concurrent_exports: int = Field(
        default=1, ge=1, le=1024, description="Exports of stored points (asked for by downloads) run at once."
    )
    poll_interval_s: float = Field(default=0.5, gt=0, le=60, description="How often the queue is polled.")
    heartbeat_interval_s: float = Field(
        default=2.0, gt=0, le=600, description="How often a runner records progress and its heartbeat."
    )
    stale_after_s: float = Field(
        default=60.0, gt=0, description="A running job without a heartbeat for this long is re-queued."
    )
    max_attempts: int = Field(
        default=3, ge=1, le=100, description="Starts of a job before a lost worker fails it."
    )
    cancel_grace_s: float = Field(
        default=30.0, gt=0, description="A canceled job's runner is killed if it has not stopped after this."
    )
    check_resources: bool = Field(
        default=True,
        description="Fail a job at once when no node of the cluster has the CPUs / GPUs it asks for "
        "(turn off with an autoscaling cluster).",
    )
    eval_workers: int = Field(
        default=1,
        ge=0,
        le=256,
        description="Ray actors per job that evaluate candidate maps next to the runner (0: the runner alone).",
    )
    eval_cpus: float = Field(default=1.0, gt=0, le=512, description="CPUs each evaluation actor asks Ray for.")
    work_dir: Path | None = Field(
        default=None,
        description="Extracted model archives, data copies and NSGA-II studies (default: DATA_DIR/work).",
    )


@dataclass(frozen=True)
class RunnerConfig:
    """What a job runner needs to know, handed to it by the dispatcher (picklable, no secrets
    beyond the database URL)."""

    database_url: str
    blob_dir: str
    work_dir: str
    model_root: str | None = None
    data_root: str | None = None
    max_archive_files: int = 256
    max_archive_unpacked_bytes: int = 16 * 10**9
    heartbeat_interval_s: float = 2.0
    eval_workers: int = 1
    eval_cpus: float = 1.0
    ray_namespace: str = "bitscout"

    @classmethod
    def build(cls, service: Settings, workers: WorkerSettings) -> RunnerConfig:
        work = workers.work_dir or (service.data_dir / "work")
        return cls(
            database_url=service.url,
            blob_dir=str(Path(service.blob_dir).resolve()),
            work_dir=str(Path(work).expanduser().resolve()),
            model_root=None if service.model_root is None else str(service.model_root),
            data_root=None if service.data_root is None else str(service.data_root),
            max_archive_files=service.max_archive_files,
            max_archive_unpacked_bytes=int(service.max_archive_unpacked_mb * 1e6),
            heartbeat_interval_s=workers.heartbeat_interval_s,
            eval_workers=workers.eval_workers,
            eval_cpus=workers.eval_cpus,
            ray_namespace=workers.ray_namespace,
        )


def process_label() -> str:
    """``host:pid`` of this process (for events)."""
    return f"{socket.gethostname()}:{os.getpid()}"
