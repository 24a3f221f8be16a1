"""GET /api/characters/{id}/generation-options: what the Generate page offers for a character
(its route's samplers, schedulers and upscalers, and the defaults)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter
from starlette.concurrency import run_in_threadpool

from charforge.api.deps import ContainerDep, CurrentUser
from charforge.api.schemas import Wire
from charforge.container import Container
from charforge.db.models import User
from charforge.services import characters
from charforge.services.generation_options import GenerationOptions, options_for

router = APIRouter(tags=["characters"])


class GenerationOptionsOut(Wire):
    style: str
    samplers: list[str]
    schedulers: list[str]
    upscalers: list[str]  # for hiresUpscaler: the latent modes first
    defaults: dict[str, Any]  # what a field left out of the generate body gets
    source: str  # "backend", or "builtin" when none of the route's backends answered
    backends: list[str]

    @classmethod
    def of(cls, o: GenerationOptions) -> GenerationOptionsOut:
        return cls(
            style=o.style,
            samplers=o.samplers,
            schedulers=o.schedulers,
            upscalers=o.upscalers,
            defaults=o.defaults,
            source=o.source,
            backends=o.backends,
        )


def generation_options(c: Container, user: User, character_id: str) -> GenerationOptionsOut:
    """Shared by the API and the Generate page."""
    with c.db.session() as session:
        character = characters.get(session, user, character_id)
    found = options_for(character, c.pool, c.settings.defaults, timeout=c.settings.probe_timeout)
    return GenerationOptionsOut.of(found)


@router.get(
    "/api/characters/{character_id}/generation-options", response_model=GenerationOptionsOut
)
async def get_generation_options(
    character_id: str, user: CurrentUser, c: ContainerDep
) -> GenerationOptionsOut:
    return await run_in_threadpool(generation_options, c, user, character_id)
