"""A character's reference images: add (upload or promote one of its images), list, remove."""

from __future__ import annotations

from collections.abc import Sequence

from sqlalchemy.orm import Session

from charforge.db import references as refs
from charforge.db.models import Reference, User, new_id, utcnow
from charforge.errors import Conflict, InvalidInput, NotFound
from charforge.identity.intake import accept_image
from charforge.services import characters, images
from charforge.storage.files import ImageStore

MAX_REFERENCES = 8


def list_for(session: Session, owner: User, character_id: str) -> Sequence[Reference]:
    characters.get(session, owner, character_id)  # 404 for a character that is not yours
    return refs.references_of(session, owner.id, character_id)


def get(session: Session, owner: User, character_id: str, reference_id: str) -> Reference:
    characters.get(session, owner, character_id)
    found = refs.reference(session, owner.id, character_id, reference_id)
    if found is None:
        raise NotFound(
            f"Character '{character_id}' has no reference image '{reference_id}'.",
            field="refId",
            hint=f"List them with GET /api/characters/{character_id}/references.",
        )
    return found


def add(
    session: Session,
    store: ImageStore,
    owner: User,
    character_id: str,
    data: bytes,
    *,
    source: str = "upload",
    image_id: str | None = None,
    field: str = "file",
) -> Reference:
    """Checks, cleans and stores the picture; the file is written before the row that names
    it is committed (wrap the transaction in ``store.undo_on_failure()``)."""
    characters.get(session, owner, character_id)
    accepted = accept_image(data, field=field)
    refs.lock_character(session, character_id)
    existing = refs.references_of(session, owner.id, character_id)
    same = next((r for r in existing if r.sha256 == accepted.sha256), None)
    if same is not None:
        raise Conflict(
            f"This picture is already reference '{same.id}' of the character.",
            field=field,
            hint="Nothing to do; pick another picture to add a second reference.",
            extra={"referenceId": same.id},
        )
    if len(existing) >= MAX_REFERENCES:
        raise InvalidInput(
            f"A character may have at most {MAX_REFERENCES} reference images; this one has "
            f"{MAX_REFERENCES}.",
            field=field,
            hint="Delete one with DELETE /api/characters/{id}/references/{refId} first.",
            extra={"limit": MAX_REFERENCES},
        )
    reference_id = new_id()
    relative = store.reference_path(owner.id, character_id, reference_id)
    store.save(relative, accepted.png)
    row = Reference(
        id=reference_id,
        owner_id=owner.id,
        character_id=character_id,
        file_path=relative,
        width=accepted.width,
        height=accepted.height,
        sha256=accepted.sha256,
        source=source,
        image_id=image_id,
        created_at=utcnow(),
    )
    session.add(row)
    session.flush()
    return row


def promote(
    session: Session, store: ImageStore, owner: User, character_id: str, image_id: str
) -> Reference:
    """One of the character's own generated images becomes a reference."""
    characters.get(session, owner, character_id)  # 404 first: whose character it is
    image = images.get(session, owner, image_id)
    if image.character_id != character_id:
        raise InvalidInput(
            f"Image '{image_id}' is not an image of character '{character_id}'.",
            field="imageId",
            hint="Promote one of this character's own images (GET .../images lists them).",
        )
    data = store.existing(image.file_path).read_bytes()
    return add(
        session,
        store,
        owner,
        character_id,
        data,
        source="image",
        image_id=image_id,
        field="imageId",
    )


def delete(session: Session, owner: User, character_id: str, reference_id: str) -> str:
    """Deletes the row; returns the file to remove once the deletion is committed."""
    row = get(session, owner, character_id, reference_id)
    path = row.file_path
    session.delete(row)
    session.flush()
    return path
