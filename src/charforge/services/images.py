"""Stored images: history per character, one image, deletion."""

from __future__ import annotations

from collections.abc import Sequence

from sqlalchemy.orm import Session

from charforge.db import images as image_rows
from charforge.db.models import Image, User
from charforge.errors import NotFound
from charforge.services import characters, cursors


def history(
    session: Session, owner: User, character_id: str, *, limit: int, cursor: str | None
) -> tuple[Sequence[Image], str | None]:
    """One page of a character's images, newest first, and the cursor of the next page."""
    characters.get(session, owner, character_id)  # 404 for a character that is not yours
    after = cursors.decode(cursor) if cursor else None
    rows = image_rows.images_page(session, owner.id, character_id, limit + 1, after)
    last = rows[limit - 1] if len(rows) > limit else None
    next_cursor = cursors.encode(last.created_at, last.id) if last else None
    return rows[:limit], next_cursor


def get(session: Session, owner: User, image_id: str) -> Image:
    image = image_rows.image(session, owner.id, image_id)
    if image is None:
        raise NotFound(f"No image with id '{image_id}' among yours.", field="imageId")
    return image


def delete(session: Session, owner: User, image_id: str) -> str:
    """Deletes the row; returns the file to remove once the deletion is committed."""
    image = get(session, owner, image_id)
    path = image.file_path
    session.delete(image)
    session.flush()
    return path
