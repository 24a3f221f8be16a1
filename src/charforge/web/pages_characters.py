"""The roster: list, create, edit, delete, and one character's page."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Form, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from pydantic import BaseModel

from charforge.api.routes.characters import checkpoints_of
from charforge.db import images as image_rows
from charforge.db import references as refs
from charforge.db.models import Character, User
from charforge.domain.params import SEED_MAX
from charforge.domain.routes import RouteTable
from charforge.errors import CharforgeError, InvalidInput
from charforge.identity import intake
from charforge.services import characters
from charforge.services.characters import (
    DEFAULT_IDENTITY_STRENGTH,
    MAX_LORAS,
    CharacterFields,
)
from charforge.services.references import MAX_REFERENCES
from charforge.web.identity_view import page_error
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
        error=page_error(error) if error else None,
        invalid=_FIELD_IDS.get(error.field or "", error.field) if error else None,
        max_loras=MAX_LORAS,
    )


# The services' field names -> the form's inputs.
_FIELD_IDS = {"artStyle.primaryStyle": "art_style", "imageGeneration.model": "model"}


def _values(character: Character | None, table: RouteTable) -> dict[str, str]:
    if character is None:
        return {
            "name": "",
            "description": "",
            "appearance": "",
            "art_style": "anime",
            "model": "",
            "negative_prompt": "",
            "identity_strength": f"{DEFAULT_IDENTITY_STRENGTH:g}",
            "loras": "",
            "seed": "",
        }
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
        "negative_prompt": character.negative_prompt or "",
        "identity_strength": f"{_strength_of(character):g}",
        "loras": lora_lines(character),
        "seed": "" if character.seed is None else str(character.seed),
    }


def _strength_of(character: Character) -> float:
    strength = character.identity_strength
    return DEFAULT_IDENTITY_STRENGTH if strength is None else float(strength)


def lora_lines(character: Character) -> str:
    """The character's LoRAs as the form shows them: ``name:weight``, one a line."""
    return "\n".join(f"{x['name']}:{float(x['weight']):g}" for x in character.loras or [])


LORA_WEIGHT_MIN, LORA_WEIGHT_MAX = -5.0, 5.0
_LORA_HELP = "Write one LoRA a line as name:weight, such as detail_tweaker:0.6."


def parse_loras(text: str) -> list[tuple[str, float]]:
    """``name:weight`` lines (``<lora:name:weight>`` tags pasted from a prompt are read too);
    a line without a weight gets 1."""
    out: list[tuple[str, float]] = []
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip().strip(",").strip()
        if not line:
            continue
        if line.lower().startswith("<lora:") and line.endswith(">"):
            line = line[len("<lora:") : -1]
        name, colon, weight_text = line.rpartition(":")
        if not colon:
            name, weight_text = line, ""
        name = name.strip()
        if not name or any(ch in name for ch in "<>:") or len(name) > 200:
            raise InvalidInput(
                f"LoRA line {number} ({raw.strip()[:60]}) is not a LoRA name with a weight.",
                field="loras",
                hint=_LORA_HELP + " Names cannot contain <, > or :.",
            )
        try:
            weight = float(weight_text) if weight_text.strip() else 1.0
        except ValueError:
            weight = float("nan")
        if not LORA_WEIGHT_MIN <= weight <= LORA_WEIGHT_MAX:
            raise InvalidInput(
                f"LoRA line {number} ({name}): the weight must be a number from "
                f"{LORA_WEIGHT_MIN:g} to {LORA_WEIGHT_MAX:g}.",
                field="loras",
                hint=_LORA_HELP,
            )
        out.append((name, weight))
    if len(out) > MAX_LORAS:
        raise InvalidInput(
            f"A character can have at most {MAX_LORAS} LoRAs; the list has {len(out)}.",
            field="loras",
            hint="Remove the ones it can do without.",
        )
    return out


def parse_strength(text: str) -> float | None:
    if not text.strip():
        return None
    try:
        value = float(text.replace(",", "."))
    except ValueError:
        value = float("nan")
    if not 0.0 <= value <= 1.0:
        raise InvalidInput(
            f"Reference strength must be a number from 0 to 1 (got {text.strip()[:20]!r}).",
            field="identity_strength",
            hint=f"0 leaves the reference images out; {DEFAULT_IDENTITY_STRENGTH:g} is the "
            "default.",
        )
    return value


def parse_seed(text: str) -> int | None:
    if not text.strip():
        return None
    try:
        value = int(text.strip())
    except ValueError:
        value = -1
    if not 0 <= value <= SEED_MAX:
        raise InvalidInput(
            f"The fixed seed must be a whole number from 0 to {SEED_MAX} (got "
            f"{text.strip()[:20]!r}).",
            field="seed",
            hint="Leave it empty for a new random seed for every image.",
        )
    return value


@router.get("/characters", response_class=HTMLResponse)
def list_page(request: Request) -> Response:
    c = container_of(request)
    return roster_page(request, require_user(request, c))


def roster_page(
    request: Request,
    user: User,
    import_error: CharforgeError | None = None,
    status: int = 200,
    import_style: str = "",
) -> Response:
    """The list of characters, with the card import form (and its error, if any)."""
    c = container_of(request)
    with c.db.session() as session:
        rows = []
        for ch in characters.list_for(session, user):
            latest = image_rows.images_page(session, user.id, ch.id, 1, None)
            route, checkpoint = route_of(ch, c)
            rows.append(
                {
                    "c": ch,
                    "route": route,
                    "checkpoint": checkpoint,
                    "latest": latest[0] if latest else None,
                }
            )
    return page(
        request,
        "characters.html",
        user,
        status,
        rows=rows,
        styles=_style_choices(request),
        import_error=_import_error(import_error) if import_error else None,
        import_style=import_style,
    )


def _import_error(exc: CharforgeError) -> dict[str, str | None]:
    shown = page_error(exc, _CARD_HINT if exc.field == "file" else None)
    if "'chara'" in exc.message:  # a PNG without card data: a plain picture
        shown["message"] = "This PNG is a picture without character card data in it."
    return shown


_CARD_HINT = (
    "Choose a SillyTavern character card: the PNG a card site or SillyTavern gives you, or "
    "its JSON file."
)


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
    # The form says it has the fields below (FastAPI reads an empty field as absent, so an
    # emptied one could not clear a value otherwise); a post without them leaves them as is.
    generation_fields: str = ""
    negative_prompt: str = ""
    identity_strength: str = ""
    loras: str = ""
    seed: str = ""

    def values(self) -> dict[str, str]:
        return self.model_dump(exclude={"csrf_token", "generation_fields"})

    def fields(self, table: RouteTable) -> CharacterFields:
        style = table.normalize_style(self.art_style, field="art_style") if self.art_style else None
        # An empty checkpoint field means the style's own checkpoint.
        model = self.model.strip() or (table.route(style).checkpoint if style else None)
        fields = CharacterFields(
            name=self.name,
            description=self.description,
            appearance=self.appearance,
            art_style=style,
            model=model,
        )
        if self.generation_fields:
            fields.negative_prompt = self.negative_prompt.strip()
            fields.identity_strength = parse_strength(self.identity_strength)
            fields.loras = parse_loras(self.loras)
            fields.seed = parse_seed(self.seed)
            fields.clear_seed = fields.seed is None
        return fields


FormDep = Annotated[CharacterForm, Form()]


@router.post("/characters/new")
def create(request: Request, form: FormDep) -> Response:
    check_csrf(request, form.csrf_token)
    c = container_of(request)
    user = require_user(request, c)
    try:
        with c.db.session() as session:
            new_id = characters.create(
                session, user, form.fields(c.table), c.table, checkpoints=checkpoints_of(c)
            ).id
    except InvalidInput as exc:
        return _form(request, user, None, form.values(), exc, 422)
    return RedirectResponse(f"/characters/{new_id}", status_code=303)


@router.get("/characters/{character_id}", response_class=HTMLResponse)
def detail(request: Request, character_id: str) -> Response:
    c = container_of(request)
    return character_page(request, require_user(request, c), character_id)


UPLOAD_LIMITS = (
    f"PNG, JPEG or WebP, up to {intake.MAX_BYTES // (1024 * 1024)} MB, "
    f"{intake.MAX_SIDE} pixels a side and {intake.MAX_PIXELS // 1_000_000} megapixels."
)


def character_page(
    request: Request,
    user: User,
    character_id: str,
    reference_error: CharforgeError | None = None,
    status: int = 200,
) -> Response:
    """One character: its look, its reference images (with the upload form and its error,
    if any) and its latest images."""
    c = container_of(request)
    with c.db.session() as session:
        character = characters.get(session, user, character_id)
        recent = list(image_rows.images_page(session, user.id, character_id, 8, None))
        references = list(refs.references_of(session, user.id, character_id))
    return page(
        request,
        "character.html",
        user,
        status,
        c=character,
        indicator=indicator(character, c),
        recent=recent,
        stored_style=character.primary_style,
        references=references,
        max_references=MAX_REFERENCES,
        upload_limits=UPLOAD_LIMITS,
        reference_error=_reference_error(reference_error, character) if reference_error else None,
        strength=_strength_of(character),
        loras=lora_lines(character),
    )


def _reference_error(exc: CharforgeError, character: Character) -> dict[str, str | None]:
    if exc.extra.get("referenceId"):
        return {
            "message": f"This picture is already one of {character.name}'s reference images.",
            "hint": "Choose another picture to add a second one.",
            "field": exc.field,
        }
    if exc.extra.get("limit") == MAX_REFERENCES:
        return {
            "message": f"{character.name} already has {MAX_REFERENCES} reference images, the "
            "most a character can have.",
            "hint": "Delete one of them to add another.",
            "field": exc.field,
        }
    return page_error(exc)


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
            characters.update(
                session,
                user,
                character_id,
                form.fields(c.table),
                c.table,
                checkpoints=checkpoints_of(c),
            )
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
        count = len(image_rows.image_paths_of_character(session, user.id, character_id))
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
