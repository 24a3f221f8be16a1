"""Saved presets: a user's generation settings by name (sampler, steps, the high-resolution
pass, clip skip, ...), validated like the generate body's settings; private to their owner."""

from __future__ import annotations

from collections.abc import Sequence

from sqlalchemy.orm import Session

from charforge.db import templates as rows
from charforge.db.models import Preset, User, utcnow
from charforge.domain.params import GenerationSettings
from charforge.errors import Conflict, InvalidInput, NotFound

NAME_MAX = 100


def list_for(session: Session, owner: User) -> Sequence[Preset]:
    return rows.list_owned(session, Preset, owner.id)


def get(session: Session, owner: User, preset_id: str) -> Preset:
    row = rows.get_owned(session, Preset, owner.id, preset_id)
    if row is None:
        raise NotFound(
            f"No preset {preset_id} among yours.", hint="GET /api/presets lists your presets."
        )
    return row


def _name(name: str) -> str:
    name = name.strip()
    if not 1 <= len(name) <= NAME_MAX:
        raise InvalidInput(f"A preset name needs 1 to {NAME_MAX} characters.", field="name")
    return name


def _params(settings: GenerationSettings) -> dict[str, object]:
    return settings.model_dump(mode="json", by_alias=True, exclude_none=True)


def _save(session: Session, row: Preset, owner: User) -> None:
    rows.save_named(session, row, owner.id, _taken)


def _taken(name: str) -> Conflict:
    return Conflict(
        f"You already have a preset named '{name}'.",
        field="name",
        hint="Pick another name, or change that preset with PATCH.",
    )


def create(session: Session, owner: User, name: str, settings: GenerationSettings) -> Preset:
    now = utcnow()
    row = Preset(
        owner_id=owner.id,
        name=_name(name),
        params=_params(settings),
        created_at=now,
        updated_at=now,
    )
    _save(session, row, owner)
    return row


def update(
    session: Session,
    owner: User,
    preset_id: str,
    name: str | None,
    settings: GenerationSettings | None,
) -> Preset:
    row = get(session, owner, preset_id)
    if name is not None:
        row.name = _name(name)
    if settings is not None:
        row.params = _params(settings)  # replaced whole, as it was sent
    row.updated_at = utcnow()
    _save(session, row, owner)
    return row


def delete(session: Session, owner: User, preset_id: str) -> None:
    session.delete(get(session, owner, preset_id))
    session.flush()
