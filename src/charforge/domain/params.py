"""Generation parameters: the original API's body, its defaults and its limits."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Annotated, Any, TypeVar

from pydantic import BaseModel, ConfigDict, Field, field_validator
from pydantic.alias_generators import to_camel

from charforge.config import GenerationDefaults
from charforge.domain.samplers import BUILT_IN, canonical_upscaler, resolve
from charforge.errors import InvalidInput

PROMPT_MAX = 2000
SIZE_MIN, SIZE_MAX, SIZE_STEP = 64, 2048, 8
STEPS_MIN, STEPS_MAX = 1, 150
CFG_MIN, CFG_MAX = 1.0, 30.0
SEED_MAX = 2**32 - 1
COUNT_MAX = 16  # images per job: one after the other on one backend, so it bounds a job's time
HIRES_SCALE_MIN, HIRES_SCALE_MAX = 1.0, 4.0
CLIP_SKIP_MAX = 12
UPSCALER_MAX = 128
VARIABLES_MAX = 32  # named slots of one template
# The largest image a request may produce, hires pass included (2048x2048): beyond it a
# WebUI tends to run out of GPU memory after minutes of work instead of failing at once.
OUTPUT_PIXELS_MAX = 2048 * 2048

_T = TypeVar("_T")

# Added to the negative prompt unless the request sets nsfw=true ("content rating" in the seed).
SFW_NEGATIVE = "nsfw, nude, explicit"


class IdentityIn(BaseModel):
    """How the character's reference images condition and judge this generation."""

    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="forbid")

    # 0 turns conditioning off; absent: the character's own imageGeneration.identityStrength.
    strength: float | None = Field(default=None, ge=0.0, le=1.0)
    # Reference ids of the character; absent: all of them.
    references: list[str] | None = Field(default=None, min_length=1, max_length=8)
    # Generate again (next seed) while the consistency score is below this, up to maxTries.
    min_score: float | None = Field(default=None, ge=0.0, le=1.0)
    max_tries: int | None = Field(default=None, ge=1, le=5)


class GenerationSettings(BaseModel):
    """The settings a generate body, a prompt template's ``params`` and a saved preset share,
    with one set of limits (absent: the request's, the template's, then the defaults)."""

    model_config = ConfigDict(
        alias_generator=to_camel, populate_by_name=True, extra="forbid", str_strip_whitespace=True
    )

    width: int | None = Field(default=None, ge=SIZE_MIN, le=SIZE_MAX)
    height: int | None = Field(default=None, ge=SIZE_MIN, le=SIZE_MAX)
    steps: int | None = Field(default=None, ge=STEPS_MIN, le=STEPS_MAX)
    cfg_scale: float | None = Field(default=None, ge=CFG_MIN, le=CFG_MAX)
    sampler: str | None = Field(default=None, max_length=64)
    scheduler: str | None = Field(default=None, max_length=64)
    hires: bool | None = None
    # The high-resolution pass as A1111 names it: hr_scale, hr_second_pass_steps (0: as many
    # as steps), denoising_strength, hr_upscaler (checked against the backend's upscalers).
    hires_scale: float | None = Field(default=None, ge=HIRES_SCALE_MIN, le=HIRES_SCALE_MAX)
    hires_steps: int | None = Field(default=None, ge=0, le=STEPS_MAX)
    denoising_strength: float | None = Field(default=None, ge=0.0, le=1.0)
    hires_upscaler: str | None = Field(default=None, max_length=UPSCALER_MAX)
    # A1111's "Clip skip" (CLIP_stop_at_last_layers): 1 uses the text encoder's last layer.
    clip_skip: int | None = Field(default=None, ge=1, le=CLIP_SKIP_MAX)

    @field_validator("width", "height")
    @classmethod
    def _multiple_of_8(cls, value: int | None) -> int | None:
        if value is not None and value % SIZE_STEP:
            lower = value // SIZE_STEP * SIZE_STEP
            raise ValueError(
                f"must be a multiple of {SIZE_STEP} between {SIZE_MIN} and {SIZE_MAX} "
                f"(got {value}; try {lower} or {lower + SIZE_STEP})"
            )
        return value

    @field_validator("sampler", "scheduler", "hires_upscaler")
    @classmethod
    def _blank_name_is_absent(cls, value: str | None) -> str | None:
        return value or None


class GenerateBody(GenerationSettings):
    """``POST /api/image-generation/generate`` as the original system sent it (camelCase),
    plus the advanced settings above and prompt templates."""

    # Required unless templateId is given (then the template's expansion is the prompt);
    # services.templates.expand refuses a body with neither, naming the field.
    prompt: str = Field(default="", max_length=PROMPT_MAX)
    negative_prompt: str = Field(default="", max_length=PROMPT_MAX)
    character_id: str = Field(min_length=1, max_length=64)
    # As in the seed; the id decides, and a name that is not the character's is refused.
    character_name: str | None = Field(default=None, max_length=100)  # a character name's limit
    art_style: str | None = None
    model: str | None = Field(default=None, max_length=255)
    nsfw: bool = False
    seed: int | None = Field(default=None, ge=-1, le=SEED_MAX)
    identity: IdentityIn | None = None
    # With artStyle naming another style: render the character on that style's route and
    # checkpoint, carrying its appearance, negative prompt and references.
    style_transfer: bool = False
    # How many images, one seed after the other (the synchronous endpoint answers with all).
    count: int = Field(default=1, ge=1, le=COUNT_MAX)
    # A prompt template (a built-in id such as "builtin-outfit-change", or one of the user's)
    # and the values of its named slots: {"outfit": "red evening dress"}.
    template_id: str | None = Field(default=None, min_length=1, max_length=64)
    variables: dict[str, Annotated[str, Field(max_length=PROMPT_MAX)]] | None = Field(
        default=None, max_length=VARIABLES_MAX
    )

    @field_validator("art_style", "model", "character_name")
    @classmethod
    def _blank_is_absent(cls, value: str | None) -> str | None:
        # The seed's page sends `model: null` or "" when the character has none.
        return value or None


class JobBody(GenerateBody):
    """``POST /api/jobs``: the same body, answered at once with the job to follow."""


@dataclass(frozen=True)
class GenerationParams:
    """Everything a backend needs besides the checkpoint, with defaults applied."""

    prompt: str
    negative_prompt: str
    width: int
    height: int
    steps: int
    cfg_scale: float
    seed: int  # -1: the backend picks
    sampler: str
    scheduler: str
    hires: bool
    hires_scale: float
    hires_upscaler: str
    denoising_strength: float
    # Identity conditioning on the character's reference images: 0 is none. Required: the
    # request asked for it, so a backend that cannot do it must not run the job without it.
    identity_strength: float = 0.0
    identity_required: bool = False
    # Asked with "nsfw": true by a user allowed to: its images are not screened. Jobs stored
    # before this field existed read False, so they are screened (the safe side).
    nsfw: bool = False
    # Steps of the high-resolution pass (0: as many as steps, A1111's hr_second_pass_steps)
    # and A1111's clip skip (1: none). Jobs stored before these existed read the defaults.
    hires_steps: int = 0
    clip_skip: int = 1

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> GenerationParams:
        return cls(**data)


def apply_defaults(
    body: GenerateBody, defaults: GenerationDefaults, prompt: str, negative: str
) -> GenerationParams:
    # Any spelling A1111 takes ("k_dpmpp_2m", "dpm++ 2m", "DPM++ 2M Karras"), recorded as the
    # canonical name; a name charforge does not know is left for the backend to judge.
    sampler, scheduler = resolve(
        BUILT_IN, body.sampler or defaults.sampler, body.scheduler, strict=False
    )
    sampler, scheduler = resolve(BUILT_IN, sampler, scheduler or defaults.scheduler, strict=False)
    params = GenerationParams(
        prompt=prompt,
        negative_prompt=negative,
        nsfw=body.nsfw,
        width=body.width or defaults.width,
        height=body.height or defaults.height,
        steps=body.steps or defaults.steps,
        cfg_scale=body.cfg_scale if body.cfg_scale is not None else defaults.cfg_scale,
        seed=body.seed if body.seed is not None else -1,
        sampler=sampler,
        scheduler=scheduler or defaults.scheduler,
        hires=body.hires if body.hires is not None else defaults.hires,
        hires_scale=_given(body.hires_scale, defaults.hires_scale),
        hires_upscaler=canonical_upscaler(body.hires_upscaler or defaults.hires_upscaler),
        denoising_strength=_given(body.denoising_strength, defaults.denoising_strength),
        hires_steps=_given(body.hires_steps, defaults.hires_steps),
        clip_skip=_given(body.clip_skip, defaults.clip_skip),
    )
    scale = params.hires_scale if params.hires else 1.0
    out_w, out_h = int(params.width * scale), int(params.height * scale)
    if out_w * out_h > OUTPUT_PIXELS_MAX:
        field = "width"
        if params.hires:
            field = "hiresScale" if body.hires_scale is not None else "hires"
        raise InvalidInput(
            f"The image would be {out_w}x{out_h} ({out_w * out_h / 1e6:.1f} MP"
            f"{' after the high-resolution pass' if params.hires else ''}); the limit is "
            f"{OUTPUT_PIXELS_MAX / 1e6:.1f} MP.",
            field=field,
            hint="Lower width/height or hiresScale, or set hires to false.",
        )
    return params


def _given(value: _T | None, default: _T) -> _T:
    return default if value is None else value


def seeds_for(seed: int, count: int, *, pick: Callable[[int], int]) -> list[int]:
    """The seeds of ``count`` images, one after the other as A1111's ``n_iter`` does: ``seed``,
    ``seed + 1``, ... (wrapping within the seed range, so every one can be asked for again);
    ``-1`` starts from one number ``pick(upper_bound)`` draws."""
    first = seed if seed >= 0 else pick(SEED_MAX + 1)
    return [(first + index) % (SEED_MAX + 1) for index in range(count)]
