"""Owner-scoped queries for users' prompt templates and saved presets (same shape: a name
unique per owner, settings as JSON)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TypeVar

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
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


def save_named(
    session: Session, row: Owned, owner_id: int, taken: Callable[[str], Exception]
) -> None:
    """Add or update ``row`` unless the owner already has another by its name (``taken``
    makes the error); the unique index decides when two requests race for one name."""
    with session.no_autoflush:  # a changed row is not written before the name is checked
        clash = name_taken(session, type(row), owner_id, row.name, besides=row.id)
    if clash:
        raise taken(row.name)
    try:
        with session.begin_nested():
            session.add(row)
            session.flush()
    except IntegrityError as exc:
        raise taken(row.name) from exc
