"""The roster: list, create, edit, delete, and one character's page."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Form, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from pydantic import BaseModel

from charforge.db import repositories as repo
from charforge.db.models import Character, User
from charforge.domain.routes import RouteTable
from charforge.errors import InvalidInput
from charforge.services import characters
from charforge.services.characters import CharacterFields
from charforge.web.render import container_of, indicator, page, route_of
from charforge.web.session import check_csrf, require_user

router = APIRouter(include_in_schema=False)
OptionalForm = Annotated[str, Form()]


def _style_choices(request: Request) -> list[dict[str, str]]:
    table = container_of(request).table
    return [
        {"value": r.style, "label": f"{r.emoji} {r.label} — {r.checkpoint}"}
        for r in table.routes.values()
    ]


def _form(
    request: Request,
    user: User,
    character: Character | None,
    values: dict[str, str],
    error: InvalidInput | None = None,
    status: int = 200,
) -> Response:
    return page(
        request,
        "character_form.html",
        user,
        status,
        character=character,
        values=values,
        styles=_style_choices(request),
        error=error,
    )


def _values(character: Character | None, table: RouteTable) -> dict[str, str]:
    if character is None:
        return {"name": "", "description": "", "appearance": "", "art_style": "anime", "model": ""}
    route_checkpoint = (
        table.route(character.primary_style).checkpoint if character.primary_style else None
    )
    return {
        "name": character.name,
        "description": character.description,
        "appearance": character.appearance,
        "art_style": character.primary_style or "",
        # Only an own checkpoint is shown; empty means "the style's", so changing the style
        # moves the character to that style's checkpoint.
        "model": "" if character.model == route_checkpoint else (character.model or ""),
    }


@router.get("/characters", response_class=HTMLResponse)
def list_page(request: Request) -> Response:
    c = container_of(request)
    user = require_user(request, c)
    with c.db.session() as session:
        rows = []
        for ch in characters.list_for(session, user):
            latest = repo.images_page(session, user.id, ch.id, 1, None)
            route, checkpoint = route_of(ch, c)
            rows.append(
                {
                    "c": ch,
                    "route": route,
                    "checkpoint": checkpoint,
                    "latest": latest[0] if latest else None,
                }
            )
    return page(request, "characters.html", user, rows=rows)


@router.get("/characters/new", response_class=HTMLResponse)
def new_form(request: Request) -> Response:
    user = require_user(request, container_of(request))
    return _form(request, user, None, _values(None, container_of(request).table))


class CharacterForm(BaseModel):
    """The create and edit form, as posted."""

    csrf_token: str = ""
    name: str = ""
    description: str = ""
    appearance: str = ""
    art_style: str = ""
    model: str = ""

    def values(self) -> dict[str, str]:
        return self.model_dump(exclude={"csrf_token"})

    def fields(self, table: RouteTable) -> CharacterFields:
        style = table.normalize_style(self.art_style, field="art_style") if self.art_style else None
        # An empty checkpoint field means the style's own checkpoint.
        model = self.model.strip() or (table.route(style).checkpoint if style else None)
        return CharacterFields(
            name=self.name,
            description=self.description,
            appearance=self.appearance,
            art_style=style,
            model=model,
        )


FormDep = Annotated[CharacterForm, Form()]


@router.post("/characters/new")
def create(request: Request, form: FormDep) -> Response:
    check_csrf(request, form.csrf_token)
    c = container_of(request)
    user = require_user(request, c)
    try:
        with c.db.session() as session:
            new_id = characters.create(session, user, form.fields(c.table), c.table).id
    except InvalidInput as exc:
        return _form(request, user, None, form.values(), exc, 422)
    return RedirectResponse(f"/characters/{new_id}", status_code=303)


@router.get("/characters/{character_id}", response_class=HTMLResponse)
def detail(request: Request, character_id: str) -> Response:
    c = container_of(request)
    user = require_user(request, c)
    with c.db.session() as session:
        character = characters.get(session, user, character_id)
        recent = list(repo.images_page(session, user.id, character_id, 8, None))
    return page(
        request,
        "character.html",
        user,
        c=character,
        indicator=indicator(character, c),
        recent=recent,
        stored_style=character.primary_style,
    )


@router.get("/characters/{character_id}/edit", response_class=HTMLResponse)
def edit_form(request: Request, character_id: str) -> Response:
    c = container_of(request)
    user = require_user(request, c)
    with c.db.session() as session:
        character = characters.get(session, user, character_id)
    return _form(request, user, character, _values(character, c.table))


@router.post("/characters/{character_id}/edit")
def edit(request: Request, character_id: str, form: FormDep) -> Response:
    check_csrf(request, form.csrf_token)
    c = container_of(request)
    user = require_user(request, c)
    try:
        with c.db.session() as session:
            characters.update(session, user, character_id, form.fields(c.table), c.table)
    except InvalidInput as exc:
        with c.db.session() as session:
            character = characters.get(session, user, character_id)
        return _form(request, user, character, form.values(), exc, 422)
    return RedirectResponse(f"/characters/{character_id}", status_code=303)


@router.get("/characters/{character_id}/delete", response_class=HTMLResponse)
def delete_confirm(request: Request, character_id: str) -> Response:
    c = container_of(request)
    user = require_user(request, c)
    with c.db.session() as session:
        character = characters.get(session, user, character_id)
        count = len(repo.image_paths_of_character(session, user.id, character_id))
    return page(request, "confirm_delete.html", user, c=character, image_count=count)


@router.post("/characters/{character_id}/delete")
def delete(request: Request, character_id: str, csrf_token: OptionalForm) -> Response:
    check_csrf(request, csrf_token)
    c = container_of(request)
    user = require_user(request, c)
    with c.db.session() as session:
        paths = characters.delete(session, user, character_id)
    for path in paths:
        c.store.delete(path)
    return RedirectResponse("/characters", status_code=303)
