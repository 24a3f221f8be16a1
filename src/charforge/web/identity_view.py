"""How pages word identity for creators: the same-person badge, whether the reference
pictures were used, style transfer, and errors without API names in them.

The wording here is mirrored by ``static/generate.js`` (the Generate page builds its result
in the browser); change both together.
"""

from __future__ import annotations

import re
from typing import Any

from charforge.domain.routes import RouteTable
from charforge.errors import CharforgeError

SAME_PERSON = 0.5  # the scorer's own threshold: 0.5 and above is the same person

# API wording in messages the services write, and what a creator reads instead.
_PLAIN = (
    (
        re.compile(r"no backend of the (\S+) style can condition on reference images: (.*)"),
        r"the \1 style's backends cannot use reference images: \2",
    ),
    (re.compile(r"identity\.strength ?= ?0"), "reference strength 0"),
    (re.compile(r"identity\.strength is 0"), "the reference strength was 0"),
    (re.compile(r"identity\.minScore"), "the same-person retry"),
    (re.compile(r"identity\.strength"), "reference strength"),
)
_API_HINT = re.compile(r"\b(GET|POST|PUT|PATCH|DELETE) /api/|/api/|\b[a-z]+[A-Z]\w*=")


def plain(text: str | None) -> str:
    """A service's message with the API's names put in words."""
    out = text or ""
    for pattern, words in _PLAIN:
        out = pattern.sub(words, out)
    return out


def sentence(text: str | None) -> str:
    out = plain(text).strip()
    if not out:
        return ""
    out = out[0].upper() + out[1:]
    return out if out.endswith((".", "!", "?")) else out + "."


def page_error(exc: CharforgeError, hint: str | None = None) -> dict[str, str | None]:
    """What a form shows: the message, and a hint that names no API route or field (the
    page's own ``hint`` replaces one that does)."""
    own = exc.hint
    if own and _API_HINT.search(own):
        own = None
    own = sentence(own)
    if own.startswith("Send "):  # the API's "send a PNG ..." is the page's "choose a PNG ..."
        own = "Choose " + own[len("Send ") :]
    return {"message": sentence(exc.message), "hint": hint or own or None, "field": exc.field}


def score_badge(consistency: dict[str, Any] | None) -> dict[str, str] | None:
    """``{label, tone, title}``: tone ok (same person), warn (different) or none (not
    scored); None when the image was not scored at all (no reference pictures then)."""
    if not consistency:
        return None
    score = consistency.get("score")
    if isinstance(score, int | float):
        same = score >= SAME_PERSON
        return {
            "label": f"{'Same person' if same else 'Different'} {score:.2f}",
            "tone": "ok" if same else "warn",
            "title": (
                f"Face similarity to the reference images: {score:.2f}; "
                f"{SAME_PERSON} or more means the same person"
            ),
        }
    reason = str(consistency.get("reason") or "")
    no_face = "no face" in reason.lower()
    return {
        "label": "No face found" if no_face else "Not scored",
        "tone": "none",
        "title": sentence(reason) or "The image could not be compared with the reference images.",
    }


def identity_text(identity: dict[str, Any] | None) -> str | None:
    """Whether the reference pictures steered the image, in one line."""
    if not identity:
        return None
    if identity.get("applied"):
        strength = identity.get("strength")
        method = identity.get("method")
        text = "Used"
        if isinstance(strength, int | float):
            text += f", strength {strength:g}"
        return text + (f" ({method})" if method else "")
    reason = plain(str(identity.get("reason") or "")).strip()
    return f"Not used: {reason}" if reason else "Not used"


def tries_text(plan: dict[str, Any] | None, consistency: dict[str, Any] | None) -> str | None:
    """How many tries a same-person retry took; None when there was no retry."""
    if not plan or plan.get("minScore") is None:
        return None
    tries = plan.get("tries") or []
    count = max((t.get("try", 1) for t in tries if isinstance(t, dict)), default=1)
    word = "try" if count == 1 else "tries"
    if consistency and consistency.get("reachedMinScore"):
        return f"Same person after {count} {word}"
    return f"Best of {count} {word} kept (none reached {SAME_PERSON})"


def style_label(style: str, table: RouteTable) -> str:
    route = table.routes.get(style)
    return f"{route.emoji} {route.label}" if route else style


def transfer_text(transfer: dict[str, Any] | None, table: RouteTable) -> str | None:
    """``🟠 Anime → 🔵 Realistic`` for a style-transfer image."""
    if not transfer or not transfer.get("to"):
        return None
    source = style_label(str(transfer.get("from") or "?"), table)
    return f"{source} → {style_label(str(transfer['to']), table)}"
