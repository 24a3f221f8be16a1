"""/api/admin/quarantine: images the output screening withheld (administrators only)."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated

from fastapi import APIRouter, Query, Response
from fastapi.responses import FileResponse

from charforge.api.deps import AdminUser, ContainerDep
from charforge.api.schemas import ImageOut, Wire
from charforge.services import quarantine

router = APIRouter(prefix="/api/admin/quarantine", tags=["admin"])


class WithheldOut(Wire):
    id: str
    url: str  # the file, for administrators only
    owner: str
    character_id: str
    character_name: str
    job_id: str
    prompt: str
    model: str
    nsfw_score: float | None
    width: int
    height: int
    created_at: datetime

    @classmethod
    def of(cls, item: quarantine.Withheld) -> WithheldOut:
        i = item.image
        return cls(
            id=i.id,
            url=f"/api/admin/quarantine/{i.id}/file",
            owner=item.owner,
            character_id=i.character_id,
            character_name=item.character,
            job_id=i.job_id,
            prompt=i.prompt,
            model=i.checkpoint,
            nsfw_score=i.nsfw_score,
            width=i.width,
            height=i.height,
            created_at=i.created_at,
        )


class WithheldPage(Wire):
    items: list[WithheldOut]
    next_cursor: str | None


@router.get("", response_model=WithheldPage)
def list_withheld(
    _admin: AdminUser,
    c: ContainerDep,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
    cursor: Annotated[str | None, Query(max_length=200)] = None,
) -> WithheldPage:
    with c.db.session() as session:
        items, next_cursor = quarantine.page(session, limit=limit, cursor=cursor)
        return WithheldPage(items=[WithheldOut.of(i) for i in items], next_cursor=next_cursor)


@router.get("/{image_id}", response_model=WithheldOut)
def get_withheld(image_id: str, _admin: AdminUser, c: ContainerDep) -> WithheldOut:
    with c.db.session() as session:
        return WithheldOut.of(quarantine.get(session, image_id))


@router.get("/{image_id}/file", response_class=FileResponse)
def withheld_file(image_id: str, _admin: AdminUser, c: ContainerDep) -> FileResponse:
    with c.db.session() as session:
        path = c.store.existing(quarantine.get(session, image_id).image.file_path)
    # Never cached: once released or deleted, this URL must stop answering.
    return FileResponse(path, media_type="image/png", headers={"Cache-Control": "no-store"})


@router.post("/{image_id}/release", response_model=ImageOut)
def release_withheld(image_id: str, admin: AdminUser, c: ContainerDep) -> ImageOut:
    """The owner sees the image from now on: in their history, on its page, in its job."""
    with c.db.session() as session:
        return ImageOut.of(quarantine.release(session, admin.name, image_id))


@router.delete("/{image_id}", status_code=204)
def delete_withheld(image_id: str, admin: AdminUser, c: ContainerDep) -> Response:
    with c.db.session() as session:
        path = quarantine.delete(session, admin.name, image_id)
    c.store.delete(path)
    return Response(status_code=204)
