"""Turn a generate request into a queued Job, under the consistency contract."""

from __future__ import annotations

from sqlalchemy.orm import Session

from charforge.config import GenerationDefaults
from charforge.db import repositories as repo
from charforge.db.models import Job, User, utcnow
from charforge.domain.checkpoints import same_checkpoint
from charforge.domain.consistency import resolve
from charforge.domain.params import GenerateBody, apply_defaults
from charforge.domain.prompt import compose_negative, compose_prompt
from charforge.domain.requirements import fit_to_route
from charforge.domain.routes import RouteTable
from charforge.services import characters
from charforge.services.characters import look_of


def submit(
    session: Session,
    owner: User,
    body: GenerateBody,
    table: RouteTable,
    defaults: GenerationDefaults,
    *,
    count: int = 1,
) -> Job:
    character = characters.get(session, owner, body.character_id)
    requested_style = (
        table.normalize_style(body.art_style, field="artStyle") if body.art_style else None
    )
    # Every check on the request comes before anything about the character is written.
    params = apply_defaults(
        body,
        defaults,
        prompt=compose_prompt(body.prompt, character.appearance),
        negative=compose_negative(body.negative_prompt, nsfw=body.nsfw),
    )
    resolution = resolve(look_of(character), requested_style, body.model, table)
    fitted = fit_to_route(
        params, hires_asked=body.hires is not None, route=resolution.route, table=table
    )
    # An older character keeps what it was first resolved to, for every later image. A model
    # named only by the request is written back by the runner once it has really worked, so a
    # typo cannot bind the character to a checkpoint that does not exist.
    if resolution.write_back_style or resolution.write_back_model:
        route_model = same_checkpoint(resolution.checkpoint, resolution.route.checkpoint)
        won = repo.write_back_look(
            session,
            character.id,
            style=resolution.style if resolution.write_back_style else None,
            model=resolution.checkpoint if resolution.write_back_model and route_model else None,
        )
        session.refresh(character)
        if not won:  # another request decided first: follow what is stored now
            resolution = resolve(look_of(character), requested_style, body.model, table)
            fitted = fit_to_route(
                params, hires_asked=body.hires is not None, route=resolution.route, table=table
            )

    job = Job(
        owner_id=owner.id,
        character_id=character.id,
        state="queued",
        art_style=resolution.style,
        checkpoint=resolution.checkpoint,
        checkpoint_hash=character.model_hash,
        params=fitted.to_json(),
        user_prompt=body.prompt,
        request=body.model_dump(mode="json", by_alias=True, exclude_none=True),
        attempts=0,
        count=count,
        created_at=utcnow(),
    )
    session.add(job)
    session.flush()
    return job
