"""Queries on reference images, always within one owner's characters."""

from __future__ import annotations

from collections.abc import Sequence

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from charforge.db.models import Character, Reference


def references_of(session: Session, owner_id: int, character_id: str) -> Sequence[Reference]:
    """Oldest first: the first reference is the character's main picture (its card's)."""
    return session.scalars(
        select(Reference)
        .where(Reference.owner_id == owner_id, Reference.character_id == character_id)
        .order_by(Reference.created_at, Reference.id)
    ).all()


def reference(
    session: Session, owner_id: int, character_id: str, reference_id: str
) -> Reference | None:
    return session.scalar(
        select(Reference).where(
            Reference.id == reference_id,
            Reference.owner_id == owner_id,
            Reference.character_id == character_id,
        )
    )


def references_by_id(session: Session, reference_ids: Sequence[str]) -> Sequence[Reference]:
    """For the job runner, which acts for any owner (the ids come from the owner's job)."""
    if not reference_ids:
        return []
    return session.scalars(select(Reference).where(Reference.id.in_(reference_ids))).all()


def lock_character(session: Session, character_id: str) -> None:
    """Lock the character's row (PostgreSQL; SQLite writes one at a time anyway) so that two
    uploads at once cannot both take its last free reference place."""
    session.scalar(select(Character.id).where(Character.id == character_id).with_for_update())


def reference_paths_of_character(session: Session, owner_id: int, character_id: str) -> list[str]:
    return list(
        session.scalars(
            select(Reference.file_path).where(
                Reference.owner_id == owner_id, Reference.character_id == character_id
            )
        ).all()
    )


def reference_counts(session: Session, owner_id: int) -> dict[str, int]:
    """Character id -> how many references it has (one query for a whole roster)."""
    rows = session.execute(
        select(Reference.character_id, func.count())
        .where(Reference.owner_id == owner_id)
        .group_by(Reference.character_id)
    ).all()
    return {character_id: int(n) for character_id, n in rows}
