"""Decide, when a generation is submitted, how the character's reference images take part:
which ones, at what strength, whether the route can condition on them at all, and the score
threshold to retry below. The plan is stored on the job (``Job.identity``)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from sqlalchemy.orm import Session

from charforge.db import references as refs
from charforge.db.models import Character
from charforge.domain.capabilities import Capability
from charforge.domain.params import IdentityIn
from charforge.domain.routes import Route, RouteTable
from charforge.errors import InvalidInput, NotFound, UnsupportedCapability

DEFAULT_MAX_TRIES = 3
CapabilitiesOf = Callable[[str], frozenset[Capability]]


def plan_identity(
    session: Session,
    character: Character,
    asked: IdentityIn | None,
    route: Route,
    table: RouteTable,
    capabilities: CapabilitiesOf | None = None,
) -> dict[str, Any] | None:
    """None when the character has no references and none were asked for. Else a plan with
    ``references`` (ids, scored against and conditioned on), ``strength`` (0: no
    conditioning), ``required`` (asked for explicitly: refused where it cannot be done),
    ``reason`` (why there is no conditioning), ``minScore``, ``maxTries`` and ``tries``."""
    rows = refs.references_of(session, character.owner_id, character.id)
    asked = asked or IdentityIn()
    if asked.references is not None:
        by_id = {r.id: r for r in rows}
        for index, ref_id in enumerate(asked.references):
            if ref_id not in by_id:
                raise NotFound(
                    f"Character '{character.name}' has no reference image '{ref_id}'.",
                    field=f"identity.references[{index}]",
                    hint=f"List them with GET /api/characters/{character.id}/references.",
                )
        rows = [by_id[ref_id] for ref_id in dict.fromkeys(asked.references)]
    explicit = asked.references is not None or bool(asked.strength)
    if not rows:
        if explicit or asked.min_score is not None:
            raise InvalidInput(
                f"Character '{character.name}' has no reference images to "
                f"{'score against' if asked.min_score is not None else 'condition on'}.",
                field="identity",
                hint=f"Add one with POST /api/characters/{character.id}/references (a clear "
                "picture of its face), or leave identity out.",
            )
        return None
    strength = (
        asked.strength
        if asked.strength is not None
        else float(character.identity_strength if character.identity_strength is not None else 0.6)
    )
    reason = None
    if strength <= 0:
        reason = "identity.strength is 0"
    else:
        able = [
            n
            for n in route.backends
            if Capability.REFERENCE_IMAGE
            in (capabilities(n) if capabilities else table.backends[n].capabilities)
        ]
        if not able:
            names = ", ".join(f"'{n}' ({table.backends[n].label})" for n in route.backends)
            reason = (
                f"no backend of the {route.style} style can condition on reference images: {names}"
            )
            if explicit:
                raise UnsupportedCapability(
                    f"The {route.style} style's backends cannot condition on reference "
                    f"images, which this request asks for: {names}.",
                    field="identity",
                    hint="Install the ControlNet extension (A1111/Forge) or ComfyUI_IPAdapter_plus "
                    "(ComfyUI) on a backend of the route, or send identity.strength=0.",
                    extra={
                        "capability": Capability.REFERENCE_IMAGE.value,
                        "backends": list(route.backends),
                    },
                )
            strength = 0.0
    return {
        "references": [r.id for r in rows],
        "strength": round(strength, 4),
        "required": explicit and strength > 0,
        "reason": reason,
        "minScore": asked.min_score,
        "maxTries": (asked.max_tries or DEFAULT_MAX_TRIES) if asked.min_score is not None else 1,
        "tries": [],
    }
