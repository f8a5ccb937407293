"""SQLAlchemy 2 ORM rows of the service (``...Row``). Only :mod:`service.store` uses them.

The schema is owned by the Alembic migrations in ``migrations/``; a test checks that these
models and the migrations agree. Times are stored in UTC (``timestamptz`` on PostgreSQL, naive
UTC text on SQLite) and always read back as aware UTC datetimes.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from sqlalchemy.types import TypeDecorator

#: Alembic's version table for this project (so it can share a database with others).
VERSION_TABLE = "bitscout_alembic_version"


def utcnow() -> datetime:
    return datetime.now(UTC)


class UTCDateTime(TypeDecorator[datetime]):
    """A timezone-aware UTC datetime on every backend."""

    impl = sa.DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: sa.Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            value = value.replace(tzinfo=UTC)
        value = value.astimezone(UTC)
        if dialect.name == "sqlite":
            return value.replace(tzinfo=None)
        return value

    def process_result_value(self, value: datetime | None, dialect: sa.Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            return value.replace(tzinfo=UTC)
        return value.astimezone(UTC)


NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class Base(DeclarativeBase):
    metadata = sa.MetaData(naming_convention=NAMING_CONVENTION)
    type_annotation_map = {datetime: UTCDateTime(), dict[str, Any]: sa.JSON()}


class JobRow(Base):
    __tablename__ = "jobs"
    __table_args__ = (
        sa.UniqueConstraint("owner", "idempotency_key", name="uq_jobs_owner_idempotency_key"),
        sa.Index("ix_jobs_status_created_at", "status", "created_at"),
        sa.Index("ix_jobs_owner_created_at", "owner", "created_at"),
    )

    id: Mapped[str] = mapped_column(sa.String(32), primary_key=True)
    owner: Mapped[str] = mapped_column(sa.String(128))
    status: Mapped[str] = mapped_column(sa.String(16))
    spec: Mapped[dict[str, Any]] = mapped_column(sa.JSON())
    idempotency_key: Mapped[str | None] = mapped_column(sa.String(128))
    progress: Mapped[float] = mapped_column(sa.Float(), default=0.0)
    stage: Mapped[str | None] = mapped_column(sa.String(128))
    message: Mapped[str | None] = mapped_column(sa.Text())
    created_at: Mapped[datetime] = mapped_column(UTCDateTime())
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime())
    started_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    heartbeat_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    attempts: Mapped[int] = mapped_column(sa.Integer(), default=0)
    claimed_by: Mapped[str | None] = mapped_column(sa.String(128))
    cancel_requested: Mapped[bool] = mapped_column(sa.Boolean(), default=False)
    error_code: Mapped[str | None] = mapped_column(sa.String(32))
    error_message: Mapped[str | None] = mapped_column(sa.Text())
    result_info: Mapped[dict[str, Any] | None] = mapped_column(sa.JSON())
    n_points: Mapped[int] = mapped_column(sa.Integer(), default=0)
    recommended_point: Mapped[int | None] = mapped_column(sa.Integer())


class JobEventRow(Base):
    __tablename__ = "job_events"
    __table_args__ = (sa.Index("ix_job_events_job_id_id", "job_id", "id"),)

    id: Mapped[int] = mapped_column(sa.Integer(), primary_key=True, autoincrement=True)
    job_id: Mapped[str] = mapped_column(sa.String(32), sa.ForeignKey("jobs.id", ondelete="CASCADE"))
    at: Mapped[datetime] = mapped_column(UTCDateTime())
    kind: Mapped[str] = mapped_column(sa.String(32))
    stage: Mapped[str | None] = mapped_column(sa.String(128))
    message: Mapped[str | None] = mapped_column(sa.Text())
    data: Mapped[dict[str, Any] | None] = mapped_column(sa.JSON())


class SensitivityRow(Base):
    __tablename__ = "sensitivities"
    __table_args__ = (
        sa.UniqueConstraint("job_id", "method", "space_key", name="uq_sensitivities_job_method_space"),
    )

    id: Mapped[int] = mapped_column(sa.Integer(), primary_key=True, autoincrement=True)
    job_id: Mapped[str] = mapped_column(sa.String(32), sa.ForeignKey("jobs.id", ondelete="CASCADE"))
    method: Mapped[str] = mapped_column(sa.String(32))
    space_key: Mapped[str] = mapped_column(sa.String(64))
    table: Mapped[dict[str, Any]] = mapped_column(sa.JSON())
    created_at: Mapped[datetime] = mapped_column(UTCDateTime())


class SpaceRow(Base):
    __tablename__ = "job_spaces"

    job_id: Mapped[str] = mapped_column(
        sa.String(32), sa.ForeignKey("jobs.id", ondelete="CASCADE"), primary_key=True
    )
    space_key: Mapped[str] = mapped_column(sa.String(64))
    space: Mapped[dict[str, Any]] = mapped_column(sa.JSON())
    created_at: Mapped[datetime] = mapped_column(UTCDateTime())


class PointRow(Base):
    __tablename__ = "points"

    job_id: Mapped[str] = mapped_column(
        sa.String(32), sa.ForeignKey("jobs.id", ondelete="CASCADE"), primary_key=True
    )
    idx: Mapped[int] = mapped_column(sa.Integer(), primary_key=True, autoincrement=False)
    method: Mapped[str] = mapped_column(sa.String(32))
    label: Mapped[str] = mapped_column(sa.Text(), default="")
    precision_map: Mapped[dict[str, Any]] = mapped_column(sa.JSON())
    size_bytes: Mapped[float] = mapped_column(sa.Float())
    avg_bits: Mapped[float] = mapped_column(sa.Float())
    bops: Mapped[float] = mapped_column(sa.Float())
    latency_ms: Mapped[float] = mapped_column(sa.Float())
    metrics: Mapped[dict[str, Any]] = mapped_column(sa.JSON())
    refined: Mapped[bool] = mapped_column(sa.Boolean(), default=False)
    refined_from: Mapped[int | None] = mapped_column(sa.Integer())
    on_front: Mapped[bool] = mapped_column(sa.Boolean(), default=True)
    meets_budget: Mapped[bool] = mapped_column(sa.Boolean(), default=False)
    predicted: Mapped[float | None] = mapped_column(sa.Float())
    budget: Mapped[dict[str, Any] | None] = mapped_column(sa.JSON())
    extra: Mapped[dict[str, Any] | None] = mapped_column(sa.JSON())
    artifact_sha256: Mapped[str | None] = mapped_column(sa.String(64))
    artifact_size: Mapped[int | None] = mapped_column(sa.BigInteger())
    artifact_name: Mapped[str | None] = mapped_column(sa.String(256))


class ExportRow(Base):
    """A point's export into a format it is not stored in: a request the service records before the
    workers run it (``state`` pending -> running -> succeeded | failed), then the artifact it stored."""

    __tablename__ = "point_exports"
    __table_args__ = (
        sa.ForeignKeyConstraint(
            ["job_id", "point_idx"], ["points.job_id", "points.idx"], ondelete="CASCADE",
            name="fk_point_exports_job_id_points",
        ),
        sa.Index("ix_point_exports_state_created_at", "state", "created_at"),
    )  # fmt: skip

    job_id: Mapped[str] = mapped_column(sa.String(32), primary_key=True)
    point_idx: Mapped[int] = mapped_column(sa.Integer(), primary_key=True, autoincrement=False)
    format: Mapped[str] = mapped_column(sa.String(32), primary_key=True)
    state: Mapped[str] = mapped_column(sa.String(16))
    attempts: Mapped[int] = mapped_column(sa.Integer(), default=0)
    claimed_by: Mapped[str | None] = mapped_column(sa.String(128))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime())
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime())
    heartbeat_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    error_code: Mapped[str | None] = mapped_column(sa.String(32))
    error_message: Mapped[str | None] = mapped_column(sa.Text())
    error_field: Mapped[str | None] = mapped_column(sa.String(500))
    artifact_sha256: Mapped[str | None] = mapped_column(sa.String(64))
    artifact_size: Mapped[int | None] = mapped_column(sa.BigInteger())
    artifact_name: Mapped[str | None] = mapped_column(sa.String(256))


class UploadRow(Base):
    __tablename__ = "uploads"
    __table_args__ = (sa.Index("ix_uploads_owner", "owner"),)

    id: Mapped[str] = mapped_column(sa.String(32), primary_key=True)
    owner: Mapped[str] = mapped_column(sa.String(128))
    filename: Mapped[str] = mapped_column(sa.String(256))
    kind: Mapped[str] = mapped_column(sa.String(16))
    size: Mapped[int] = mapped_column(sa.BigInteger())
    sha256: Mapped[str] = mapped_column(sa.String(64))
    meta: Mapped[dict[str, Any] | None] = mapped_column(sa.JSON())
    created_at: Mapped[datetime] = mapped_column(UTCDateTime())


class TokenRow(Base):
    __tablename__ = "api_tokens"
    __table_args__ = (sa.Index("ix_api_tokens_name", "name"),)

    id: Mapped[str] = mapped_column(sa.String(32), primary_key=True)
    name: Mapped[str] = mapped_column(sa.String(128))
    token_hash: Mapped[str] = mapped_column(sa.String(64), unique=True)
    prefix: Mapped[str] = mapped_column(sa.String(16))
    admin: Mapped[bool] = mapped_column(sa.Boolean(), default=False)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime())
    last_used_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    revoked_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
