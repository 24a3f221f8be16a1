"""/api/presets: the caller's saved generation settings, by name."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from fastapi import APIRouter, Response
from pydantic import ConfigDict, Field
from pydantic.alias_generators import to_camel

from charforge.api.deps import ContainerDep, CurrentUser
from charforge.api.schemas import Wire
from charforge.container import Container
from charforge.db.models import Preset, User
from charforge.domain.params import GenerationSettings
from charforge.services import presets

router = APIRouter(tags=["presets"])


class PresetIn(Wire):
    """In a PATCH, absent fields stay as they are; ``params`` is replaced whole."""

    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="forbid")

    name: str | None = Field(default=None, max_length=200)
    # The generate body's settings, with its limits; an unknown key is a 422 naming it.
    params: GenerationSettings | None = None


class PresetOut(Wire):
    id: str
    name: str
    params: dict[str, Any]
    created_at: datetime
    updated_at: datetime

    @classmethod
    def of(cls, p: Preset) -> PresetOut:
        return cls(
            id=p.id,
            name=p.name,
            params=dict(p.params or {}),
            created_at=p.created_at,
            updated_at=p.updated_at,
        )


class PresetList(Wire):
    items: list[PresetOut]


@router.get("/api/presets", response_model=PresetList)
def list_presets(user: CurrentUser, c: ContainerDep) -> PresetList:
    with c.db.session() as session:
        return PresetList(items=[PresetOut.of(p) for p in presets.list_for(session, user)])


def create_preset_for(c: Container, user: User, body: PresetIn) -> PresetOut:
    """Shared by the API and the Generate page."""
    with c.db.session() as session:
        settings = body.params or GenerationSettings()
        return PresetOut.of(presets.create(session, user, body.name or "", settings))


@router.post("/api/presets", status_code=201, response_model=PresetOut)
def create_preset(
    body: PresetIn, user: CurrentUser, c: ContainerDep, response: Response
) -> PresetOut:
    out = create_preset_for(c, user, body)
    response.headers["Location"] = f"/api/presets/{out.id}"
    return out


@router.get("/api/presets/{preset_id}", response_model=PresetOut)
def get_preset(preset_id: str, user: CurrentUser, c: ContainerDep) -> PresetOut:
    with c.db.session() as session:
        return PresetOut.of(presets.get(session, user, preset_id))


@router.patch("/api/presets/{preset_id}", response_model=PresetOut)
def update_preset(preset_id: str, body: PresetIn, user: CurrentUser, c: ContainerDep) -> PresetOut:
    with c.db.session() as session:
        return PresetOut.of(presets.update(session, user, preset_id, body.name, body.params))


@router.delete("/api/presets/{preset_id}", status_code=204)
def delete_preset(preset_id: str, user: CurrentUser, c: ContainerDep) -> Response:
    with c.db.session() as session:
        presets.delete(session, user, preset_id)
    return Response(status_code=204)
