"""Image history, one image's page, its files, deletion."""

from __future__ import annotations

from typing import Annotated, Any
from urllib.parse import urlencode

from fastapi import APIRouter, Form, Request
from fastapi.responses import FileResponse, HTMLResponse, RedirectResponse, Response
from starlette.concurrency import run_in_threadpool

from charforge.db import repositories as repo
from charforge.db.models import Image
from charforge.services import characters, images
from charforge.web.render import container_of, page
from charforge.web.session import check_csrf, require_user

router = APIRouter(include_in_schema=False)
PAGE_SIZE = 24


def reuse_link(image: Image, request: dict[str, Any]) -> str:
    """The Generate page, filled in with this image's settings and its own seed."""
    p = image.params
    query = {
        "characterId": image.character_id,
        "prompt": request.get("prompt", ""),
        "negativePrompt": request.get("negativePrompt", ""),
        "width": p["width"],
        "height": p["height"],
        "steps": p["steps"],
        "cfgScale": p["cfg_scale"],
        "seed": image.seed,
        "hires": "1" if p.get("hires") else "0",
        "sampler": p.get("sampler", ""),
        "scheduler": p.get("scheduler", ""),
        "nsfw": "1" if request.get("nsfw") else "0",
    }
    return "/generate-images?" + urlencode(query)


@router.get("/characters/{character_id}/images", response_class=HTMLResponse)
def history(request: Request, character_id: str, cursor: str | None = None) -> Response:
    c = container_of(request)
    user = require_user(request, c)
    with c.db.session() as session:
        character = characters.get(session, user, character_id)
        rows, next_cursor = images.history(
            session, user, character_id, limit=PAGE_SIZE, cursor=cursor
        )
    return page(
        request,
        "history.html",
        user,
        c=character,
        images=rows,
        next_cursor=next_cursor,
        first_page=cursor is None,
    )


@router.get("/images/{image_id}", response_class=HTMLResponse)
def image_page(request: Request, image_id: str) -> Response:
    c = container_of(request)
    user = require_user(request, c)
    with c.db.session() as session:
        image = images.get(session, user, image_id)
        character = characters.get(session, user, image.character_id)
        job = repo.job(session, user.id, image.job_id)
        reuse = reuse_link(image, job.request if job else {})
    return page(request, "image.html", user, image=image, c=character, reuse=reuse)


def _owned_path(request: Request, image_id: str) -> tuple[Image, str]:
    c = container_of(request)
    user = require_user(request, c)
    with c.db.session() as session:
        image = images.get(session, user, image_id)
    return image, image.file_path


@router.get("/images/{image_id}/file")
def image_file(request: Request, image_id: str, download: bool = False) -> FileResponse:
    image, relative = _owned_path(request, image_id)
    return FileResponse(
        container_of(request).store.existing(relative),
        media_type="image/png",
        filename=f"{image.id}.png",
        content_disposition_type="attachment" if download else "inline",
        headers={"Cache-Control": "private, max-age=86400"},
    )


@router.get("/images/{image_id}/thumb")
async def image_thumb(request: Request, image_id: str) -> FileResponse:
    _, relative = await run_in_threadpool(_owned_path, request, image_id)
    path = await run_in_threadpool(container_of(request).store.thumbnail, relative)
    return FileResponse(
        path, media_type="image/webp", headers={"Cache-Control": "private, max-age=86400"}
    )


@router.post("/images/{image_id}/delete")
def delete_image(request: Request, image_id: str, csrf_token: Annotated[str, Form()]) -> Response:
    check_csrf(request, csrf_token)
    c = container_of(request)
    user = require_user(request, c)
    with c.db.session() as session:
        character_id = images.get(session, user, image_id).character_id
        path = images.delete(session, user, image_id)
    c.store.delete(path)
    return RedirectResponse(f"/characters/{character_id}/images", status_code=303)
