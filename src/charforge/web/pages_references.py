"""A character's reference images on its page (upload, view, delete) and SillyTavern cards
(import from the characters list, download from the character's page).

Uploads are read with the same bounds as the API (one file, a few fields, one byte past the
size limit at most) and a file written for a row that did not land is removed again.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Form, Request
from fastapi.responses import FileResponse, HTMLResponse, RedirectResponse, Response
from starlette.concurrency import run_in_threadpool

from charforge.api.uploads import form_file
from charforge.container import Container
from charforge.db.models import User
from charforge.errors import Conflict, InvalidInput
from charforge.identity.intake import MAX_BYTES
from charforge.services import cards, characters, references
from charforge.web.pages_characters import character_page, roster_page
from charforge.web.render import container_of, page
from charforge.web.session import check_csrf, require_user

router = APIRouter(include_in_schema=False)
_CACHE = {"Cache-Control": "private, max-age=86400"}


def _add(c: Container, user: User, character_id: str, data: bytes) -> None:
    with c.store.undo_on_failure(), c.db.session() as session:
        references.add(session, c.store, user, character_id, data)


@router.post("/characters/{character_id}/references")
async def upload_reference(request: Request, character_id: str) -> Response:
    c = container_of(request)
    user = await run_in_threadpool(require_user, request, c)
    fields, data = await form_file(request, MAX_BYTES, fields=None)
    check_csrf(request, fields.get("csrf_token"))
    try:
        if data is None:
            raise InvalidInput("No picture was chosen.", field="file")
        if len(data) > MAX_BYTES:
            raise InvalidInput(
                f"The picture is larger than {MAX_BYTES // 2**20} MB, the most a reference "
                "image may be.",
                field="file",
                hint="Choose a smaller one: a face needs no more than 1024 pixels a side.",
            )
        await run_in_threadpool(_add, c, user, character_id, data)
    except (InvalidInput, Conflict) as exc:
        return await run_in_threadpool(character_page, request, user, character_id, exc, exc.status)
    return RedirectResponse(f"/characters/{character_id}#references", status_code=303)


def _reference_path(request: Request, character_id: str, reference_id: str) -> str:
    c = container_of(request)
    user = require_user(request, c)
    with c.db.session() as session:
        return references.get(session, user, character_id, reference_id).file_path


@router.get("/characters/{character_id}/references/{reference_id}/file")
def reference_file(request: Request, character_id: str, reference_id: str) -> FileResponse:
    relative = _reference_path(request, character_id, reference_id)
    return FileResponse(
        container_of(request).store.existing(relative), media_type="image/png", headers=_CACHE
    )


@router.get("/characters/{character_id}/references/{reference_id}/thumb")
async def reference_thumb(request: Request, character_id: str, reference_id: str) -> FileResponse:
    relative = await run_in_threadpool(_reference_path, request, character_id, reference_id)
    path = await run_in_threadpool(container_of(request).store.thumbnail, relative)
    return FileResponse(path, media_type="image/webp", headers=_CACHE)


@router.get(
    "/characters/{character_id}/references/{reference_id}/delete", response_class=HTMLResponse
)
def delete_reference_confirm(request: Request, character_id: str, reference_id: str) -> Response:
    c = container_of(request)
    user = require_user(request, c)
    with c.db.session() as session:
        character = characters.get(session, user, character_id)
        reference = references.get(session, user, character_id, reference_id)
    return page(request, "confirm_delete_reference.html", user, c=character, ref=reference)


@router.post("/characters/{character_id}/references/{reference_id}/delete")
def delete_reference(
    request: Request,
    character_id: str,
    reference_id: str,
    csrf_token: Annotated[str, Form()],
) -> Response:
    check_csrf(request, csrf_token)
    c = container_of(request)
    user = require_user(request, c)
    with c.db.session() as session:
        path = references.delete(session, user, character_id, reference_id)
    c.store.delete(path)
    return RedirectResponse(f"/characters/{character_id}#references", status_code=303)


@router.get("/characters/{character_id}/card.png")
def download_card(request: Request, character_id: str) -> Response:
    c = container_of(request)
    user = require_user(request, c)
    with c.db.session() as session:
        png = cards.export(session, c.store, user, character_id)
        name = characters.get(session, user, character_id).name
    safe = "".join(ch for ch in name if ch.isalnum() or ch in " -_").strip() or "character"
    return Response(
        png,
        media_type="image/png",
        headers={
            "Content-Disposition": f'attachment; filename="{safe}.png"',
            "Cache-Control": "no-store",
        },
    )


def _import(c: Container, user: User, data: bytes, style: str | None) -> str:
    with c.store.undo_on_failure(), c.db.session() as session:
        return cards.import_card(session, c.store, user, data, c.table, style=style).id


@router.post("/characters/import")
async def import_card(request: Request) -> Response:
    c = container_of(request)
    user = await run_in_threadpool(require_user, request, c)
    fields, data = await form_file(request, cards.CARD_MAX_BYTES, fields=None)
    check_csrf(request, fields.get("csrf_token"))
    style = fields.get("art_style", "").strip()
    try:
        if data is None:
            raise InvalidInput("No card was chosen.", field="file")
        if len(data) > cards.CARD_MAX_BYTES:
            raise InvalidInput(
                f"The card is larger than {cards.CARD_MAX_BYTES // 2**20} MB, the most a card "
                "may be.",
                field="file",
            )
        if style:
            style = c.table.normalize_style(style, field="art_style")
        new_id = await run_in_threadpool(_import, c, user, data, style or None)
    except InvalidInput as exc:
        return await run_in_threadpool(roster_page, request, user, exc, exc.status, style)
    return RedirectResponse(f"/characters/{new_id}", status_code=303)
