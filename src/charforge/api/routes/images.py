"""Images, owner-scoped: history, the gallery's search, one image, its file, marks, replay,
deletion (one or many), and a character's images as a streamed ZIP."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Query, Response
from fastapi.responses import FileResponse, JSONResponse, StreamingResponse
from starlette.concurrency import run_in_threadpool

from charforge.api.deps import ContainerDep, CurrentUser
from charforge.api.openapi_errors import ErrorEnvelope
from charforge.api.routes.generate import submit_generation
from charforge.api.routes.jobs import job_out
from charforge.api.schemas import (
    ImageOut,
    ImagePage,
    ImagePatch,
    ImagesDeleteIn,
    ImagesDeleteOut,
    JobOut,
)
from charforge.container import Container
from charforge.db.models import User
from charforge.services import characters, gallery, image_export, images

router = APIRouter(tags=["images"])
_NO_CHARACTER: dict[int | str, dict[str, Any]] = {
    404: {"model": ErrorEnvelope, "description": "No character with that id among yours"}
}
_NONE_YOURS: dict[int | str, dict[str, Any]] = {
    404: {"model": ErrorEnvelope, "description": "None of the ids is one of your images"}
}
# A replay is a new job: the same permission and quota checks as any submission.
_AS_A_JOB: dict[int | str, dict[str, Any]] = {
    403: {"model": ErrorEnvelope, "description": "Not allowed (a style, checkpoint or nsfw)"},
    429: {"model": ErrorEnvelope, "description": "A quota or the active-jobs limit"},
}


@router.get("/api/images", response_model=ImagePage, responses=_NO_CHARACTER)
def search_images(
    user: CurrentUser,
    c: ContainerDep,
    character_id: Annotated[str | None, Query(alias="characterId", max_length=64)] = None,
    q: Annotated[
        str | None, Query(max_length=gallery.Q_MAX, description="Text in the prompt, any case.")
    ] = None,
    favorite: bool | None = None,
    style: Annotated[str | None, Query(max_length=32, description="Art style.")] = None,
    model: Annotated[str | None, Query(max_length=255, description="Checkpoint.")] = None,
    since: Annotated[
        str | None, Query(alias="from", description="ISO date or date and time, inclusive.")
    ] = None,
    until: Annotated[
        str | None, Query(alias="to", description="ISO date (that whole day) or date and time.")
    ] = None,
    min_score: Annotated[float | None, Query(alias="minScore", ge=0.0, le=1.0)] = None,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
    cursor: str | None = None,
) -> ImagePage:
    """Your images, newest first, narrowed by any of the filters."""
    filters = gallery.filters_of(
        c.table,
        character_id=character_id,
        q=q,
        favorite=favorite,
        style=style,
        model=model,
        since=since,
        until=until,
        min_score=min_score,
    )
    with c.db.session() as session:
        rows, next_cursor = gallery.search(session, user, filters, limit=limit, cursor=cursor)
        return ImagePage(items=[ImageOut.of(row) for row in rows], next_cursor=next_cursor)


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


def zip_response(c: Container, user: User, character_id: str) -> StreamingResponse:
    """Shared with the pages. The owner check runs here, before the stream starts, so another
    user's id is a plain 404 rather than a broken download."""
    with c.db.session() as session:
        character = characters.get(session, user, character_id)
        who = (character.id, character.name)
    name = image_export.file_name(who[1])
    return StreamingResponse(
        image_export.zip_stream(c.db, c.store, user.id, who),
        media_type="application/zip",
        headers={
            "Content-Disposition": f'attachment; filename="{name}"',
            "Cache-Control": "no-store",
        },
    )


@router.get(
    "/api/characters/{character_id}/images.zip",
    response_class=StreamingResponse,
    responses={200: {"content": {"application/zip": {}}}},
)
def character_images_zip(character_id: str, user: CurrentUser, c: ContainerDep) -> Response:
    """Every image of the character as PNG (with its infotext) plus metadata.json."""
    return zip_response(c, user, character_id)


@router.get("/api/images/{image_id}", response_model=ImageOut)
def get_image(image_id: str, user: CurrentUser, c: ContainerDep) -> ImageOut:
    with c.db.session() as session:
        return ImageOut.of(images.get(session, user, image_id))


@router.patch("/api/images/{image_id}", response_model=ImageOut)
def mark_image(image_id: str, body: ImagePatch, user: CurrentUser, c: ContainerDep) -> ImageOut:
    """Favourite or not, and a note (``null`` clears it)."""
    marks = gallery.Marks(
        favorite=body.favorite, note=body.note, note_given="note" in body.model_fields_set
    )
    with c.db.session() as session:
        return ImageOut.of(gallery.mark(session, user, image_id, marks))


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


@router.post(
    "/api/images/{image_id}/replay", status_code=202, response_model=JobOut, responses=_AS_A_JOB
)
async def replay_image(image_id: str, user: CurrentUser, c: ContainerDep) -> JSONResponse:
    """A new job with exactly this image's parameters and seed."""
    ticket = await run_in_threadpool(_replay, c, user, image_id)
    out = await run_in_threadpool(job_out, c, user, ticket)
    return JSONResponse(
        out.model_dump(mode="json", by_alias=True),
        status_code=202,
        headers={"Location": f"/api/jobs/{ticket}"},
    )


def _replay(c: Container, user: User, image_id: str) -> str:
    with c.db.session() as session:
        body = gallery.replay_body(session, user, image_id)
    return submit_generation(c, user, body, 1).id


@router.delete("/api/images/{image_id}", status_code=204)
def delete_image(image_id: str, user: CurrentUser, c: ContainerDep) -> Response:
    with c.db.session() as session:
        path = images.delete(session, user, image_id)
    c.store.delete(path)
    return Response(status_code=204)


@router.post("/api/images/delete", response_model=ImagesDeleteOut, responses=_NONE_YOURS)
def delete_images(body: ImagesDeleteIn, user: CurrentUser, c: ContainerDep) -> ImagesDeleteOut:
    """Several of your images at once; ids that are not yours are reported, never touched."""
    with c.db.session() as session:
        done = gallery.delete_many(session, user, body.ids)
    for path in done.paths:  # only once the deletion is committed
        c.store.delete(path)
    return ImagesDeleteOut(deleted=done.deleted, not_found=done.not_found)
