"""Owner-scoped queries for users' prompt templates and saved presets (same shape: a name
unique per owner, settings as JSON)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TypeVar

from sqlalchemy import select
from sqlalchemy.orm import Session

from charforge.db.models import Preset, PromptTemplate

Owned = TypeVar("Owned", PromptTemplate, Preset)


def list_owned(session: Session, model: type[Owned], owner_id: int) -> Sequence[Owned]:
    """The owner's rows, by name."""
    return session.scalars(
        select(model).where(model.owner_id == owner_id).order_by(model.name, model.id)
    ).all()


def get_owned(session: Session, model: type[Owned], owner_id: int, row_id: str) -> Owned | None:
    """One of the owner's rows; None for another owner's id, as for one that does not exist."""
    return session.scalar(select(model).where(model.id == row_id, model.owner_id == owner_id))


def name_taken(
    session: Session, model: type[Owned], owner_id: int, name: str, *, besides: str | None = None
) -> bool:
    query = select(model.id).where(model.owner_id == owner_id, model.name == name)
    if besides is not None:
        query = query.where(model.id != besides)
    return session.scalar(query.limit(1)) is not None
