"""Gallery: each image's favourite mark and note, and the owner-wide newest-first index.

Revision ID: 0007
Revises: 0006
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("images") as batch:
        batch.add_column(
            sa.Column("favorite", sa.Boolean(), nullable=False, server_default=sa.false())
        )
        batch.add_column(sa.Column("note", sa.Text()))
    op.create_index("ix_images_owner_created", "images", ["owner_id", "created_at", "id"])


def downgrade() -> None:
    op.drop_index("ix_images_owner_created", table_name="images")
    with op.batch_alter_table("images") as batch:
        batch.drop_column("note")
        batch.drop_column("favorite")
