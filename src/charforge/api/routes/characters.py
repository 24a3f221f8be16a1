"""/api/characters: the caller's roster."""

from __future__ import annotations

from fastapi import APIRouter, Response

from charforge.api.deps import ContainerDep, CurrentUser
from charforge.api.schemas import CharacterIn, CharacterOut
from charforge.container import Container
from charforge.db.references import reference_counts
from charforge.services import characters
from charforge.services.checkpoint_check import BackendCheckpoints

router = APIRouter(prefix="/api/characters", tags=["characters"])


def checkpoints_of(c: Container) -> BackendCheckpoints:
    """An own checkpoint is checked against its route's backends (a 422 when those that
    answer lack it; accepted when none answers), waiting at most the probe timeout."""
    return BackendCheckpoints(c.pool, timeout=c.settings.probe_timeout)


@router.post("", status_code=201, response_model=CharacterOut)
def create_character(
    body: CharacterIn, user: CurrentUser, c: ContainerDep, response: Response
) -> CharacterOut:
    with c.db.session() as session:
        character = characters.create(
            session, user, body.to_fields(), c.table, checkpoints=checkpoints_of(c)
        )
        out = CharacterOut.of(character)
    response.headers["Location"] = f"/api/characters/{out.id}"
    return out


@router.get("", response_model=list[CharacterOut])
def list_characters(user: CurrentUser, c: ContainerDep) -> list[CharacterOut]:
    with c.db.session() as session:
        counts = reference_counts(session, user.id)
        return [
            CharacterOut.of(ch, counts.get(ch.id, 0)) for ch in characters.list_for(session, user)
        ]


@router.get("/{character_id}", response_model=CharacterOut)
def get_character(character_id: str, user: CurrentUser, c: ContainerDep) -> CharacterOut:
    with c.db.session() as session:
        character = characters.get(session, user, character_id)
        return CharacterOut.of(character, reference_counts(session, user.id).get(character.id, 0))


@router.patch("/{character_id}", response_model=CharacterOut)
def update_character(
    character_id: str, body: CharacterIn, user: CurrentUser, c: ContainerDep
) -> CharacterOut:
    with c.db.session() as session:
        character = characters.update(
            session, user, character_id, body.to_fields(), c.table, checkpoints=checkpoints_of(c)
        )
        return CharacterOut.of(character, reference_counts(session, user.id).get(character.id, 0))


@router.delete("/{character_id}", status_code=204)
def delete_character(character_id: str, user: CurrentUser, c: ContainerDep) -> Response:
    with c.db.session() as session:
        paths = characters.delete(session, user, character_id)
    for path in paths:  # rows are gone for good; now the files may go
        c.store.delete(path)
    return Response(status_code=204)
