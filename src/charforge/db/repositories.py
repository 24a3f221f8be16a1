"""Every query that reads user data lives here, and every one of them is owner-scoped:
another user's id simply finds nothing (a 404, never a 403 that confirms it exists)."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime

from sqlalchemy import and_, func, or_, select, update
from sqlalchemy.orm import Session

from charforge.db.models import ApiToken, Character, Image, Job, User


def user_by_name(session: Session, name: str) -> User | None:
    return session.scalar(select(User).where(User.name == name))


def user_by_id(session: Session, user_id: int) -> User | None:
    return session.get(User, user_id)


def count_users(session: Session) -> int:
    return int(session.scalar(select(func.count()).select_from(User)) or 0)


def all_users(session: Session) -> Sequence[User]:
    return session.scalars(select(User).order_by(User.id)).all()


def token_by_hash(session: Session, token_hash: str) -> ApiToken | None:
    return session.scalar(
        select(ApiToken).where(ApiToken.token_hash == token_hash, ApiToken.revoked_at.is_(None))
    )


def tokens_of(session: Session, user_id: int) -> Sequence[ApiToken]:
    return session.scalars(
        select(ApiToken).where(ApiToken.user_id == user_id).order_by(ApiToken.id)
    ).all()


def character(session: Session, owner_id: int, character_id: str) -> Character | None:
    return session.scalar(
        select(Character).where(Character.id == character_id, Character.owner_id == owner_id)
    )


def characters_named(session: Session, owner_id: int, name: str) -> Sequence[Character]:
    return session.scalars(
        select(Character).where(Character.owner_id == owner_id, Character.name == name)
    ).all()


def characters_of(session: Session, owner_id: int) -> Sequence[Character]:
    return session.scalars(
        select(Character)
        .where(Character.owner_id == owner_id)
        .order_by(Character.created_at.desc(), Character.id.desc())
    ).all()


def write_back_look(
    session: Session, character_id: str, *, style: str | None, model: str | None
) -> bool:
    """Set a style/model still missing, only if still missing: of two first requests racing
    for an older character, exactly one decides its look."""
    query = update(Character).where(Character.id == character_id)
    values: dict[str, str] = {}
    if style is not None:
        query = query.where(Character.primary_style.is_(None))
        values["primary_style"] = style
    if model is not None:
        query = query.where(Character.model.is_(None))
        values["model"] = model
    if not values:
        return True
    result = session.execute(query.values(**values).execution_options(synchronize_session=False))
    return bool(getattr(result, "rowcount", 0) == 1)


def job(session: Session, owner_id: int, job_id: str) -> Job | None:
    return session.scalar(select(Job).where(Job.id == job_id, Job.owner_id == owner_id))


def job_any_owner(session: Session, job_id: str) -> Job | None:
    """For the worker, which acts for whoever owns the job."""
    return session.get(Job, job_id)


def claim_job(session: Session, job_id: str, now: datetime) -> bool:
    """queued -> running, atomically: of two workers racing for a job, one wins."""
    result = session.execute(
        update(Job)
        .where(Job.id == job_id, Job.state == "queued")
        .values(state="running", attempts=Job.attempts + 1, started_at=now)
    )
    return bool(getattr(result, "rowcount", 0) == 1)


def job_ids_in_state(session: Session, state: str) -> Sequence[str]:
    return session.scalars(select(Job.id).where(Job.state == state).order_by(Job.created_at)).all()


def requeue_running(session: Session) -> int:
    """After a crash: jobs left running by a dead process go back to the queue."""
    result = session.execute(update(Job).where(Job.state == "running").values(state="queued"))
    return int(getattr(result, "rowcount", 0))


def images_of_job(session: Session, job_id: str) -> Sequence[Image]:
    return session.scalars(
        select(Image).where(Image.job_id == job_id).order_by(Image.position)
    ).all()


def image(session: Session, owner_id: int, image_id: str) -> Image | None:
    return session.scalar(select(Image).where(Image.id == image_id, Image.owner_id == owner_id))


def image_paths_of_character(session: Session, owner_id: int, character_id: str) -> list[str]:
    return list(
        session.scalars(
            select(Image.file_path).where(
                Image.owner_id == owner_id, Image.character_id == character_id
            )
        ).all()
    )


def images_page(
    session: Session,
    owner_id: int,
    character_id: str,
    limit: int,
    after: tuple[datetime, str] | None,
) -> Sequence[Image]:
    """Newest first; keyset pagination on (created_at, id) so pages never skip or repeat."""
    query = select(Image).where(Image.owner_id == owner_id, Image.character_id == character_id)
    if after is not None:
        created, last_id = after
        query = query.where(
            or_(Image.created_at < created, and_(Image.created_at == created, Image.id < last_id))
        )
    query = query.order_by(Image.created_at.desc(), Image.id.desc()).limit(limit)
    return session.scalars(query).all()
