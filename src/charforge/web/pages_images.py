"""One image's page and its files (the gallery and deletion: pages_gallery)."""

from __future__ import annotations

from typing import Annotated, Any
from urllib.parse import urlencode

from fastapi import APIRouter, Form, Request
from fastapi.responses import FileResponse, HTMLResponse, RedirectResponse, Response
from starlette.concurrency import run_in_threadpool

from charforge.container import Container
from charforge.db import references as refs
from charforge.db import repositories as repo
from charforge.db.models import Image, User
from charforge.errors import CharforgeError, Conflict, InvalidInput
from charforge.services import characters, images, references
from charforge.services.references import MAX_REFERENCES
from charforge.web.identity_view import (
    identity_text,
    page_error,
    score_badge,
    transfer_text,
    tries_text,
)
from charforge.web.render import container_of, page
from charforge.web.session import check_csrf, require_user

router = APIRouter(include_in_schema=False)


_ADVANCED = {
    "hires_scale": "hiresScale",
    "hires_steps": "hiresSteps",
    "denoising_strength": "denoisingStrength",
    "hires_upscaler": "hiresUpscaler",
    "clip_skip": "clipSkip",
}


def reuse_link(image: Image, request: dict[str, Any]) -> str:
    """The Generate page, filled in with this image's settings and its own seed."""
    p = image.params
    query: dict[str, Any] = {
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
    # The advanced settings as they ran (older images lack some: those stay unset).
    for key, name in _ADVANCED.items():
        if p.get(key) is not None:
            query[name] = p[key]
    identity = request.get("identity") or {}
    if request.get("styleTransfer") and request.get("artStyle"):
        query["transferTo"] = request["artStyle"]
    if identity.get("strength") is not None:
        query["identityStrength"] = identity["strength"]
    if identity.get("minScore") is not None:
        query["retrySame"] = "1"
    return "/generate-images?" + urlencode(query)


@router.get("/images/{image_id}", response_class=HTMLResponse)
def image_page(request: Request, image_id: str) -> Response:
    c = container_of(request)
    return _image_page(request, require_user(request, c), image_id)


def _image_page(
    request: Request,
    user: User,
    image_id: str,
    reference_error: CharforgeError | None = None,
    status: int = 200,
) -> Response:
    c = container_of(request)
    with c.db.session() as session:
        image = images.get(session, user, image_id)
        character = characters.get(session, user, image.character_id)
        job = repo.job(session, user.id, image.job_id)
        reuse = reuse_link(image, job.request if job else {})
        rows = list(refs.references_of(session, user.id, character.id))
    as_reference = next((r for r in rows if r.image_id == image.id), None)
    error = None
    if reference_error is not None:
        error = page_error(reference_error)
        if reference_error.extra.get("referenceId"):
            error = {
                "message": f"This image is already one of {character.name}'s reference images.",
                "hint": None,
                "field": None,
            }
        elif reference_error.extra.get("limit") == MAX_REFERENCES:
            error["hint"] = f"Delete one on {character.name}'s page to add this one."
    return page(
        request,
        "image.html",
        user,
        status,
        image=image,
        c=character,
        reuse=reuse,
        badge=score_badge(image.consistency),
        identity=identity_text(image.identity),
        tries=tries_text(job.identity if job else None, image.consistency),
        transfer=transfer_text(image.style_transfer, c.table),
        as_reference=as_reference,
        reference_count=len(rows),
        max_references=MAX_REFERENCES,
        reference_error=error,
    )


def _promote(c: Container, user: User, image_id: str) -> None:
    saved: list[str] = []
    try:
        with c.db.session() as session:
            character_id = images.get(session, user, image_id).character_id
            row = references.promote(session, c.store, user, character_id, image_id)
            saved.append(row.file_path)
    except BaseException:
        for path in saved:  # the row did not land: its file must not linger
            c.store.delete(path)
        raise


@router.post("/images/{image_id}/reference")
def use_as_reference(
    request: Request, image_id: str, csrf_token: Annotated[str, Form()]
) -> Response:
    """The image becomes one of its character's reference images."""
    check_csrf(request, csrf_token)
    c = container_of(request)
    user = require_user(request, c)
    try:
        _promote(c, user, image_id)
    except (InvalidInput, Conflict) as exc:
        return _image_page(request, user, image_id, exc, exc.status)
    return RedirectResponse(f"/images/{image_id}#reference", status_code=303)


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
