"""Wire models in the original system's camelCase."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, field_serializer
from pydantic.alias_generators import to_camel

from charforge.db.models import Character, Image, Job, JobAttempt, Reference
from charforge.domain.params import SEED_MAX
from charforge.services.characters import DEFAULT_IDENTITY_STRENGTH, MAX_LORAS, CharacterFields
from charforge.services.gallery import BULK_MAX, NOTE_MAX
from charforge.services.jobs import JobView


class Wire(BaseModel):
    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True)

    @field_serializer("*", when_used="json")
    def _times_in_utc(self, value: Any) -> Any:
        if isinstance(value, datetime):
            return value.isoformat(timespec="milliseconds") + "Z"
        return value


class ArtStyleIn(Wire):
    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="forbid")
    primary_style: str | None = None


class LoraIn(Wire):
    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="forbid")
    # As the backend lists it (A1111's /sdapi/v1/loras name, ComfyUI's file name without
    # extension); the characters that would break a <lora:name:weight> tag are refused.
    name: str = Field(min_length=1, max_length=200, pattern=r"^[^<>:\n]+$")
    weight: float = Field(default=1.0, ge=-5.0, le=5.0)


class ImageGenerationIn(Wire):
    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="forbid")
    model: str | None = None
    model_hash: str | None = Field(default=None, pattern=r"^[0-9a-fA-F]{8,64}$")
    identity_strength: float | None = Field(default=None, ge=0.0, le=1.0)
    loras: list[LoraIn] | None = Field(default=None, max_length=MAX_LORAS)
    seed: int | None = Field(default=None, ge=0, le=SEED_MAX)


class CharacterIn(Wire):
    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="forbid")

    name: str | None = None
    description: str | None = None
    appearance: str | None = None
    # The original stores {"primaryStyle": ...}; a bare string is accepted too.
    art_style: ArtStyleIn | str | None = None
    negative_prompt: str | None = None
    image_generation: ImageGenerationIn | None = None

    def to_fields(self) -> CharacterFields:
        style = (
            self.art_style.primary_style
            if isinstance(self.art_style, ArtStyleIn)
            else self.art_style
        )
        gen = self.image_generation
        clears_hash = (
            gen is not None and "model_hash" in gen.model_fields_set and gen.model_hash is None
        )
        return CharacterFields(
            name=self.name,
            description=self.description,
            appearance=self.appearance,
            art_style=style or None,
            model=(gen.model or None) if gen else None,
            model_hash=gen.model_hash if gen else None,
            clear_model_hash=clears_hash,
            negative_prompt=self.negative_prompt,
            identity_strength=gen.identity_strength if gen else None,
            loras=[(x.name.strip(), x.weight) for x in gen.loras]
            if gen and gen.loras is not None
            else None,
            seed=gen.seed if gen else None,
            clear_seed=gen is not None and "seed" in gen.model_fields_set and gen.seed is None,
        )


class ArtStyleOut(Wire):
    primary_style: str | None


class LoraOut(Wire):
    name: str
    weight: float


class ImageGenerationOut(Wire):
    model: str | None
    model_hash: str | None
    identity_strength: float
    loras: list[LoraOut]
    seed: int | None


class CharacterOut(Wire):
    id: str
    name: str
    description: str
    appearance: str
    negative_prompt: str
    art_style: ArtStyleOut | None
    image_generation: ImageGenerationOut
    reference_count: int
    imported_card: bool  # made from a SillyTavern card (its other fields are kept)
    created_at: datetime
    updated_at: datetime

    @classmethod
    def of(cls, c: Character, reference_count: int = 0) -> CharacterOut:
        return cls(
            id=c.id,
            name=c.name,
            description=c.description,
            appearance=c.appearance,
            negative_prompt=c.negative_prompt or "",
            art_style=ArtStyleOut(primary_style=c.primary_style) if c.primary_style else None,
            image_generation=ImageGenerationOut(
                model=c.model,
                model_hash=c.model_hash,
                identity_strength=c.identity_strength
                if c.identity_strength is not None
                else DEFAULT_IDENTITY_STRENGTH,
                loras=[LoraOut(name=x["name"], weight=x["weight"]) for x in c.loras or []],
                seed=c.seed,
            ),
            reference_count=reference_count,
            imported_card=c.card is not None,
            created_at=c.created_at,
            updated_at=c.updated_at,
        )


def reference_url(character_id: str, reference_id: str) -> str:
    return f"/api/characters/{character_id}/references/{reference_id}/file"


class ReferenceOut(Wire):
    id: str
    url: str
    width: int
    height: int
    sha256: str
    source: str  # upload | image | card
    image_id: str | None
    created_at: datetime

    @classmethod
    def of(cls, r: Reference) -> ReferenceOut:
        return cls(
            id=r.id,
            url=reference_url(r.character_id, r.id),
            width=r.width,
            height=r.height,
            sha256=r.sha256,
            source=r.source,
            image_id=r.image_id,
            created_at=r.created_at,
        )


class ReferenceList(Wire):
    items: list[ReferenceOut]


def image_url(image_id: str) -> str:
    return f"/api/images/{image_id}/file"


class ImageBrief(Wire):
    id: str
    url: str
    seed: int
    width: int
    height: int
    # {applied, strength, method} or {applied: false, reason}; None: no references then.
    identity: dict[str, Any] | None = None
    # {score (0..1, 0.5 = same person, null when it cannot tell), method, reason?,
    # reachedMinScore?}; None when the character had no reference image.
    consistency: dict[str, Any] | None = None
    style_transfer: dict[str, Any] | None = None
    # The output screening's score, 0..1 (null: made with nsfw on, so not screened).
    nsfw_score: float | None = None


class ImageOut(ImageBrief):
    character_id: str
    job_id: str
    art_style: str
    model: str
    model_hash: str | None
    backend: str
    prompt: str
    negative_prompt: str
    parameters: dict[str, Any]
    infotext: str
    simulated: bool
    # The owner's own marks (the gallery's favourites and a free note).
    favorite: bool = False
    note: str | None = None
    created_at: datetime

    @classmethod
    def of(cls, i: Image) -> ImageOut:
        return cls(
            id=i.id,
            url=image_url(i.id),
            seed=i.seed,
            width=i.width,
            height=i.height,
            identity=i.identity,
            consistency=i.consistency,
            style_transfer=i.style_transfer,
            nsfw_score=i.nsfw_score,
            character_id=i.character_id,
            job_id=i.job_id,
            art_style=i.art_style,
            model=i.checkpoint,
            model_hash=i.checkpoint_hash,
            backend=i.backend,
            prompt=i.prompt,
            negative_prompt=i.negative_prompt,
            parameters=camel_params(i.params),
            infotext=i.infotext,
            simulated=i.simulated,
            favorite=bool(i.favorite),
            note=i.note,
            created_at=i.created_at,
        )


class ImagePage(Wire):
    items: list[ImageOut]
    next_cursor: str | None


class ImagePatch(Wire):
    """``PATCH /api/images/{id}``: only what is sent changes; ``note: null`` clears it."""

    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="forbid")
    favorite: bool | None = None
    note: str | None = Field(default=None, max_length=NOTE_MAX)


class ImagesDeleteIn(Wire):
    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="forbid")
    ids: list[Annotated[str, Field(min_length=1, max_length=64)]] = Field(
        min_length=1, max_length=BULK_MAX
    )


class ImagesDeleteOut(Wire):
    deleted: list[str]
    not_found: list[str]


def camel_params(params: dict[str, Any]) -> dict[str, Any]:
    return {to_camel(key): value for key, value in params.items()}


class JobError(Wire):
    code: str
    message: str
    hint: str | None
    field: str | None


class AttemptOut(Wire):
    number: int
    backend: str
    worker: str
    outcome: str  # running | succeeded | failed | retried | interrupted | cancelled
    error_code: str | None
    error_message: str | None
    started_at: datetime
    finished_at: datetime | None


class JobOut(Wire):
    id: str
    state: str
    character_id: str
    art_style: str
    model: str
    backend: str | None
    attempts: int
    count: int
    prompt: str
    parameters: dict[str, Any]
    error: JobError | None
    images: list[ImageBrief]
    # Images the output screening withheld (in quarantine; not in ``images``).
    withheld_images: int = 0
    progress: float | None
    step: int | None
    steps: int | None
    queue_position: int | None
    attempt_history: list[AttemptOut] | None
    # {references, strength, minScore, maxTries, tries: [{try, seed, score}], applied, ...}
    identity: dict[str, Any] | None
    style_transfer: dict[str, Any] | None
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None

    @classmethod
    def of(
        cls,
        j: Job,
        images: list[Image],
        attempts: list[JobAttempt] | None = None,
        queue_position: int | None = None,
        withheld: int = 0,
    ) -> JobOut:
        return cls(
            id=j.id,
            state=j.state,
            character_id=j.character_id,
            art_style=j.art_style,
            model=j.checkpoint,
            backend=j.backend,
            attempts=j.attempts,
            count=j.count or 1,
            prompt=j.user_prompt,
            parameters=camel_params(j.params),
            error=job_error(j),
            images=[brief(i) for i in images],
            withheld_images=withheld,
            progress=j.progress,
            step=j.step,
            steps=j.steps,
            queue_position=queue_position,
            attempt_history=(
                [AttemptOut.model_validate(a, from_attributes=True) for a in attempts]
                if attempts is not None
                else None
            ),
            identity=identity_view(j.identity),
            style_transfer=j.style_transfer,
            created_at=j.created_at,
            started_at=j.started_at,
            finished_at=j.finished_at,
        )

    @classmethod
    def of_view(cls, v: JobView) -> JobOut:
        return cls.of(v.job, v.images, v.attempts, v.queue_position, v.withheld)


class JobPage(Wire):
    items: list[JobOut]
    next_cursor: str | None


def job_error(j: Job) -> JobError | None:
    """A failed (or cancelled) job's error, as the API shows it."""
    if not j.error_code:
        return None
    return JobError(
        code=j.error_code, message=j.error_message or "", hint=j.error_hint, field=j.error_field
    )


def brief(i: Image) -> ImageBrief:
    return ImageBrief(
        id=i.id,
        url=image_url(i.id),
        seed=i.seed,
        width=i.width,
        height=i.height,
        identity=i.identity,
        consistency=i.consistency,
        style_transfer=i.style_transfer,
        nsfw_score=i.nsfw_score,
    )


def identity_view(plan: dict[str, Any] | None) -> dict[str, Any] | None:
    """A job's identity as clients read it: what was asked, each try, and the outcome."""
    if plan is None:
        return None
    return {
        "references": plan.get("references", []),
        "strength": plan.get("strength"),
        "minScore": plan.get("minScore"),
        "maxTries": plan.get("maxTries"),
        "tries": plan.get("tries", []),
        **(plan.get("result") or {"applied": None}),
    }


class GenerateOut(Wire):
    job_id: str
    character_id: str
    art_style: str
    model: str
    model_hash: str | None
    backend: str | None
    images: list[ImageBrief]
    parameters: dict[str, Any]
    simulated: bool
    identity: dict[str, Any] | None = None
    style_transfer: dict[str, Any] | None = None


class BackendHealth(Wire):
    name: str
    kind: str
    capabilities: list[str]
    available: bool
    latency_ms: float | None
    error: str | None
    checkpoint_present: bool | None
    routes: list[str]
    identity_method: str | None = None


class StyleOut(Wire):
    style: str
    label: str
    emoji: str
    checkpoint: str
    backend: str
    backends: list[BackendHealth]
    capabilities: list[str]
    available: bool
    indicator: str
    note: str
    simulated: bool
