"""Image history and files, owner-scoped."""

from __future__ import annotations

import base64
import binascii
from datetime import datetime
from typing import Annotated

from fastapi import APIRouter, Query, Response
from fastapi.responses import FileResponse

from charforge.api.deps import ContainerDep, CurrentUser
from charforge.api.schemas import ImageOut, ImagePage
from charforge.errors import InvalidInput
from charforge.services import images

router = APIRouter(tags=["images"])


def encode_cursor(created_at: datetime, image_id: str) -> str:
    return base64.urlsafe_b64encode(f"{created_at.isoformat()}|{image_id}".encode()).decode()


def decode_cursor(cursor: str) -> tuple[datetime, str]:
    try:
        created, image_id = base64.urlsafe_b64decode(cursor.encode()).decode().split("|", 1)
        return datetime.fromisoformat(created), image_id
    except (ValueError, binascii.Error, UnicodeDecodeError) as exc:
        raise InvalidInput(
            "The cursor is not one this server gave out.",
            field="cursor",
            hint="Pass the previous page's nextCursor, or leave cursor out for the first page.",
        ) from exc


@router.get("/api/characters/{character_id}/images", response_model=ImagePage)
def character_images(
    character_id: str,
    user: CurrentUser,
    c: ContainerDep,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
    cursor: str | None = None,
) -> ImagePage:
    after = decode_cursor(cursor) if cursor else None
    with c.db.session() as session:
        rows = images.history(session, user, character_id, limit=limit + 1, after=after)
        page = [ImageOut.of(row) for row in rows[:limit]]
        next_cursor = (
            encode_cursor(rows[limit - 1].created_at, rows[limit - 1].id)
            if len(rows) > limit
            else None
        )
    return ImagePage(items=page, next_cursor=next_cursor)


@router.get("/api/images/{image_id}", response_model=ImageOut)
def get_image(image_id: str, user: CurrentUser, c: ContainerDep) -> ImageOut:
    with c.db.session() as session:
        return ImageOut.of(images.get(session, user, image_id))


@router.get("/api/images/{image_id}/file", response_class=FileResponse)
def image_file(image_id: str, user: CurrentUser, c: ContainerDep) -> FileResponse:
    with c.db.session() as session:
        image = images.get(session, user, image_id)
        path = c.store.existing(image.file_path)
    return FileResponse(
        path,
        media_type="image/png",
        filename=f"{image.id}.png",
        content_disposition_type="inline",
        headers={"Cache-Control": "private, max-age=31536000, immutable"},
    )


@router.delete("/api/images/{image_id}", status_code=204)
def delete_image(image_id: str, user: CurrentUser, c: ContainerDep) -> Response:
    with c.db.session() as session:
        path = images.delete(session, user, image_id)
    c.store.delete(path)
    return Response(status_code=204)
