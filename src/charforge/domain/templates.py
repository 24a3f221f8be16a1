"""Prompt templates: text with named slots, and the built-in ones everybody may use.

A slot is ``{name}`` with a name of lower-case letters, digits and ``_`` (starting with a
letter, at most 32). ``{character}`` and ``{appearance}`` are filled from the character; every
other slot from the request's ``variables``. ``{{`` and ``}}`` stand for literal braces; any
other brace is refused when the template is saved, so a typo such as ``{Outfit}`` or
``{outfit`` never reaches a backend as text.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from charforge.errors import InvalidInput

SLOT_NAME = re.compile(r"[a-z][a-z0-9_]{0,31}")
# Filled from the character, never from variables.
CHARACTER_SLOTS = ("character", "appearance")
BUILTIN_PREFIX = "builtin-"
_SLOT_RULE = (
    "A slot is {name}: lower-case letters, digits and _, starting with a letter, at most 32 "
    "characters, such as {outfit}; write {{ and }} for literal braces."
)


@dataclass(frozen=True)
class Piece:
    """Literal text, or a slot (``slot`` set, ``text`` empty)."""

    text: str = ""
    slot: str | None = None


def parse(text: str, *, field: str = "prompt") -> list[Piece]:
    """The pieces of a template; InvalidInput naming ``field`` for a brace that is not part
    of a slot or of ``{{``/``}}``."""
    pieces: list[Piece] = []
    literal: list[str] = []
    i = 0
    while i < len(text):
        ch = text[i]
        if ch in "{}" and text.startswith(ch * 2, i):
            literal.append(ch)
            i += 2
            continue
        if ch == "}":
            raise _stray(text, i, field, "closes no slot")
        if ch == "{":
            end = text.find("}", i + 1)
            inner = text[i + 1 : end] if end > 0 else ""
            if end < 0 or "{" in inner:
                raise _stray(text, i, field, "opens no slot")
            if not SLOT_NAME.fullmatch(inner):
                raise InvalidInput(
                    f"'{{{inner}}}' at character {i + 1} of the {field} is not a slot name.",
                    field=field,
                    hint=_SLOT_RULE,
                )
            if literal:
                pieces.append(Piece("".join(literal)))
                literal = []
            pieces.append(Piece(slot=inner))
            i = end + 1
            continue
        literal.append(ch)
        i += 1
    if literal:
        pieces.append(Piece("".join(literal)))
    return pieces


def _stray(text: str, index: int, field: str, what: str) -> InvalidInput:
    near = text[max(0, index - 10) : index + 11].replace("\n", " ")
    return InvalidInput(
        f"The {field} has a '{text[index]}' at character {index + 1} that {what} (near '{near}').",
        field=field,
        hint=_SLOT_RULE,
    )


def slots_of(pieces: list[Piece]) -> list[str]:
    """Every slot name, once, in the order they first appear."""
    return list(dict.fromkeys(p.slot for p in pieces if p.slot))


def render(pieces: list[Piece], values: dict[str, str]) -> str:
    """The text with every slot replaced (values are inserted as they are, never parsed);
    commas left empty by a blank value are tidied away."""
    text = "".join(p.text if p.slot is None else values.get(p.slot, "") for p in pieces)
    text = re.sub(r"\s*,(\s*,)+", ",", text)
    return re.sub(r"[ \t]{2,}", " ", text).strip().strip(",").strip()


@dataclass(frozen=True)
class TemplateView:
    """A template as answered: a built-in one or a user's own."""

    id: str
    name: str
    prompt: str
    negative_prompt: str
    params: dict[str, Any]  # camelCase generation settings, as the generate body takes them
    builtin: bool
    created_at: datetime
    updated_at: datetime
    slots: list[str] = field(default_factory=list)


_BUILTIN_TIME = datetime(2025, 1, 1)


def _builtin(
    key: str, name: str, prompt: str, negative: str, params: dict[str, Any]
) -> TemplateView:
    return TemplateView(
        id=BUILTIN_PREFIX + key,
        name=name,
        prompt=prompt,
        negative_prompt=negative,
        params=params,
        builtin=True,
        created_at=_BUILTIN_TIME,
        updated_at=_BUILTIN_TIME,
        slots=slots_of(parse(prompt)),
    )


# The original's three usage examples (shared/seed/character-consistency.md), as templates.
BUILTINS: tuple[TemplateView, ...] = (
    _builtin(
        "outfit-change",
        "Outfit change",
        "{character} wearing {outfit}, elegant pose, detailed clothing, full body",
        "deformed clothing, extra limbs",
        {},
    ),
    _builtin(
        "new-environment",
        "New environment",
        "{character} standing {place}, {lighting}, dramatic landscape, detailed background",
        "blurry background",
        {"width": 768, "height": 512},
    ),
    _builtin(
        "action-scene",
        "Action scene",
        "{character} {action}, {background} background, dynamic action pose",
        "static pose, blurry face",
        {"steps": 30},
    ),
)
BUILTIN_BY_ID = {t.id: t for t in BUILTINS}
