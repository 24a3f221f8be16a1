"""The gallery: a character's images with search, filters, favourites, a lightbox
(static/gallery.js), deletion with confirmation and a ZIP of them all. Every action is a plain
form first; the script only makes it quicker."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any
from urllib.parse import urlencode

from fastapi import APIRouter, Form, Request
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse, Response

from charforge.api.routes.images import zip_response
from charforge.db import images as image_rows
from charforge.db.images import Filters
from charforge.db.models import Image
from charforge.domain.checkpoints import file_stem
from charforge.errors import InvalidInput
from charforge.services import characters, gallery, images
from charforge.web.identity_view import page_error
from charforge.web.render import container_of, page
from charforge.web.session import check_csrf, require_user

router = APIRouter(include_in_schema=False)
PAGE_SIZE = 48
_FILTERS = ("q", "favorite", "model", "style", "from", "to")


@dataclass(frozen=True)
class Shot:
    """One image as the gallery shows it."""

    image: Image
    caption: str  # the prompt as the user wrote it (the image's also has the appearance)
    when: str
    model: str


def gallery_url(character_id: str, values: dict[str, str], cursor: str | None = None) -> str:
    query = {k: v for k, v in values.items() if v}
    if cursor:
        query["cursor"] = cursor
    base = f"/characters/{character_id}/images"
    return f"{base}?{urlencode(query)}" if query else base


def _filters(request: Request, character_id: str) -> tuple[dict[str, str], Filters]:
    values = {k: request.query_params.get(k, "").strip() for k in _FILTERS}
    values["favorite"] = "1" if values["favorite"] in ("1", "true", "on") else ""
    filters = gallery.filters_of(
        container_of(request).table,
        character_id=character_id,
        q=values["q"],
        favorite=True if values["favorite"] else None,
        style=values["style"],
        model=values["model"],
        since=values["from"],
        until=values["to"],
    )
    return values, filters


@router.get("/characters/{character_id}/images", response_class=HTMLResponse)
def history(request: Request, character_id: str, cursor: str | None = None) -> Response:
    c = container_of(request)
    user = require_user(request, c)
    error = None
    with c.db.session() as session:
        character = characters.get(session, user, character_id)
        total = image_rows.count_shown(session, user.id, character_id)
        models, styles = image_rows.facets(session, user.id, character_id)
        try:
            values, filters = _filters(request, character_id)
            rows, next_cursor = gallery.search(
                session, user, filters, limit=PAGE_SIZE, cursor=cursor
            )
        except InvalidInput as exc:
            values = {k: request.query_params.get(k, "") for k in _FILTERS}
            rows, next_cursor, error = [], None, page_error(exc)
        written = image_rows.prompts_as_written(session, user.id, [r.job_id for r in rows])
    shots = [
        Shot(
            row,
            written.get(row.job_id) or row.prompt,
            row.created_at.strftime("%Y-%m-%d %H:%M"),
            file_stem(row.checkpoint),
        )
        for row in rows
    ]
    here = gallery_url(character_id, values, cursor)
    return page(
        request,
        "history.html",
        user,
        422 if error else 200,
        c=character,
        shots=shots,
        total=total,
        models=models,
        styles=styles,
        values=values,
        filtered=any(values.values()),
        error=error,
        here=here,
        next_url=gallery_url(character_id, values, next_cursor) if next_cursor else None,
        newest_url=gallery_url(character_id, values) if cursor else None,
    )


def safe_next(value: str | None, character_id: str, fallback: str) -> str:
    """Back to where the form was, only within this character's gallery or the image's page
    (never another site)."""
    if not value or "//" in value or "\\" in value:
        return fallback
    if value.startswith((f"/characters/{character_id}/images", "/images/")):
        return value
    return fallback


@router.post("/images/{image_id}/favorite")
def favorite(
    request: Request,
    image_id: str,
    csrf_token: Annotated[str, Form()],
    favorite: Annotated[str, Form()] = "1",
    next: Annotated[str, Form()] = "",
) -> Response:
    check_csrf(request, csrf_token)
    c = container_of(request)
    user = require_user(request, c)
    marks = gallery.Marks(favorite=favorite in ("1", "true", "on"))
    with c.db.session() as session:
        image = gallery.mark(session, user, image_id, marks)
        state, character_id = image.favorite, image.character_id
    if "application/json" in request.headers.get("accept", ""):
        return JSONResponse({"favorite": state})  # the gallery's script: no page reload
    gallery_page = f"/characters/{character_id}/images"
    return RedirectResponse(safe_next(next, character_id, gallery_page), status_code=303)


@router.post("/images/{image_id}/note")
def note(
    request: Request,
    image_id: str,
    csrf_token: Annotated[str, Form()],
    note: Annotated[str, Form()] = "",
) -> Response:
    check_csrf(request, csrf_token)
    c = container_of(request)
    user = require_user(request, c)
    with c.db.session() as session:
        gallery.mark(session, user, image_id, gallery.Marks(note=note, note_given=True))
    return RedirectResponse(f"/images/{image_id}#note", status_code=303)


@router.get("/images/{image_id}/delete", response_class=HTMLResponse)
def delete_confirm(request: Request, image_id: str, next: str | None = None) -> Response:
    c = container_of(request)
    user = require_user(request, c)
    with c.db.session() as session:
        image = images.get(session, user, image_id)
        character = characters.get(session, user, image.character_id)
    back = safe_next(next, character.id, f"/images/{image_id}")
    context: dict[str, Any] = {"image": image, "c": character, "back": back}
    return page(request, "confirm_delete_image.html", user, **context)


@router.get("/characters/{character_id}/images.zip")
def images_zip(request: Request, character_id: str) -> Response:
    c = container_of(request)
    return zip_response(c, require_user(request, c), character_id)


@router.post("/images/{image_id}/delete")
def delete_image(
    request: Request,
    image_id: str,
    csrf_token: Annotated[str, Form()],
    next: Annotated[str, Form()] = "",
) -> Response:
    check_csrf(request, csrf_token)
    c = container_of(request)
    user = require_user(request, c)
    with c.db.session() as session:
        character_id = images.get(session, user, image_id).character_id
        path = images.delete(session, user, image_id)
    c.store.delete(path)
    gallery_page = f"/characters/{character_id}/images"
    target = safe_next(next, character_id, gallery_page)
    if target.startswith("/images/"):  # that page is gone with the image
        target = gallery_page
    return RedirectResponse(target, status_code=303)
