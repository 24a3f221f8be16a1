"""Gallery: favourites found by index, not by scanning every image (a user may mark a handful
among 100,000), per character and across the owner's images; and the gallery's count and
filter choices (models, styles) read from one index instead of every row.

Revision ID: 0009
Revises: 0008
"""

from __future__ import annotations

from alembic import op

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_index(
        "ix_images_character_favorite_created",
        "images",
        ["character_id", "favorite", "created_at", "id"],
    )
    op.create_index(
        "ix_images_owner_favorite_created", "images", ["owner_id", "favorite", "created_at", "id"]
    )
    op.create_index(
        "ix_images_character_facets",
        "images",
        ["owner_id", "character_id", "withheld", "checkpoint", "art_style"],
    )


def downgrade() -> None:
    op.drop_index("ix_images_character_facets", table_name="images")
    op.drop_index("ix_images_owner_favorite_created", table_name="images")
    op.drop_index("ix_images_character_favorite_created", table_name="images")
