"""Identity: reference images per character, the character's own negative prompt, LoRAs, seed,
identity strength and imported card; each job's identity plan and tries; each image's identity,
consistency score and style transfer.

Revision ID: 0004
Revises: 0003
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None

_JOB_COLUMNS = ("identity", "style_transfer")
_IMAGE_COLUMNS = ("identity", "consistency", "style_transfer")


def upgrade() -> None:
    with op.batch_alter_table("characters") as batch:
        batch.add_column(sa.Column("negative_prompt", sa.Text(), nullable=False, server_default=""))
        batch.add_column(sa.Column("loras", sa.JSON()))
        batch.add_column(sa.Column("seed", sa.BigInteger()))
        batch.add_column(
            sa.Column("identity_strength", sa.Float(), nullable=False, server_default="0.6")
        )
        batch.add_column(sa.Column("card", sa.JSON()))
    op.create_table(
        "character_references",
        sa.Column("id", sa.String(36), primary_key=True),
        sa.Column(
            "owner_id", sa.Integer(), sa.ForeignKey("users.id", ondelete="CASCADE"), nullable=False
        ),
        sa.Column(
            "character_id",
            sa.String(36),
            sa.ForeignKey("characters.id", ondelete="CASCADE"),
            nullable=False,
        ),
        sa.Column("file_path", sa.String(512), nullable=False),
        sa.Column("width", sa.Integer(), nullable=False),
        sa.Column("height", sa.Integer(), nullable=False),
        sa.Column("sha256", sa.String(64), nullable=False),
        sa.Column("source", sa.String(16), nullable=False),
        sa.Column("image_id", sa.String(36)),
        sa.Column("created_at", sa.DateTime(), nullable=False),
    )
    op.create_index(
        "ix_references_character_created", "character_references", ["character_id", "created_at"]
    )
    with op.batch_alter_table("jobs") as batch:
        for name in _JOB_COLUMNS:
            batch.add_column(sa.Column(name, sa.JSON()))
    with op.batch_alter_table("images") as batch:
        for name in _IMAGE_COLUMNS:
            batch.add_column(sa.Column(name, sa.JSON()))


def downgrade() -> None:
    with op.batch_alter_table("images") as batch:
        for name in _IMAGE_COLUMNS:
            batch.drop_column(name)
    with op.batch_alter_table("jobs") as batch:
        for name in _JOB_COLUMNS:
            batch.drop_column(name)
    op.drop_index("ix_references_character_created", table_name="character_references")
    op.drop_table("character_references")
    with op.batch_alter_table("characters") as batch:
        for name in ("card", "identity_strength", "seed", "loras", "negative_prompt"):
            batch.drop_column(name)
