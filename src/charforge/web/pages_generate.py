"""/generate-images: pick a character, see which style and checkpoint it will use, generate."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response
from starlette.concurrency import run_in_threadpool

from charforge.api.routes.generate import generate_and_wait
from charforge.db.models import User
from charforge.domain.params import GenerateBody
from charforge.errors import Unauthorized
from charforge.services import characters
from charforge.services.styles import CONSISTENCY_NOTE
from charforge.web.render import container_of, indicator, page
from charforge.web.session import check_csrf, require_user, signed_in_user

router = APIRouter(include_in_schema=False)
_FLAGS = ("hires", "nsfw")


@router.get("/generate-images", response_class=HTMLResponse)
def generate_page(request: Request, characterId: str | None = None) -> Response:
    c = container_of(request)
    user = require_user(request, c)
    with c.db.session() as session:
        roster = list(characters.list_for(session, user))
    options = [{"id": ch.id, "name": ch.name, "indicator": indicator(ch, c)} for ch in roster]
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
        "nsfw": False,
    }
    for key in values:  # any default may be overridden by the link ("use these settings")
        if key in request.query_params:
            raw = request.query_params[key]
            values[key] = raw in ("1", "true", "on") if key in _FLAGS else raw
    return page(
        request,
        "generate.html",
        user,
        options=options,
        selected=selected,
        notice=notice,
        values=values,
        note=CONSISTENCY_NOTE,
    )


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
