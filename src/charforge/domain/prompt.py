"""Carry the character's look into every prompt, so the user's scene shows *this* character."""

from __future__ import annotations

from charforge.domain.params import SFW_NEGATIVE


def compose_prompt(user_prompt: str, appearance: str | None) -> str:
    """User's scene first (it weighs most), then the character's recurring traits."""
    look = (appearance or "").strip().strip(",").strip()
    if not look or look.lower() in user_prompt.lower():
        return user_prompt
    return f"{user_prompt}, {look}"


def compose_negative(negative: str, *, nsfw: bool) -> str:
    if nsfw:
        return negative
    if all(term in negative.lower() for term in ("nsfw", "nude", "explicit")):
        return negative
    return f"{negative}, {SFW_NEGATIVE}" if negative else SFW_NEGATIVE
