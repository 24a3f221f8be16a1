"""Durable jobs: leases, retries with backoff, several images per job, progress, one row per
attempt, and at most one stored image per requested image.

Revision ID: 0003
Revises: 0002
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("count", sa.Integer(), nullable=False, server_default="1"))
        batch.add_column(sa.Column("lease_owner", sa.String(100)))
        batch.add_column(sa.Column("lease_until", sa.DateTime()))
        batch.add_column(sa.Column("not_before", sa.DateTime()))
        batch.add_column(sa.Column("enqueued_at", sa.DateTime()))
        batch.add_column(sa.Column("progress", sa.Float()))
        batch.add_column(sa.Column("step", sa.Integer()))
        batch.add_column(sa.Column("steps", sa.Integer()))
    op.create_index("ix_jobs_state_checkpoint", "jobs", ["state", "checkpoint"])
    op.create_table(
        "job_attempts",
        sa.Column("id", sa.Integer(), primary_key=True, autoincrement=True),
        sa.Column(
            "job_id", sa.String(36), sa.ForeignKey("jobs.id", ondelete="CASCADE"), nullable=False
        ),
        sa.Column("number", sa.Integer(), nullable=False),
        sa.Column("backend", sa.String(100), nullable=False),
        sa.Column("worker", sa.String(100), nullable=False),
        sa.Column("outcome", sa.String(16), nullable=False),
        sa.Column("error_code", sa.String(64)),
        sa.Column("error_message", sa.Text()),
        sa.Column("started_at", sa.DateTime(), nullable=False),
        sa.Column("finished_at", sa.DateTime()),
    )
    op.create_index("ux_job_attempts_job_number", "job_attempts", ["job_id", "number"], unique=True)
    op.create_index("ux_images_job_position", "images", ["job_id", "position"], unique=True)


def downgrade() -> None:
    op.drop_index("ux_images_job_position", table_name="images")
    op.drop_index("ux_job_attempts_job_number", table_name="job_attempts")
    op.drop_table("job_attempts")
    op.drop_index("ix_jobs_state_checkpoint", table_name="jobs")
    with op.batch_alter_table("jobs") as batch:
        for column in (
            "steps",
            "step",
            "progress",
            "enqueued_at",
            "not_before",
            "lease_until",
            "lease_owner",
            "count",
        ):
            batch.drop_column(column)
