"""The quarantine: images the output screening withheld, which only administrators see,
release to their owner or delete. Every release and deletion is in the audit log."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sqlalchemy import Select, and_, func, or_, select
from sqlalchemy.orm import Session

from charforge.db.models import Character, Image, User
from charforge.errors import NotFound
from charforge.services import audit, cursors


@dataclass(frozen=True)
class Withheld:
    image: Image
    owner: str
    character: str


def _query() -> Select[Image, str, str]:
    return (
        select(Image, User.name, Character.name)
        .join(User, User.id == Image.owner_id)
        .join(Character, Character.id == Image.character_id)
        .where(Image.withheld.is_(True))
    )


def page(session: Session, *, limit: int, cursor: str | None) -> tuple[list[Withheld], str | None]:
    """Newest first, keyset-paginated like the owners' history."""
    query = _query()
    if cursor:
        created, last_id = cursors.decode(cursor)
        query = query.where(
            or_(Image.created_at < created, and_(Image.created_at == created, Image.id < last_id))
        )
    rows = session.execute(
        query.order_by(Image.created_at.desc(), Image.id.desc()).limit(limit + 1)
    ).all()
    items = [Withheld(image, owner, character) for image, owner, character in rows]
    more = len(items) > limit
    items = items[:limit]
    last = items[-1].image if more and items else None
    return items, cursors.encode(last.created_at, last.id) if last else None


def get(session: Session, image_id: str) -> Withheld:
    row = session.execute(_query().where(Image.id == image_id)).first()
    if row is None:
        raise NotFound(f"No withheld image with id '{image_id[:64]}'.", field="imageId")
    image, owner, character = row
    return Withheld(image, owner, character)


def _summary(item: Withheld) -> dict[str, Any]:
    return {
        "owner": item.owner,
        "character": item.character,
        "jobId": item.image.job_id,
        "nsfwScore": item.image.nsfw_score,
        "withheld": item.image.withheld,
    }


def release(session: Session, actor: str, image_id: str) -> Image:
    """The owner sees the image from now on (history, its page and its job)."""
    item = get(session, image_id)
    before = _summary(item)
    item.image.withheld = False
    session.flush()
    audit.record(session, actor, "quarantine.release", f"image:{image_id}", before, _summary(item))
    return item.image


def delete(session: Session, actor: str, image_id: str) -> str:
    """Deletes the row; returns the file to remove once the deletion is committed."""
    item = get(session, image_id)
    before = _summary(item)
    path = item.image.file_path
    session.delete(item.image)
    session.flush()
    audit.record(session, actor, "quarantine.delete", f"image:{image_id}", before, None)
    return path


def count(session: Session) -> int:
    return int(
        session.scalar(select(func.count()).select_from(Image).where(Image.withheld.is_(True))) or 0
    )
