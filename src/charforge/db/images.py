"""Queries on stored images, owner-scoped: history, the gallery's search and filters, bulk
deletion. Images withheld by the output screening are in quarantine: none of these see them."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import Select, func, select, tuple_
from sqlalchemy.orm import Session

from charforge.db.models import Image, Job
from charforge.domain.checkpoints import strip_hash

_SHOWN = Image.withheld.is_(False)


@dataclass(frozen=True)
class Filters:
    """What the gallery narrows to; None means "any". ``since`` is inclusive, ``until``
    exclusive (naive UTC, as stored)."""

    character_id: str | None = None
    q: str | None = None
    favorite: bool | None = None
    style: str | None = None
    model: str | None = None
    since: datetime | None = None
    until: datetime | None = None
    min_score: float | None = None


def images_of_job(session: Session, job_id: str) -> Sequence[Image]:
    return session.scalars(
        select(Image).where(Image.job_id == job_id, _SHOWN).order_by(Image.position)
    ).all()


def withheld_of_job(session: Session, job_id: str) -> int:
    return int(
        session.scalar(
            select(func.count()).select_from(Image).where(Image.job_id == job_id, ~_SHOWN)
        )
        or 0
    )


def image(session: Session, owner_id: int, image_id: str) -> Image | None:
    return session.scalar(
        select(Image).where(Image.id == image_id, Image.owner_id == owner_id, _SHOWN)
    )


def images_by_ids(session: Session, owner_id: int, image_ids: Sequence[str]) -> Sequence[Image]:
    if not image_ids:
        return []
    return session.scalars(
        select(Image).where(Image.id.in_(image_ids), Image.owner_id == owner_id, _SHOWN)
    ).all()


def count_shown(session: Session, owner_id: int, character_id: str) -> int:
    return int(
        session.scalar(
            select(func.count())
            .select_from(Image)
            .where(Image.owner_id == owner_id, Image.character_id == character_id, _SHOWN)
        )
        or 0
    )


def image_paths_of_character(session: Session, owner_id: int, character_id: str) -> list[str]:
    """Every file of the character, withheld ones included: deleting it removes them all."""
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
    """A character's images, newest first (see ``gallery_page``)."""
    return gallery_page(session, owner_id, Filters(character_id=character_id), limit, after)


def gallery_page(
    session: Session,
    owner_id: int,
    filters: Filters,
    limit: int,
    after: tuple[datetime, str] | None,
) -> Sequence[Image]:
    """Newest first; keyset pagination on (created_at, id), so pages never skip or repeat.
    The row-value comparison lets SQLite and PostgreSQL seek straight into the
    (character_id | owner_id, created_at, id) indexes for a deep page."""
    query = _filtered(session, select(Image).where(Image.owner_id == owner_id, _SHOWN), filters)
    if after is not None:
        query = query.where(tuple_(Image.created_at, Image.id) < tuple_(*after))
    query = query.order_by(Image.created_at.desc(), Image.id.desc()).limit(limit)
    return session.scalars(query).all()


def _filtered(session: Session, query: Select[Any], f: Filters) -> Select[Any]:
    if f.character_id is not None:
        query = query.where(Image.character_id == f.character_id)
    if f.favorite is not None:
        query = query.where(Image.favorite.is_(f.favorite))
    if f.style is not None:
        query = query.where(Image.art_style == f.style)
    if f.model is not None:
        name = strip_hash(f.model)
        same = Image.checkpoint == name
        if "." not in name.rsplit("/", 1)[-1]:  # "diving" finds diving.safetensors too
            same = same | Image.checkpoint.startswith(name + ".", autoescape=True)
        query = query.where(same)
    if f.since is not None:
        query = query.where(Image.created_at >= f.since)
    if f.until is not None:
        query = query.where(Image.created_at < f.until)
    if f.min_score is not None:
        # JSON_EXTRACT on SQLite, ->> on PostgreSQL; images without a score drop out (NULL).
        query = query.where(Image.consistency["score"].as_float() >= f.min_score)
    if f.q:
        query = query.where(_prompt_contains(session, f.q))
    return query


def _prompt_contains(session: Session, q: str) -> Any:
    """Case-insensitive substring of the prompt. SQLite's lower() folds ASCII only, so a
    search with other letters goes through Python's (registered in db.engine); PostgreSQL's
    lower() knows Unicode."""
    if q.isascii() or session.get_bind().dialect.name != "sqlite":
        return Image.prompt.icontains(q, autoescape=True)
    return func.charforge_lower(Image.prompt).contains(q.lower(), autoescape=True)


def facets(session: Session, owner_id: int, character_id: str) -> tuple[list[str], list[str]]:
    """The checkpoints and styles the character's images were made with (for the filters).
    A skip scan over ix_images_character_facets, one index seek per distinct value: a GROUP
    BY reads every image (~100 ms for 100,000 of them)."""
    shown = select().where(Image.owner_id == owner_id, Image.character_id == character_id, _SHOWN)
    models = _distinct(session, shown, Image.checkpoint)
    styles: set[str] = set()
    for model in models:
        styles.update(_distinct(session, shown.where(Image.checkpoint == model), Image.art_style))
    return models, sorted(styles)


def _distinct(session: Session, base: Select[Any], column: Any) -> list[str]:
    found: list[str] = []
    while len(found) < _FACETS_MAX:
        step = base.add_columns(column).order_by(column).limit(1)
        if found:
            step = step.where(column > found[-1])
        value = session.scalar(step)
        if value is None:
            break
        found.append(str(value))
    return found


_FACETS_MAX = 50


def prompts_as_written(session: Session, owner_id: int, job_ids: Sequence[str]) -> dict[str, str]:
    """The prompt each job's user typed (images keep it composed with the appearance)."""
    if not job_ids:
        return {}
    rows = session.execute(
        select(Job.id, Job.user_prompt).where(Job.id.in_(set(job_ids)), Job.owner_id == owner_id)
    ).all()
    return {str(job_id): str(prompt) for job_id, prompt in rows}
