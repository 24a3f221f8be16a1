"""What the Generate page's template picker, presets and advanced lists are drawn from.

The lists start as the built-in A1111 names (so the page works before, or without, its script
asking the character's backends: static/generate-settings.js replaces them); a value that came
with the link ("Use these settings again") is always offered, even when the list lacks it.
"""

from __future__ import annotations

import json
from typing import Any

from sqlalchemy.orm import Session

from charforge.db.models import User
from charforge.domain.templates import CHARACTER_SLOTS
from charforge.services import presets, templates
from charforge.services.generation_options import BUILT_IN


def template_choices(session: Session, user: User) -> list[dict[str, Any]]:
    return [
        {
            "id": t.id,
            "name": t.name,
            "builtin": t.builtin,
            "prompt": t.prompt,
            "negative": t.negative_prompt,
            "params": json.dumps(t.params),
            # The slots the page asks for: {character} and {appearance} come from the character.
            "slots": " ".join(s for s in t.slots if s not in CHARACTER_SLOTS),
        }
        for t in templates.list_for(session, user)
    ]


def preset_choices(session: Session, user: User) -> list[dict[str, Any]]:
    return [
        {"id": p.id, "name": p.name, "params": json.dumps(p.params or {})}
        for p in presets.list_for(session, user)
    ]


def name_choices(values: dict[str, Any]) -> dict[str, list[str]]:
    def offered(names: list[str], current: Any) -> list[str]:
        chosen = str(current or "")
        if chosen and chosen.lower() not in (n.lower() for n in names):
            return [chosen, *names]
        return list(names)

    return {
        "samplers": offered(BUILT_IN.samplers, values.get("sampler")),
        "schedulers": offered(BUILT_IN.schedulers, values.get("scheduler")),
        "upscalers": offered(BUILT_IN.upscalers, values.get("hiresUpscaler")),
    }
