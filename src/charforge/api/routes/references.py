"""/api/characters/{id}/references: the pictures a character's identity is conditioned on and
scored against."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request, Response
from fastapi.responses import FileResponse
from pydantic import ConfigDict, Field, ValidationError
from pydantic.alias_generators import to_camel
from starlette.concurrency import run_in_threadpool

from charforge.api.deps import ContainerDep, CurrentUser
from charforge.api.schemas import ReferenceList, ReferenceOut, Wire
from charforge.api.uploads import form_file
from charforge.container import Container
from charforge.db.models import User
from charforge.errors import InvalidInput
from charforge.identity.intake import MAX_BYTES
from charforge.services import references

router = APIRouter(prefix="/api/characters", tags=["references"])


class PromoteIn(Wire):
    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="forbid")
    image_id: str = Field(min_length=1, max_length=64)


_HOW = (
    "Send multipart/form-data with the picture in the field 'file' (PNG, JPEG or WebP), or "
    'JSON {"imageId": "..."} to promote one of the character\'s images.'
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
            "application/json": {"schema": PromoteIn.model_json_schema(by_alias=True)},
        },
    }
}


def _add(
    c: Container, user: User, character_id: str, data: bytes | None, image_id: str | None
) -> ReferenceOut:
    with c.store.undo_on_failure(), c.db.session() as session:
        if image_id is not None:
            row = references.promote(session, c.store, user, character_id, image_id)
        else:
            assert data is not None
            row = references.add(session, c.store, user, character_id, data)
        return ReferenceOut.of(row)


@router.post(
    "/{character_id}/references",
    status_code=201,
    response_model=ReferenceOut,
    openapi_extra=_BODY_DOC,
)
async def add_reference(
    character_id: str, request: Request, user: CurrentUser, c: ContainerDep, response: Response
) -> ReferenceOut:
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type == "multipart/form-data":
        _, data = await form_file(request, MAX_BYTES, hint=_HOW)
        if data is None:
            raise InvalidInput(
                "The picture is missing: no form field 'file'.", field="file", hint=_HOW
            )
        out = await run_in_threadpool(_add, c, user, character_id, data, None)
    elif content_type == "application/json":
        raw = await request.body()
        try:
            body = PromoteIn.model_validate_json(raw)
        except ValidationError as exc:
            first = exc.errors()[0]
            field = ".".join(str(p) for p in first.get("loc", ())) or None
            raise InvalidInput(
                f"Invalid body: {field or 'JSON'}: {first.get('msg', 'invalid')}.",
                field=field,
                hint=_HOW,
            ) from exc
        out = await run_in_threadpool(_add, c, user, character_id, None, body.image_id)
    else:
        raise InvalidInput(
            f"Content-Type '{content_type or 'none'}' is not accepted here.",
            field="file",
            hint=_HOW,
        )
    response.headers["Location"] = out.url.removesuffix("/file")
    return out


@router.get("/{character_id}/references", response_model=ReferenceList)
def list_references(character_id: str, user: CurrentUser, c: ContainerDep) -> ReferenceList:
    with c.db.session() as session:
        rows = references.list_for(session, user, character_id)
        return ReferenceList(items=[ReferenceOut.of(r) for r in rows])


@router.get("/{character_id}/references/{ref_id}", response_model=ReferenceOut)
def get_reference(
    character_id: str, ref_id: str, user: CurrentUser, c: ContainerDep
) -> ReferenceOut:
    with c.db.session() as session:
        return ReferenceOut.of(references.get(session, user, character_id, ref_id))


@router.get("/{character_id}/references/{ref_id}/file", response_class=FileResponse)
def reference_file(
    character_id: str, ref_id: str, user: CurrentUser, c: ContainerDep
) -> FileResponse:
    with c.db.session() as session:
        row = references.get(session, user, character_id, ref_id)
        path = c.store.existing(row.file_path)
    return FileResponse(
        path,
        media_type="image/png",
        filename=f"{row.id}.png",
        content_disposition_type="inline",
        headers={"Cache-Control": "private, max-age=31536000, immutable"},
    )


@router.delete("/{character_id}/references/{ref_id}", status_code=204)
def delete_reference(
    character_id: str, ref_id: str, user: CurrentUser, c: ContainerDep
) -> Response:
    with c.db.session() as session:
        path = references.delete(session, user, character_id, ref_id)
    c.store.delete(path)
    return Response(status_code=204)
