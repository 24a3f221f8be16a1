"""Characters: create, read, change and delete, always within one owner's roster.

A checkpoint of the character's own is checked against the backends of its route when given
``checkpoints`` (see services/checkpoint_check.py: refused only where a backend answers and
none of those that answer has it; accepted as before when none answers).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from sqlalchemy.orm import Session

from charforge.db import images as image_rows
from charforge.db import repositories as repo
from charforge.db.models import Character, User
from charforge.db.references import reference_paths_of_character
from charforge.domain.checkpoints import same_checkpoint
from charforge.domain.consistency import StoredLook
from charforge.domain.routes import RouteTable
from charforge.errors import InvalidInput, NotFound
from charforge.safety import policy_of
from charforge.services.checkpoint_check import BackendCheckpoints, is_own, scope_of

NAME_MAX, DESCRIPTION_MAX, APPEARANCE_MAX, MODEL_MAX = 100, 5000, 2000, 255
NEGATIVE_MAX = 2000
MODEL_FIELD = "imageGeneration.model"
MAX_LORAS = 8
DEFAULT_IDENTITY_STRENGTH = 0.6


@dataclass
class CharacterFields:
    """Already parsed input; ``None`` in an update means "leave as is" unless listed in clear."""

    name: str | None = None
    description: str | None = None
    appearance: str | None = None
    art_style: str | None = None
    model: str | None = None
    model_hash: str | None = None
    clear_model_hash: bool = False
    negative_prompt: str | None = None
    identity_strength: float | None = None
    loras: list[tuple[str, float]] | None = None  # replaces the list; [] clears it
    seed: int | None = None
    clear_seed: bool = False


def _lora_json(loras: list[tuple[str, float]]) -> list[dict[str, object]]:
    return [{"name": name, "weight": weight} for name, weight in loras]


def lora_suffix(character: Character) -> str:
    """The character's LoRAs as prompt tags (A1111 reads them; ComfyUI gets LoraLoader nodes)."""
    return ", ".join(f"<lora:{x['name']}:{x['weight']:g}>" for x in character.loras or [])


def look_of(character: Character) -> StoredLook:
    """What the consistency rules need to know of a stored character."""
    return StoredLook(
        name=character.name,
        primary_style=character.primary_style,
        model=character.model,
        model_hash=character.model_hash,
    )


def _checked(fields: CharacterFields, table: RouteTable) -> CharacterFields:
    if fields.name is not None:
        fields.name = fields.name.strip()
        if not 1 <= len(fields.name) <= NAME_MAX:
            raise InvalidInput(
                f"A character name needs 1 to {NAME_MAX} characters.",
                field="name",
                hint="Give the character a name such as 'Sakura'.",
            )
    for attr, limit in (
        ("description", DESCRIPTION_MAX),
        ("appearance", APPEARANCE_MAX),
        ("negative_prompt", NEGATIVE_MAX),
    ):
        value = getattr(fields, attr)
        if value is not None and len(value) > limit:
            raise InvalidInput(
                f"{attr.capitalize()} is {len(value)} characters long; the limit is {limit}.",
                field=attr,
            )
    if fields.art_style is not None:
        fields.art_style = table.normalize_style(fields.art_style, field="artStyle.primaryStyle")
    if fields.model is not None:
        fields.model = fields.model.strip()
        if not 1 <= len(fields.model) <= MODEL_MAX:
            raise InvalidInput(
                f"A checkpoint name needs 1 to {MODEL_MAX} characters.",
                field=MODEL_FIELD,
            )
    return fields


def _screened(session: Session, fields: CharacterFields) -> None:
    # The negative prompt lists what must not appear, so it is not restricted.
    policy_of(session).check_all(
        {"name": fields.name, "appearance": fields.appearance, "description": fields.description}
    )


def _require_checkpoint(
    checkpoints: BackendCheckpoints | None, model: str, style: str | None, table: RouteTable
) -> None:
    if checkpoints is not None and is_own(table, model, style):
        checkpoints.require(model, style, field=MODEL_FIELD)


def create(
    session: Session,
    owner: User,
    fields: CharacterFields,
    table: RouteTable,
    *,
    checkpoints: BackendCheckpoints | None = None,
) -> Character:
    """``checkpoints``: check an own checkpoint against the route's backends (None: not)."""
    fields = _checked(fields, table)
    _screened(session, fields)
    if fields.name is None:
        raise InvalidInput("A character needs a name.", field="name")
    if fields.model is not None:
        _require_checkpoint(checkpoints, fields.model, fields.art_style, table)
    model = fields.model
    if model is None and fields.art_style is not None:
        model = table.route(fields.art_style).checkpoint  # the checkpoint of its style's route
    character = Character(
        owner_id=owner.id,
        name=fields.name,
        description=fields.description or "",
        appearance=fields.appearance or "",
        primary_style=fields.art_style,
        model=model,
        model_hash=fields.model_hash,
        negative_prompt=fields.negative_prompt or "",
        identity_strength=DEFAULT_IDENTITY_STRENGTH
        if fields.identity_strength is None
        else fields.identity_strength,
        loras=_lora_json(fields.loras or []),
        seed=fields.seed,
    )
    session.add(character)
    session.flush()
    return character


def get(session: Session, owner: User, character_id: str) -> Character:
    character = repo.character(session, owner.id, character_id)
    if character is None:
        raise NotFound(
            f"No character with id '{character_id}' in your roster.",
            field="characterId",
            hint="List yours with GET /api/characters.",
        )
    return character


def find(session: Session, owner: User, name_or_id: str) -> Character:
    """By id, else by exact name (the CLI's --character NAME_OR_ID)."""
    character = repo.character(session, owner.id, name_or_id)
    if character is not None:
        return character
    named = repo.characters_named(session, owner.id, name_or_id)
    if len(named) == 1:
        return named[0]
    if len(named) > 1:
        ids = ", ".join(c.id for c in named)
        raise InvalidInput(
            f"{len(named)} characters are named '{name_or_id}'; pick one by id: {ids}.",
            field="character",
        )
    raise NotFound(f"No character named or with id '{name_or_id}' for user '{owner.name}'.")


def list_for(session: Session, owner: User) -> Sequence[Character]:
    return repo.characters_of(session, owner.id)


def update(
    session: Session,
    owner: User,
    character_id: str,
    fields: CharacterFields,
    table: RouteTable,
    *,
    checkpoints: BackendCheckpoints | None = None,
) -> Character:
    """``checkpoints`` as in ``create``; asked only when the checkpoint or its backends
    change (a form that sends the stored checkpoint again costs no request)."""
    character = get(session, owner, character_id)
    fields = _checked(fields, table)
    _screened(session, fields)
    if fields.model is not None:
        style = fields.art_style or character.primary_style
        unchanged = (
            character.model is not None
            and same_checkpoint(fields.model, character.model)
            and scope_of(table, style).backends == scope_of(table, character.primary_style).backends
        )
        if not unchanged:
            _require_checkpoint(checkpoints, fields.model, style, table)
    for attr in ("name", "description", "appearance", "negative_prompt", "identity_strength"):
        value = getattr(fields, attr)
        if value is not None:
            setattr(character, attr, value)
    style_changed = fields.art_style is not None and fields.art_style != character.primary_style
    if fields.art_style is not None:
        character.primary_style = fields.art_style
    if fields.model is not None:
        if fields.model != character.model:
            character.model_hash = None  # another file: the old hash means nothing for it
        character.model = fields.model
    elif style_changed:
        # An explicit change of style by the owner moves the character to that style's model.
        character.model = table.route(fields.art_style or "").checkpoint
        character.model_hash = None
    if fields.model_hash is not None:
        character.model_hash = fields.model_hash
    if fields.clear_model_hash:
        character.model_hash = None
    if fields.loras is not None:
        character.loras = _lora_json(fields.loras)
    if fields.seed is not None:
        character.seed = fields.seed
    if fields.clear_seed:
        character.seed = None
    session.flush()
    return character


def delete(session: Session, owner: User, character_id: str) -> list[str]:
    """Deletes the character with its jobs, images and references; returns the files to remove."""
    character = get(session, owner, character_id)
    paths = image_rows.image_paths_of_character(session, owner.id, character.id)
    paths += reference_paths_of_character(session, owner.id, character.id)
    session.delete(character)
    session.flush()
    return paths
