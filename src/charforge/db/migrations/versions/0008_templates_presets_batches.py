"""Each user's own prompt templates and saved generation presets (built-in templates live in
code, read-only); batches of jobs.

Revision ID: 0008
Revises: 0007
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None


def _owned(name: str, *columns: sa.Column[object]) -> None:
    op.create_table(
        name,
        sa.Column("id", sa.String(36), primary_key=True),
        sa.Column(
            "owner_id", sa.Integer(), sa.ForeignKey("users.id", ondelete="CASCADE"), nullable=False
        ),
        sa.Column("name", sa.String(100), nullable=False),
        *columns,
        sa.Column("params", sa.JSON(), nullable=False),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.Column("updated_at", sa.DateTime(), nullable=False),
        sa.UniqueConstraint("owner_id", "name", name=f"uq_{name}_owner_name"),
    )


def upgrade() -> None:
    _owned(
        "prompt_templates",
        sa.Column("prompt", sa.Text(), nullable=False),
        sa.Column("negative_prompt", sa.Text(), nullable=False, server_default=""),
    )
    _owned("presets")
    op.create_table(
        "batches",
        sa.Column("id", sa.String(36), primary_key=True),
        sa.Column(
            "owner_id", sa.Integer(), sa.ForeignKey("users.id", ondelete="CASCADE"), nullable=False
        ),
        sa.Column("total", sa.Integer(), nullable=False),
        sa.Column("request", sa.JSON(), nullable=False),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.Column("cancelled_at", sa.DateTime()),
    )
    op.create_index("ix_batches_owner_created", "batches", ["owner_id", "created_at"])
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("batch_id", sa.String(36)))
        batch.add_column(sa.Column("batch_index", sa.Integer()))
        batch.create_foreign_key(
            "fk_jobs_batch_id", "batches", ["batch_id"], ["id"], ondelete="CASCADE"
        )
    op.create_index("ix_jobs_batch", "jobs", ["batch_id", "batch_index"])


def downgrade() -> None:
    op.drop_index("ix_jobs_batch", table_name="jobs")
    with op.batch_alter_table("jobs") as batch:
        batch.drop_constraint("fk_jobs_batch_id", type_="foreignkey")
        batch.drop_column("batch_index")
        batch.drop_column("batch_id")
    op.drop_index("ix_batches_owner_created", table_name="batches")
    op.drop_table("batches")
    op.drop_table("presets")
    op.drop_table("prompt_templates")
