"""Image history and files, owner-scoped."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query, Response
from fastapi.responses import FileResponse

from charforge.api.deps import ContainerDep, CurrentUser
from charforge.api.schemas import ImageOut, ImagePage
from charforge.services import images

router = APIRouter(tags=["images"])


@router.get("/api/characters/{character_id}/images", response_model=ImagePage)
def character_images(
    character_id: str,
    user: CurrentUser,
    c: ContainerDep,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
    cursor: str | None = None,
) -> ImagePage:
    with c.db.session() as session:
        rows, next_cursor = images.history(session, user, character_id, limit=limit, cursor=cursor)
        return ImagePage(items=[ImageOut.of(row) for row in rows], next_cursor=next_cursor)


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
