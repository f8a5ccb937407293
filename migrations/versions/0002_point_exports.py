"""point exports: a point's export into a format it is not stored in

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-03 15:30:00.000000
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op


revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "point_exports",
        sa.Column("job_id", sa.String(length=32), nullable=False),
        sa.Column("point_idx", sa.Integer(), autoincrement=False, nullable=False),
        sa.Column("format", sa.String(length=32), nullable=False),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("claimed_by", sa.String(length=128), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("heartbeat_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("finished_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("error_code", sa.String(length=32), nullable=True),
        sa.Column("error_message", sa.Text(), nullable=True),
        sa.Column("error_field", sa.String(length=500), nullable=True),
        sa.Column("artifact_sha256", sa.String(length=64), nullable=True),
        sa.Column("artifact_size", sa.BigInteger(), nullable=True),
        sa.Column("artifact_name", sa.String(length=256), nullable=True),
        sa.ForeignKeyConstraint(
            ["job_id", "point_idx"],
            ["points.job_id", "points.idx"],
            name="fk_point_exports_job_id_points",
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("job_id", "point_idx", "format", name=op.f("pk_point_exports")),
    )
    with op.batch_alter_table("point_exports", schema=None) as batch_op:
        batch_op.create_index("ix_point_exports_state_created_at", ["state", "created_at"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("point_exports", schema=None) as batch_op:
        batch_op.drop_index("ix_point_exports_state_created_at")
    op.drop_table("point_exports")
