"""/generate-images: pick a character, see which style and checkpoint it will use, generate.

The page's script submits a job (``POST /generate-images/jobs``), follows it as Server-Sent
Events (``GET /generate-images/jobs/{id}/events``, or polls ``GET /generate-images/jobs/{id}``
where the stream breaks) and may cancel it. These are the Jobs API's own functions behind the
session cookie: writes need the CSRF header; the reads need only the session, because
EventSource cannot send headers. Every job lookup is scoped to its owner (another user's job
id is a 404). ``POST /generate-images/run`` stays: one request that waits for the image.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from starlette.concurrency import run_in_threadpool

from charforge.api.routes.generate import generate_and_wait, submit_generation
from charforge.api.routes.generation_options import generation_options
from charforge.api.routes.jobs import cancel_job, event_stream, job_out
from charforge.api.routes.presets import PresetIn, create_preset_for
from charforge.container import Container
from charforge.db import images as image_rows
from charforge.db.models import Image, User
from charforge.db.references import reference_counts
from charforge.domain.capabilities import Capability
from charforge.domain.params import GenerateBody, JobBody
from charforge.errors import Unauthorized
from charforge.services import characters
from charforge.services.characters import DEFAULT_IDENTITY_STRENGTH
from charforge.services.styles import CONSISTENCY_NOTE
from charforge.web.generate_settings import name_choices, preset_choices, template_choices
from charforge.web.render import (
    container_of,
    indicator,
    page,
    route_can,
    route_conditions,
    route_of,
)
from charforge.web.session import check_csrf, require_user, signed_in_user

router = APIRouter(include_in_schema=False)
_FLAGS = ("hires", "nsfw", "retrySame")
# Query parameters that belong to the advanced settings: any of them opens that section
# ("Use these settings again" sends them).
_ADVANCED = (
    "width",
    "height",
    "steps",
    "cfgScale",
    "seed",
    "sampler",
    "scheduler",
    "hires",
    "hiresScale",
    "hiresSteps",
    "denoisingStrength",
    "hiresUpscaler",
    "clipSkip",
    "count",
    "nsfw",
)


_RECENT = 6  # the newest images of the chosen character, beside the form


def _recent_images(c: Container, user: User, character_id: str) -> list[Image]:
    with c.db.session() as session:
        return list(image_rows.images_page(session, user.id, character_id, _RECENT, None))


@router.get("/generate-images", response_class=HTMLResponse)
def generate_page(request: Request, characterId: str | None = None) -> Response:
    c = container_of(request)
    user = require_user(request, c)
    with c.db.session() as session:
        roster = list(characters.list_for(session, user))
        counts = reference_counts(session, user.id)
        picker = template_choices(session, user)
        saved = preset_choices(session, user)
    options = []
    for ch in roster:
        route, _ = route_of(ch, c)
        options.append(
            {
                "id": ch.id,
                "name": ch.name,
                "indicator": indicator(ch, c),
                "hires": route_can(ch, c, Capability.HIRES),
                "style": route.style,
                "references": counts.get(ch.id, 0),
                "strength": f"{_strength(ch.identity_strength):g}",
                "steers": route_conditions(route, c),
                "appearance": ch.appearance or "",
            }
        )
    styles = [
        {
            "style": r.style,
            "label": f"{r.emoji} {r.label}",
            "indicator": r.indicator,
            "steers": route_conditions(r, c),
            "hires": any(Capability.HIRES in c.table.backends[n].capabilities for n in r.backends),
        }
        for r in c.table.routes.values()
    ]
    selected = next((o for o in options if o["id"] == characterId), None)
    notice = None
    if characterId and selected is None:
        # Never say whether the id exists for someone else.
        notice = "That character is not in your roster. Pick one of yours below."
    if selected is None and options and not characterId:
        selected = options[0]
    d = c.settings.defaults
    values = {
        "prompt": "",
        "negativePrompt": "",
        "width": d.width,
        "height": d.height,
        "steps": d.steps,
        "cfgScale": d.cfg_scale,
        "seed": "",
        "hires": d.hires,
        "sampler": d.sampler,
        "scheduler": d.scheduler,
        "hiresScale": d.hires_scale,
        "hiresSteps": d.hires_steps,
        "denoisingStrength": d.denoising_strength,
        "hiresUpscaler": d.hires_upscaler,
        "clipSkip": d.clip_skip,
        "nsfw": False,
        "count": 1,
        "transferTo": "",
        "identityStrength": "",
        "retrySame": False,
    }
    for key in values:  # any default may be overridden by the link ("use these settings")
        if key in request.query_params:
            raw = request.query_params[key]
            values[key] = raw in ("1", "true", "on") if key in _FLAGS else raw
    recent = _recent_images(c, user, str(selected["id"])) if selected else []
    return page(
        request,
        "generate.html",
        user,
        recent=recent,
        options=options,
        styles=styles,
        selected=selected,
        notice=notice,
        values=values,
        advanced_open=any(key in request.query_params for key in _ADVANCED),
        lists=name_choices(values),
        templates=picker,
        presets=saved,
        note=CONSISTENCY_NOTE,
        simulated_backends=" ".join(
            name for name, backend in c.pool.backends.items() if backend.spec.simulated
        ),
    )


def _strength(value: float | None) -> float:
    return DEFAULT_IDENTITY_STRENGTH if value is None else float(value)


async def page_user(request: Request) -> User:
    """Signed in (session cookie); for the read-only JSON and event-stream endpoints."""
    user = await run_in_threadpool(signed_in_user, request, container_of(request))
    if user is None:
        raise Unauthorized("Your session has ended.", hint="Sign in again.")
    return user


async def page_user_with_csrf(request: Request) -> User:
    """Signed in and CSRF-checked, before the body is even read (a dependency runs first)."""
    user = await run_in_threadpool(signed_in_user, request, container_of(request))
    if user is None:
        raise Unauthorized("Your session has ended.", hint="Sign in again.")
    check_csrf(request, None)
    return user


@router.post("/generate-images/run")
async def run_generation(
    request: Request, user: Annotated[User, Depends(page_user_with_csrf)], body: GenerateBody
) -> Response:
    """The page's script posts here (session cookie + CSRF header); answers as the API does."""
    response: JSONResponse = await generate_and_wait(container_of(request), user, body)
    return response


def _job_json(job_id: str, request: Request, user: User, status: int = 200) -> JSONResponse:
    out = job_out(container_of(request), user, job_id)
    return JSONResponse(
        out.model_dump(mode="json", by_alias=True),
        status_code=status,
        headers={"Cache-Control": "no-store"},
    )


@router.post("/generate-images/jobs")
async def create_page_job(
    request: Request, user: Annotated[User, Depends(page_user_with_csrf)], body: JobBody
) -> Response:
    """Submit without waiting: 202 and the job, to follow at ``.../events``."""
    c = container_of(request)
    ticket = await run_in_threadpool(submit_generation, c, user, body, body.count)
    response = await run_in_threadpool(_job_json, ticket.id, request, user, 202)
    response.headers["Location"] = f"/generate-images/jobs/{ticket.id}"
    return response


@router.get("/generate-images/jobs/{job_id}")
async def get_page_job(
    job_id: str, request: Request, user: Annotated[User, Depends(page_user)]
) -> Response:
    """The job now: what the script polls when the event stream cannot be kept open."""
    return await run_in_threadpool(_job_json, job_id, request, user)


@router.get("/generate-images/jobs/{job_id}/events")
async def page_job_events(
    job_id: str, request: Request, user: Annotated[User, Depends(page_user)]
) -> StreamingResponse:
    """The API's event stream for the page's EventSource (cookie only: it sends no headers)."""
    c = container_of(request)
    first = await run_in_threadpool(job_out, c, user, job_id)  # 404 before the stream starts
    return event_stream(c, user, first, request)


@router.post("/generate-images/jobs/{job_id}/cancel")
async def cancel_page_job(
    job_id: str, request: Request, user: Annotated[User, Depends(page_user_with_csrf)]
) -> Response:
    out = await run_in_threadpool(cancel_job, container_of(request), user, job_id)
    return JSONResponse(out.model_dump(mode="json", by_alias=True))


@router.get("/generate-images/characters/{character_id}/options")
async def page_generation_options(
    character_id: str, request: Request, user: Annotated[User, Depends(page_user)]
) -> Response:
    """The samplers, schedulers and upscalers of the character's backends, for the lists."""
    out = await run_in_threadpool(generation_options, container_of(request), user, character_id)
    return JSONResponse(
        out.model_dump(mode="json", by_alias=True), headers={"Cache-Control": "no-store"}
    )


@router.post("/generate-images/presets")
async def save_page_preset(
    request: Request, user: Annotated[User, Depends(page_user_with_csrf)], body: PresetIn
) -> Response:
    """Save the advanced settings as a preset: the API's own rules (a name per user, the
    generate body's limits)."""
    out = await run_in_threadpool(create_preset_for, container_of(request), user, body)
    return JSONResponse(out.model_dump(mode="json", by_alias=True), status_code=201)
