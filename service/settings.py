"""Process configuration of the service (pydantic-settings).

Read only when a :class:`Settings` is constructed (at the process edge: ``bitscout serve``, the
CLI, a test), never at import. Every field can be set by an environment variable with the prefix
``BITSCOUT_`` (``BITSCOUT_DATA_DIR``, ``BITSCOUT_MAX_UPLOAD_MB``...); the database URL also from
``DATABASE_URL``. Lists (``BITSCOUT_ALLOWED_HOSTS``) are JSON or comma-separated.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Any

from pydantic import AliasChoices, Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict


def default_data_dir() -> Path:
    """``$XDG_DATA_HOME/bitscout`` (``~/.local/share/bitscout``)."""
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / "bitscout"


def default_config_path() -> Path:
    """The user's client config file: ``$BITSCOUT_CONFIG`` or ``$XDG_CONFIG_HOME/bitscout/config.json``."""
    explicit = os.environ.get("BITSCOUT_CONFIG")
    if explicit:
        return Path(explicit).expanduser()
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "bitscout" / "config.json"


def normalize_database_url(url: str) -> str:
    """Use the psycopg 3 driver for plain ``postgresql://`` / ``postgres://`` URLs."""
    for prefix in ("postgres://", "postgresql://"):
        if url.startswith(prefix):
            return "postgresql+psycopg://" + url[len(prefix) :]
    return url


class Settings(BaseSettings):
    """Configuration of the API process (and of the store the workers open)."""

    model_config = SettingsConfigDict(env_prefix="BITSCOUT_", extra="ignore", populate_by_name=True)

    data_dir: Path = Field(
        default_factory=default_data_dir, description="SQLite database, uploads, artifacts."
    )
    database_url: str | None = Field(
        default=None,
        validation_alias=AliasChoices("BITSCOUT_DATABASE_URL", "DATABASE_URL"),
        description="SQLAlchemy URL; default: SQLite in data_dir. postgresql:// uses psycopg 3.",
    )
    model_root: Path | None = Field(default=None, description="Server-side model paths must lie under this.")
    data_root: Path | None = Field(default=None, description="Server-side data paths must lie under this.")
    public_url: str | None = Field(
        default=None, description="How clients reach this server (written to the config)."
    )

    max_upload_mb: float = Field(default=2048, gt=0, description="Largest upload.")
    max_request_kb: float = Field(default=1024, gt=0, description="Largest JSON request body.")
    max_archive_files: int = Field(default=256, ge=1, description="Most files in an uploaded model archive.")
    max_archive_unpacked_mb: float = Field(default=16384, gt=0, description="Largest unpacked model archive.")

    submit_rate_per_min: float = Field(
        default=120, ge=0, description="Job submissions per token per minute (0: off)."
    )
    submit_burst: int = Field(
        default=30, ge=1, description="Submissions allowed at once before the rate applies."
    )
    upload_rate_per_min: float = Field(default=30, ge=0, description="Uploads per token per minute (0: off).")
    upload_burst: int = Field(
        default=10, ge=1, description="Uploads allowed at once before the rate applies."
    )
    max_active_jobs_per_user: int = Field(
        default=1000, ge=1, description="Queued + running jobs a user may have."
    )

    allowed_hosts: Annotated[list[str], NoDecode] = Field(
        default_factory=lambda: ["*"], description="Host headers accepted ('*': any)."
    )
    token_cache_s: float = Field(
        default=2.0, ge=0, description="How long a verified token is trusted in memory."
    )
    check_schema: bool = Field(default=True, description="Refuse to start when the schema is not at head.")
    auto_upgrade: bool = Field(default=False, description="Apply migrations at start instead of refusing.")
    metrics: bool = Field(
        default=True, description="Serve Prometheus metrics at /metrics (to admin tokens and metrics_token)."
    )
    metrics_token: SecretStr | None = Field(
        default=None,
        min_length=16,
        description="A secret that lets a Prometheus scraper read /metrics ('Authorization: Bearer <secret>', "
        "e.g. its bearer_token_file) without an API token; admin API tokens are always accepted.",
    )
    otel: bool = Field(default=False, description="Keep FastAPI's native OpenTelemetry instrumentation on.")
    pool_size: int = Field(default=10, ge=1, description="Database connections per process (PostgreSQL).")

    @field_validator("allowed_hosts", mode="before")
    @classmethod
    def _split_hosts(cls, v: Any) -> Any:
        if isinstance(v, str):
            v = v.strip()
            if v.startswith("["):
                import json

                return json.loads(v)
            return [h.strip() for h in v.split(",") if h.strip()]
        return v

    @model_validator(mode="after")
    def _defaults(self) -> Settings:
        self.data_dir = Path(self.data_dir).expanduser()
        if self.database_url is None:
            self.database_url = f"sqlite:///{self.data_dir / 'bitscout.db'}"
        self.database_url = normalize_database_url(self.database_url)
        if self.model_root is not None:
            self.model_root = Path(self.model_root).expanduser()
        if self.data_root is not None:
            self.data_root = Path(self.data_root).expanduser()
        return self

    @property
    def url(self) -> str:
        """The database URL (never None after construction)."""
        assert self.database_url is not None  # noqa: S101 - set by the validator
        return self.database_url

    @property
    def blob_dir(self) -> Path:
        """Where uploads and artifacts are stored, by checksum."""
        return self.data_dir / "blobs"

    @property
    def is_sqlite(self) -> bool:
        return self.url.startswith("sqlite")
