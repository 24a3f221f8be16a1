"""Stored images: history per character, one image, deletion."""

from __future__ import annotations

import base64
import binascii
from collections.abc import Sequence
from datetime import datetime

from sqlalchemy.orm import Session

from charforge.db import repositories as repo
from charforge.db.models import Image, User
from charforge.errors import InvalidInput, NotFound
from charforge.services import characters


def _encode_cursor(image: Image) -> str:
    return base64.urlsafe_b64encode(f"{image.created_at.isoformat()}|{image.id}".encode()).decode()


def _decode_cursor(cursor: str) -> tuple[datetime, str]:
    try:
        created, image_id = base64.urlsafe_b64decode(cursor.encode()).decode().split("|", 1)
        return datetime.fromisoformat(created), image_id
    except (ValueError, binascii.Error, UnicodeDecodeError) as exc:
        raise InvalidInput(
            "The cursor is not one this server gave out.",
            field="cursor",
            hint="Pass the previous page's nextCursor, or leave cursor out for the first page.",
        ) from exc


def history(
    session: Session, owner: User, character_id: str, *, limit: int, cursor: str | None
) -> tuple[Sequence[Image], str | None]:
    """One page of a character's images, newest first, and the cursor of the next page."""
    characters.get(session, owner, character_id)  # 404 for a character that is not yours
    after = _decode_cursor(cursor) if cursor else None
    rows = repo.images_page(session, owner.id, character_id, limit + 1, after)
    next_cursor = _encode_cursor(rows[limit - 1]) if len(rows) > limit else None
    return rows[:limit], next_cursor


def get(session: Session, owner: User, image_id: str) -> Image:
    image = repo.image(session, owner.id, image_id)
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
