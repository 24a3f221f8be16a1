"""Opaque keyset cursors on (created_at, id): pages never skip or repeat a row."""

from __future__ import annotations

import base64
import binascii
from datetime import datetime

from charforge.errors import InvalidInput


def encode(created_at: datetime, row_id: str) -> str:
    return base64.urlsafe_b64encode(f"{created_at.isoformat()}|{row_id}".encode()).decode()


def decode(cursor: str) -> tuple[datetime, str]:
    try:
        created, row_id = base64.urlsafe_b64decode(cursor.encode()).decode().split("|", 1)
        return datetime.fromisoformat(created), row_id
    except (ValueError, binascii.Error, UnicodeDecodeError) as exc:
        raise InvalidInput(
            "The cursor is not one this server gave out.",
            field="cursor",
            hint="Pass the previous page's nextCursor, or leave cursor out for the first page.",
        ) from exc
