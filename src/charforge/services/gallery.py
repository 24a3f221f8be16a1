"""The gallery: search and filters over the owner's images, favourites and notes, bulk
deletion, and replaying an image (a new job with exactly its parameters and seed)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from typing import Any

from pydantic import ValidationError
from sqlalchemy.orm import Session

from charforge.db import images as image_rows
from charforge.db import repositories as repo
from charforge.db.images import Filters
from charforge.db.models import Image, User
from charforge.domain.params import JobBody
from charforge.domain.routes import RouteTable
from charforge.errors import InvalidInput, NotFound
from charforge.services import characters, cursors
from charforge.services.images import get

NOTE_MAX = 2000
Q_MAX = 200
BULK_MAX = 200


def filters_of(
    table: RouteTable,
    *,
    character_id: str | None = None,
    q: str | None = None,
    favorite: bool | None = None,
    style: str | None = None,
    model: str | None = None,
    since: str | None = None,
    until: str | None = None,
    min_score: float | None = None,
) -> Filters:
    """The filters as the client wrote them, checked: a bad value is a 422 naming it."""
    q = (q or "").strip() or None
    if q is not None and len(q) > Q_MAX:
        raise InvalidInput(f"'q' is at most {Q_MAX} characters.", field="q")
    start = parse_when(since, "from", end=False)
    end = parse_when(until, "to", end=True)
    if start is not None and end is not None and end <= start:
        raise InvalidInput(
            f"'to' ({until}) is before 'from' ({since}).",
            field="to",
            hint="Swap the two dates, or leave one out.",
        )
    if min_score is not None and not 0.0 <= min_score <= 1.0:
        raise InvalidInput("'minScore' is a consistency score between 0 and 1.", field="minScore")
    return Filters(
        character_id=character_id or None,
        q=q,
        favorite=favorite,
        style=table.normalize_style(style, field="style") if style and style.strip() else None,
        model=(model or "").strip() or None,
        since=start,
        until=end,
        min_score=min_score,
    )


def parse_when(value: str | None, field: str, *, end: bool) -> datetime | None:
    """An ISO date (a whole day: ``to`` includes it) or date and time (UTC unless it says
    otherwise), as the naive UTC the database holds; ``end``: the exclusive upper bound."""
    text = (value or "").strip()
    if not text:
        return None
    try:
        if len(text) == 10:
            day = datetime.combine(date.fromisoformat(text), datetime.min.time())
            return day + timedelta(days=1) if end else day
        when = datetime.fromisoformat(text)
    except ValueError:
        raise InvalidInput(
            f"'{field}' must be a date such as 2024-05-31 or a date and time such as "
            f"2024-05-31T18:30:00Z (got '{value}').",
            field=field,
            hint="Use the ISO 8601 form: YYYY-MM-DD, optionally with THH:MM[:SS] and a zone.",
        ) from None
    if when.tzinfo is not None:
        when = when.astimezone(UTC).replace(tzinfo=None)
    return when + timedelta(microseconds=1) if end else when


def search(
    session: Session, owner: User, filters: Filters, *, limit: int, cursor: str | None
) -> tuple[Sequence[Image], str | None]:
    """One page of the owner's images, newest first, and the next page's cursor."""
    if filters.character_id is not None:
        characters.get(session, owner, filters.character_id)  # 404 when not yours
    after = cursors.decode(cursor) if cursor else None
    rows = image_rows.gallery_page(session, owner.id, filters, limit + 1, after)
    last = rows[limit - 1] if len(rows) > limit else None
    return rows[:limit], cursors.encode(last.created_at, last.id) if last else None


@dataclass(frozen=True)
class Marks:
    """A change to an image's own marks; ``note_given`` tells a cleared note from none sent."""

    favorite: bool | None = None
    note: str | None = None
    note_given: bool = False


def mark(session: Session, owner: User, image_id: str, marks: Marks) -> Image:
    image = get(session, owner, image_id)
    if marks.favorite is not None:
        image.favorite = marks.favorite
    if marks.note_given:
        note = (marks.note or "").strip()
        if len(note) > NOTE_MAX:
            raise InvalidInput(f"'note' is at most {NOTE_MAX} characters.", field="note")
        image.note = note or None  # an empty note is no note
    session.flush()
    return image


@dataclass(frozen=True)
class Deleted:
    deleted: list[str]
    not_found: list[str]
    paths: list[str]  # the files to remove once the deletion is committed


def delete_many(session: Session, owner: User, image_ids: Sequence[str]) -> Deleted:
    """Deletes those of the images that are the owner's; the others are reported not found.
    None of them found is a 404, as for one image that is not yours."""
    wanted = list(dict.fromkeys(image_ids))
    if not 1 <= len(wanted) <= BULK_MAX:
        raise InvalidInput(f"'ids' holds 1 to {BULK_MAX} image ids.", field="ids")
    rows = {row.id: row for row in image_rows.images_by_ids(session, owner.id, wanted)}
    not_found = [i for i in wanted if i not in rows]
    if not rows:
        raise NotFound(
            "None of these images is among yours.", field="ids", extra={"notFound": not_found}
        )
    paths = [rows[i].file_path for i in wanted if i in rows]
    for row in rows.values():
        session.delete(row)
    session.flush()
    return Deleted([i for i in wanted if i in rows], not_found, paths)


# Parameters replayed as they ran (sampler and scheduler as the backend spelled them); the
# advanced hires settings are sent only when the generate body takes them.
_AS_RAN = ("width", "height", "steps", "cfg_scale", "sampler", "scheduler", "hires")
_AS_RAN_IF_TAKEN = (
    "hires_scale",
    "hires_steps",
    "hires_upscaler",
    "denoising_strength",
    "clip_skip",
)
# What a replay must not repeat: a template is already expanded into the prompt, the name may
# have changed, and retries would move off the image's seed.
_DROPPED = ("templateId", "variables", "characterName", "count", "seed")


def replay_body(session: Session, owner: User, image_id: str) -> JobBody:
    """The generate body that makes this image again: the prompt as the user wrote it, the
    parameters as they ran, the image's own seed, its style and checkpoint, one image."""
    image = get(session, owner, image_id)
    job = repo.job(session, owner.id, image.job_id)
    asked: dict[str, Any] = dict(job.request or {}) if job is not None else {}
    body = {k: v for k, v in asked.items() if k not in _DROPPED}
    params = image.params
    taken = {f.alias or name for name, f in JobBody.model_fields.items()}
    for name in _AS_RAN + _AS_RAN_IF_TAKEN:
        wire = _camel(name)
        if name in params and (name in _AS_RAN or wire in taken):
            body[wire] = params[name]
    body.update(
        prompt=job.user_prompt if job is not None else image.prompt,
        characterId=image.character_id,
        artStyle=image.art_style,
        model=image.checkpoint,
        seed=image.seed,
        count=1,
        identity=_identity_again(asked.get("identity"), image),
    )
    try:
        return JobBody.model_validate(body)
    except ValidationError as exc:
        first = exc.errors()[0]
        field = ".".join(str(p) for p in first["loc"]) or None
        raise InvalidInput(
            f"This image's settings are no longer accepted: {field}: {first['msg']}.",
            field=field,
            hint="Open it with 'Use these settings again' and adjust what is refused.",
        ) from exc


def _identity_again(asked: Any, image: Image) -> dict[str, Any]:
    """The same conditioning as this image had, once: its strength (0 when it had none, so
    references added since change nothing), without retries towards a score."""
    identity = {
        k: v
        for k, v in (asked or {}).items()
        if k not in ("minScore", "maxTries") and v is not None
    }
    if "strength" not in identity:
        had = image.identity or {}
        identity["strength"] = float(had.get("strength") or 0.0) if had.get("applied") else 0.0
    return identity


def _camel(name: str) -> str:
    head, *rest = name.split("_")
    return head + "".join(part.title() for part in rest)
