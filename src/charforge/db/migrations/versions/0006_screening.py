"""Output screening: each image's NSFW score, and whether it is withheld (in quarantine).

Revision ID: 0006
Revises: 0005
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("images") as batch:
        batch.add_column(sa.Column("nsfw_score", sa.Float()))
        batch.add_column(
            sa.Column("withheld", sa.Boolean(), nullable=False, server_default=sa.false())
        )
    op.create_index("ix_images_withheld_created", "images", ["withheld", "created_at"])


def downgrade() -> None:
    op.drop_index("ix_images_withheld_created", table_name="images")
    with op.batch_alter_table("images") as batch:
        batch.drop_column("withheld")
        batch.drop_column("nsfw_score")
