"""Turn a generate request into a queued Job, under the consistency contract."""

from __future__ import annotations

from sqlalchemy.orm import Session

from charforge.config import GenerationDefaults
from charforge.db.models import Job, User
from charforge.domain.consistency import StoredLook, resolve
from charforge.domain.params import GenerateBody, apply_defaults
from charforge.domain.prompt import compose_negative, compose_prompt
from charforge.domain.routes import RouteTable
from charforge.services import characters


def submit(
    session: Session,
    owner: User,
    body: GenerateBody,
    table: RouteTable,
    defaults: GenerationDefaults,
) -> Job:
    character = characters.get(session, owner, body.character_id)
    requested_style = (
        table.normalize_style(body.art_style, field="artStyle") if body.art_style else None
    )
    look = StoredLook(
        name=character.name,
        primary_style=character.primary_style,
        model=character.model,
        model_hash=character.model_hash,
    )
    resolution = resolve(look, requested_style, body.model, table)
    # An older character keeps what it was first resolved to, for every later image.
    if resolution.write_back_style:
        character.primary_style = resolution.style
    if resolution.write_back_model:
        character.model = resolution.checkpoint

    params = apply_defaults(
        body,
        defaults,
        prompt=compose_prompt(body.prompt, character.appearance),
        negative=compose_negative(body.negative_prompt, nsfw=body.nsfw),
    )
    job = Job(
        owner_id=owner.id,
        character_id=character.id,
        state="queued",
        art_style=resolution.style,
        checkpoint=resolution.checkpoint,
        checkpoint_hash=character.model_hash,
        params=params.to_json(),
        user_prompt=body.prompt,
        attempts=0,
    )
    session.add(job)
    session.flush()
    return job
