"""Per-user permissions: NSFW, allow-lists of styles and checkpoints, quota overrides.

Stored as JSON on the user (camelCase keys, as the admin API sends them). A key that is
absent means the default (no NSFW; every style and checkpoint; the global quotas); ``null``
means unrestricted. Administrators may use every style, checkpoint and NSFW.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sqlalchemy.orm import Session

from charforge.db.models import User
from charforge.domain.checkpoints import same_checkpoint
from charforge.errors import Forbidden, InvalidInput
from charforge.services import audit

KEYS = ("nsfw", "styles", "checkpoints", "imagesPerDay", "maxActiveJobs")
_ASK = "Ask an administrator to grant it (PATCH /api/admin/users/NAME or `charforge users set`)."
_MAX_LIST = 100
_MAX_NAME = 255


@dataclass(frozen=True)
class Permissions:
    nsfw: bool
    styles: tuple[str, ...] | None  # None: every style
    checkpoints: tuple[str, ...] | None  # None: every checkpoint
    images_per_day: int | None
    max_active_jobs: int | None
    # Which quota keys the user overrides (an override of None means no limit).
    overrides: frozenset[str]


def of(user: User) -> Permissions:
    raw = dict(user.permissions or {})
    admin = bool(user.is_admin)
    styles = raw.get("styles")
    checkpoints = raw.get("checkpoints")
    return Permissions(
        nsfw=admin or bool(raw.get("nsfw", False)),
        styles=None if admin or styles is None else tuple(styles),
        checkpoints=None if admin or checkpoints is None else tuple(checkpoints),
        images_per_day=raw.get("imagesPerDay"),
        max_active_jobs=raw.get("maxActiveJobs"),
        overrides=frozenset(k for k in ("imagesPerDay", "maxActiveJobs") if k in raw),
    )


def view(user: User) -> dict[str, Any]:
    """What is stored, every key shown (absent ones with their default)."""
    raw = dict(user.permissions or {})
    return {
        "nsfw": bool(raw.get("nsfw", False)),
        "styles": raw.get("styles"),
        "checkpoints": raw.get("checkpoints"),
        "imagesPerDay": raw.get("imagesPerDay"),
        "maxActiveJobs": raw.get("maxActiveJobs"),
    }


def validate_patch(patch: Any) -> dict[str, Any]:
    """A clean patch, or a 422 naming the key: unknown keys and wrong types are refused."""
    if not isinstance(patch, dict):
        raise InvalidInput("permissions must be an object.", field="permissions")
    clean: dict[str, Any] = {}
    for key, value in patch.items():
        field = f"permissions.{key}"
        if key not in KEYS:
            raise InvalidInput(
                f"Unknown permission '{str(key)[:64]}'.",
                field=field,
                hint=f"Use one of: {', '.join(KEYS)}.",
            )
        if key == "nsfw":
            if not isinstance(value, bool):
                raise InvalidInput("nsfw must be true or false.", field=field)
            clean[key] = value
        elif key in ("styles", "checkpoints"):
            clean[key] = _names(value, field, lower=key == "styles")
        else:
            if value is not None and (
                not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= 10**6
            ):
                raise InvalidInput(
                    f"{key} must be a whole number from 0 to 1000000, or null for no limit.",
                    field=field,
                )
            clean[key] = value
    return clean


def _names(value: Any, field: str, *, lower: bool) -> list[str] | None:
    if value is None:
        return None
    if not isinstance(value, list) or len(value) > _MAX_LIST:
        raise InvalidInput(
            f"{field} must be a list of at most {_MAX_LIST} names, or null for all.", field=field
        )
    names: list[str] = []
    for item in value:
        if not isinstance(item, str) or not item.strip() or len(item) > _MAX_NAME:
            raise InvalidInput(
                f"Each entry of {field} must be a name of 1 to {_MAX_NAME} characters.",
                field=field,
            )
        name = item.strip().lower() if lower else item.strip()
        if name not in names:
            names.append(name)
    return names


def apply_patch(user: User, patch: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Merge a validated patch into the user's permissions; returns (before, after) views."""
    before = view(user)
    merged = {**(user.permissions or {}), **patch}
    user.permissions = merged  # a new dict: SQLAlchemy sees the change
    return before, view(user)


def check_nsfw(user: User, nsfw: bool) -> None:
    if nsfw and not of(user).nsfw:
        raise Forbidden("Your account may not request NSFW images.", field="nsfw", hint=_ASK)


def check_style(user: User, style: str, *, field: str = "artStyle") -> None:
    allowed = of(user).styles
    if allowed is not None and style.lower() not in allowed:
        raise Forbidden(
            f"Your account may not use the '{style}' style"
            + (f" (allowed: {', '.join(allowed)})." if allowed else " (no style is allowed)."),
            field=field,
            hint=_ASK,
        )


def check_checkpoint(user: User, checkpoint: str) -> None:
    allowed = of(user).checkpoints
    if allowed is not None and not any(same_checkpoint(checkpoint, a) for a in allowed):
        raise Forbidden(
            f"Your account may not use the checkpoint '{checkpoint}'.", field="model", hint=_ASK
        )


def update(session: Session, actor: str, target: User, patch: Any) -> dict[str, Any]:
    """Validate and apply a patch for ``actor`` (an admin's name, or "cli"), audited with the
    values before and after. Returns the new view."""
    clean = validate_patch(patch)
    before, after = apply_patch(target, clean)
    audit.record(session, actor, "permissions.update", f"user:{target.name}", before, after)
    return after
