"""SillyTavern character cards: a card becomes a character (its picture the first reference),
and a character becomes a card again without losing any of the card's fields."""

from __future__ import annotations

import io
from typing import Any

from PIL import Image as PILImage
from sqlalchemy.orm import Session

from charforge.db import images as image_rows
from charforge.db import references as refs
from charforge.db.models import Character, User
from charforge.domain.routes import FALLBACK_STYLE, RouteTable
from charforge.errors import InvalidInput
from charforge.identity.cards import CardError, ParsedCard, export_card, parse_card
from charforge.services import characters, references
from charforge.services.characters import DESCRIPTION_MAX, CharacterFields
from charforge.services.checkpoint_check import BackendCheckpoints
from charforge.storage.files import ImageStore

CARD_MAX_BYTES = 12 * 1024 * 1024


def _fields_of(card: ParsedCard, style: str | None, model: str | None) -> CharacterFields:
    own = card.charforge
    loras = own.get("loras")
    return CharacterFields(
        name=card.name.strip()[: characters.NAME_MAX],
        # A longer card description stays whole in the card; the export writes it back.
        description=card.description[:DESCRIPTION_MAX],
        appearance=card.positive[: characters.APPEARANCE_MAX],
        negative_prompt=card.negative[: characters.NEGATIVE_MAX],
        art_style=style or _str(own.get("artStyle")) or FALLBACK_STYLE,
        model=model or _str(own.get("model")),
        model_hash=_str(own.get("modelHash")),
        identity_strength=_strength(own.get("identityStrength")),
        loras=[
            (str(x["name"]), float(x.get("weight", 1.0)))
            for x in loras
            if isinstance(x, dict) and isinstance(x.get("name"), str)
        ][: characters.MAX_LORAS]
        if isinstance(loras, list)
        else None,
        seed=own.get("seed") if isinstance(own.get("seed"), int) else None,
    )


def _str(value: Any) -> str | None:
    return value if isinstance(value, str) and value else None


def _strength(value: Any) -> float | None:
    return float(value) if isinstance(value, int | float) and 0 <= value <= 1 else None


def import_card(
    session: Session,
    store: ImageStore,
    owner: User,
    data: bytes,
    table: RouteTable,
    *,
    style: str | None = None,
    model: str | None = None,
    checkpoints: BackendCheckpoints | None = None,
) -> Character:
    """The new character (its picture saved as a reference: wrap the transaction in
    ``store.undo_on_failure()``)."""
    if len(data) > CARD_MAX_BYTES:
        raise InvalidInput(
            f"The card is {len(data) / 1e6:.1f} MB; the limit is {CARD_MAX_BYTES // 2**20} MB.",
            field="file",
            extra={"limit": CARD_MAX_BYTES},
        )
    try:
        card = parse_card(data)
    except CardError as exc:
        raise InvalidInput(
            str(exc),
            field="file",
            hint="Send a SillyTavern card: a PNG with a 'chara' or 'ccv3' chunk, or its JSON.",
        ) from exc
    character = characters.create(
        session, owner, _fields_of(card, style, model), table, checkpoints=checkpoints
    )
    character.card = card.card
    session.flush()
    if card.picture is not None:
        references.add(
            session, store, owner, character.id, card.picture, source="card", field="file"
        )
    return character


def export(session: Session, store: ImageStore, owner: User, character_id: str) -> bytes:
    character = characters.get(session, owner, character_id)
    picture = _picture(session, store, character)
    card = character.card or {}
    description = character.description
    original = _card_description(card)
    if original is not None and original[:DESCRIPTION_MAX] == description:
        description = original  # the part beyond charforge's limit was kept in the card
    own = {
        "version": 1,
        "artStyle": character.primary_style,
        "model": character.model,
        "modelHash": character.model_hash,
        "identityStrength": character.identity_strength,
        "loras": character.loras or [],
        "seed": character.seed,
    }
    try:
        return export_card(
            card,
            picture_png=picture,
            charforge={k: v for k, v in own.items() if v is not None},
            name=character.name,
            description=description,
            positive=character.appearance,
            negative=character.negative_prompt or "",
        )
    except CardError as exc:
        raise InvalidInput(str(exc), field="name") from exc


def _card_description(card: dict[str, Any]) -> str | None:
    data = card.get("data")
    value = data.get("description") if isinstance(data, dict) else None
    return value if isinstance(value, str) else None


def _picture(session: Session, store: ImageStore, character: Character) -> bytes:
    """The first reference, else the newest image, else a plain canvas (a card needs one)."""
    rows = refs.references_of(session, character.owner_id, character.id)
    if rows:
        return store.existing(rows[0].file_path).read_bytes()
    newest = image_rows.images_page(session, character.owner_id, character.id, 1, None)
    if newest:
        return store.existing(newest[0].file_path).read_bytes()
    out = io.BytesIO()
    PILImage.new("RGB", (512, 768), (40, 44, 52)).save(out, format="PNG")
    return out.getvalue()
