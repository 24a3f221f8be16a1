"""SillyTavern character cards: POST /api/characters/import, GET /api/characters/{id}/card.png."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Query, Request, Response
from starlette.concurrency import run_in_threadpool

from charforge.api.deps import ContainerDep, CurrentUser
from charforge.api.routes.characters import checkpoints_of
from charforge.api.schemas import CharacterOut
from charforge.api.uploads import form_file
from charforge.container import Container
from charforge.db.models import User
from charforge.db.references import reference_counts
from charforge.errors import InvalidInput
from charforge.services import cards, characters

router = APIRouter(prefix="/api/characters", tags=["characters"])

_HOW = (
    "Send the card PNG or JSON as multipart/form-data field 'file', or as the request body "
    "with Content-Type image/png or application/json."
)
_BODY_DOC: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["file"],
                    "properties": {"file": {"type": "string", "format": "binary"}},
                }
            },
            "image/png": {"schema": {"type": "string", "format": "binary"}},
            "application/json": {"schema": {"type": "object"}},
        },
    }
}


async def _card_bytes(request: Request) -> bytes:
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type == "multipart/form-data":
        _, data = await form_file(request, cards.CARD_MAX_BYTES, hint=_HOW)
        if data is None:
            raise InvalidInput(
                "The card is missing: no form field 'file'.", field="file", hint=_HOW
            )
        return data
    if content_type in ("image/png", "application/json", "application/octet-stream"):
        chunks, size = [], 0
        async for chunk in request.stream():  # bounded: a huge body is refused, not buffered
            size += len(chunk)
            if size > cards.CARD_MAX_BYTES:
                raise InvalidInput(
                    f"The card is larger than {cards.CARD_MAX_BYTES // 2**20} MB.",
                    field="file",
                    extra={"limit": cards.CARD_MAX_BYTES},
                )
            chunks.append(chunk)
        return b"".join(chunks)
    raise InvalidInput(
        f"Content-Type '{content_type or 'none'}' is not accepted here.", field="file", hint=_HOW
    )


def _import(
    c: Container, user: User, data: bytes, style: str | None, model: str | None
) -> CharacterOut:
    with c.store.undo_on_failure(), c.db.session() as session:
        character = cards.import_card(
            session,
            c.store,
            user,
            data,
            c.table,
            style=style,
            model=model,
            checkpoints=checkpoints_of(c),
        )
        return CharacterOut.of(character, reference_counts(session, user.id).get(character.id, 0))


@router.post("/import", status_code=201, response_model=CharacterOut, openapi_extra=_BODY_DOC)
async def import_card(
    request: Request,
    user: CurrentUser,
    c: ContainerDep,
    response: Response,
    art_style: Annotated[str | None, Query(alias="artStyle", max_length=32)] = None,
    model: Annotated[str | None, Query(max_length=255)] = None,
) -> CharacterOut:
    """A SillyTavern card (V1/V2/V3, PNG or JSON) becomes a character; its picture becomes
    the first reference. ``artStyle`` and ``model`` choose where it is rendered (default: what
    a charforge-exported card says, else the anime style)."""
    data = await _card_bytes(request)
    out = await run_in_threadpool(_import, c, user, data, art_style, model)
    response.headers["Location"] = f"/api/characters/{out.id}"
    return out


@router.get(
    "/{character_id}/card.png",
    response_class=Response,
    responses={200: {"content": {"image/png": {}}, "description": "A SillyTavern card"}},
)
def export_card(character_id: str, user: CurrentUser, c: ContainerDep) -> Response:
    with c.db.session() as session:
        png = cards.export(session, c.store, user, character_id)
        name = characters.get(session, user, character_id).name
    safe = "".join(ch for ch in name if ch.isalnum() or ch in " -_").strip() or "character"
    return Response(
        png,
        media_type="image/png",
        headers={"Content-Disposition": f'attachment; filename="{safe}.png"'},
    )
