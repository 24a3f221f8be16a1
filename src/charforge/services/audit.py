"""The audit log: every change an administrator makes, by API, CLI or page."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from charforge.db.models import AuditEntry, utcnow
from charforge.errors import InvalidInput

CLI_ACTOR = "cli"


def record(
    session: Session,
    actor: str,
    action: str,
    target: str,
    before: dict[str, Any] | None,
    after: dict[str, Any] | None,
) -> AuditEntry:
    entry = AuditEntry(
        at=utcnow(), actor=actor, action=action, target=target, before=before, after=after
    )
    session.add(entry)
    session.flush()
    return entry


def page(
    session: Session, limit: int, cursor: str | None
) -> tuple[Sequence[AuditEntry], str | None]:
    """Newest first. The cursor is the id of the last entry seen (ids only grow)."""
    query = select(AuditEntry)
    if cursor:
        if not cursor.isdigit() or len(cursor) > 18:
            raise InvalidInput(
                "The cursor is not valid.", field="cursor", hint="Use nextCursor as given."
            )
        query = query.where(AuditEntry.id < int(cursor))
    rows = session.scalars(query.order_by(AuditEntry.id.desc()).limit(limit + 1)).all()
    more = len(rows) > limit
    rows = rows[:limit]
    return rows, str(rows[-1].id) if more and rows else None
