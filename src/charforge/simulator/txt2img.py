"""The txt2img request body, its A1111 defaults, and the ``info`` / infotext A1111 answers with."""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel, ConfigDict

from charforge.simulator.catalog import resolve_sampler

A1111_VERSION = "v1.10.1"
FORGE_VERSION = "f2.0.1v1.10.1-previous-669-gdfdcbab6"
DEFAULT_HIRES_DENOISE = 0.7
DEFAULT_HIRES_UPSCALER = "Latent"


class Txt2ImgRequest(BaseModel):
    """``StableDiffusionTxt2ImgProcessingAPI`` of A1111 1.10, field for field.

    Every field is optional like the generated original; fields A1111 does not know are
    ignored. ``model_dump()`` is what A1111 echoes back as ``parameters``.
    """

    model_config = ConfigDict(extra="ignore")

    prompt: str | None = ""
    negative_prompt: str | None = ""
    styles: list[str] | None = None
    seed: int | None = -1
    subseed: int | None = -1
    subseed_strength: float | None = 0
    seed_resize_from_h: int | None = -1
    seed_resize_from_w: int | None = -1
    sampler_name: str | None = None
    scheduler: str | None = None
    batch_size: int | None = 1
    n_iter: int | None = 1
    steps: int | None = 50
    cfg_scale: float | None = 7.0
    width: int | None = 512
    height: int | None = 512
    restore_faces: bool | None = None
    tiling: bool | None = None
    do_not_save_samples: bool | None = False
    do_not_save_grid: bool | None = False
    eta: float | None = None
    denoising_strength: float | None = None
    s_min_uncond: float | None = None
    s_churn: float | None = None
    s_tmax: float | None = None
    s_tmin: float | None = None
    s_noise: float | None = None
    override_settings: dict[str, Any] | None = None
    override_settings_restore_afterwards: bool | None = True
    refiner_checkpoint: str | None = None
    refiner_switch_at: float | None = None
    disable_extra_networks: bool | None = False
    firstpass_image: str | None = None
    comments: dict[str, Any] | None = None
    enable_hr: bool | None = False
    firstphase_width: int | None = 0
    firstphase_height: int | None = 0
    hr_scale: float | None = 2.0
    hr_upscaler: str | None = None
    hr_second_pass_steps: int | None = 0
    hr_resize_x: int | None = 0
    hr_resize_y: int | None = 0
    hr_checkpoint_name: str | None = None
    hr_sampler_name: str | None = None
    hr_scheduler: str | None = None
    hr_prompt: str | None = ""
    hr_negative_prompt: str | None = ""
    force_task_id: str | None = None
    sampler_index: str | None = "Euler"
    script_name: str | None = None
    script_args: list[Any] | None = []
    send_images: bool | None = True
    save_images: bool | None = False
    alwayson_scripts: dict[str, Any] | None = {}
    infotext: str | None = None


class ForgeTxt2ImgRequest(Txt2ImgRequest):
    """Forge 2 adds a few fields; ``hr_additional_modules`` is the one that bites."""

    distilled_cfg_scale: float | None = 3.5
    hr_cfg: float | None = 1.0
    hr_distilled_cfg: float | None = 3.5
    hr_additional_modules: list[str] | None = None


NAN_MESSAGE = (
    "A tensor with NaNs was produced in Unet. This could be either because there's not enough"
    " precision to represent the picture, or because your video card does not support half"
    ' type. Try setting the "Upcast cross attention layer to float32" option in Settings >'
    " Stable Diffusion or using the --no-half commandline argument to fix this. Use"
    " --disable-nan-check commandline argument to disable this check."
)
"""``devices.test_for_nans(x, "unet")`` without ``--no-half``."""
CORRUPT_CHECKPOINT_MESSAGE = "Error while deserializing header: MetadataIncompleteBuffer"
"""What safetensors raises for a truncated file."""


class GenerationError(Exception):
    """What A1111 would raise while generating; rendered as the flavor's error body."""

    def __init__(self, error: str, message: str, status: int = 500, detail: Any = "") -> None:
        super().__init__(message)
        self.error = error
        self.message = message
        self.status = status
        self.detail = detail
        """``HTTPException.detail`` when A1111 raised one, else empty."""


_REQUIRED_NUMBERS = ("batch_size", "n_iter", "steps", "cfg_scale", "width", "height", "hr_scale")


@dataclass
class Plan:
    """A txt2img request with A1111's runtime defaults resolved."""

    prompt: str
    negative_prompt: str
    seeds: list[int]
    subseeds: list[int]
    subseed_strength: float
    sampler_name: str
    schedule_label: str
    steps: int
    cfg_scale: float
    width: int
    height: int
    batch_size: int
    n_iter: int
    enable_hr: bool
    hires_steps: int | None
    """Steps of the hires pass (``hr_second_pass_steps`` or ``steps``); None without hires."""
    output_width: int
    output_height: int
    denoising_strength: float | None
    restore_faces: bool
    styles: list[str]
    seed_resize_from_w: int
    seed_resize_from_h: int
    extra_generation_params: dict[str, Any] = field(default_factory=dict)

    @property
    def image_count(self) -> int:
        return self.batch_size * self.n_iter


def _fixed_seed(seed: int | None) -> int:
    """``processing.get_fixed_seed``: -1 (or nothing) becomes a random seed."""
    if seed is None or seed == -1:
        return random.randrange(4294967294)  # noqa: S311 - a seed, not a secret
    return seed


def _hires_target(req: Txt2ImgRequest, width: int, height: int, scale: float) -> tuple[int, int]:
    resize_x = req.hr_resize_x or 0
    resize_y = req.hr_resize_y or 0
    if resize_x == 0 and resize_y == 0:
        return int(width * scale), int(height * scale)
    if resize_y == 0:
        return resize_x, resize_x * height // width
    if resize_x == 0:
        return resize_y * width // height, resize_y
    return resize_x, resize_y  # A1111 upscales to cover, then crops to exactly this


def plan_txt2img(req: Txt2ImgRequest) -> Plan:
    """Resolve what A1111 would actually run for ``req``; raises like A1111 on nonsense."""
    for name in _REQUIRED_NUMBERS:
        if getattr(req, name) is None:
            raise GenerationError(
                "TypeError", f"unsupported operand type(s) for *: 'NoneType' and 'int' ({name})"
            )
    batch_size, n_iter = int(req.batch_size or 0), int(req.n_iter or 0)
    width, height = int(req.width or 0), int(req.height or 0)
    if batch_size < 1 or n_iter < 1 or width < 8 or height < 8 or (req.steps or 0) < 1:
        raise GenerationError(
            "ValueError", "batch_size, n_iter, steps, width and height must be positive"
        )

    sampler_name, schedule_label = resolve_sampler(
        req.sampler_name or req.sampler_index, req.scheduler
    )
    count = batch_size * n_iter
    seed = _fixed_seed(req.seed)
    subseed = _fixed_seed(req.subseed)
    strength = req.subseed_strength or 0
    seeds = [seed + (i if strength == 0 else 0) for i in range(count)]
    subseeds = [subseed + i for i in range(count)]

    extra: dict[str, Any] = {"Schedule type": schedule_label}
    enable_hr = bool(req.enable_hr)
    output_width, output_height = width, height
    denoise = req.denoising_strength
    if enable_hr:
        scale = float(req.hr_scale or 0)
        output_width, output_height = _hires_target(req, width, height, scale)
        if denoise is None:
            denoise = DEFAULT_HIRES_DENOISE
        if not req.hr_resize_x and not req.hr_resize_y:
            extra["Hires upscale"] = scale
        else:
            extra["Hires resize"] = f"{req.hr_resize_x or 0}x{req.hr_resize_y or 0}"
        if req.hr_second_pass_steps:
            extra["Hires steps"] = req.hr_second_pass_steps
        extra["Hires upscaler"] = req.hr_upscaler or DEFAULT_HIRES_UPSCALER

    return Plan(
        prompt=req.prompt or "",
        negative_prompt=req.negative_prompt or "",
        seeds=seeds,
        subseeds=subseeds,
        subseed_strength=strength,
        sampler_name=sampler_name,
        schedule_label=schedule_label,
        steps=int(req.steps or 0),
        cfg_scale=float(req.cfg_scale or 0),
        width=width,
        height=height,
        batch_size=batch_size,
        n_iter=n_iter,
        enable_hr=enable_hr,
        hires_steps=(req.hr_second_pass_steps or int(req.steps or 0)) if enable_hr else None,
        output_width=output_width,
        output_height=output_height,
        denoising_strength=denoise,
        restore_faces=bool(req.restore_faces),
        styles=list(req.styles or []),
        seed_resize_from_w=req.seed_resize_from_w if req.seed_resize_from_w is not None else -1,
        seed_resize_from_h=req.seed_resize_from_h if req.seed_resize_from_h is not None else -1,
        extra_generation_params=extra,
    )


def quote(value: Any) -> str:
    """``infotext_utils.quote``: values with separators are written as JSON strings."""
    text = str(value)
    if any(ch in text for ch in (",", "\n", ":", '"')):
        return json.dumps(text, ensure_ascii=False)
    return text


@dataclass(frozen=True)
class ModelRun:
    """The checkpoint that actually ran, as the infotext names it."""

    name_for_extra: str
    shorthash: str | None


def infotext(plan: Plan, index: int, model: ModelRun, clip_skip: int, version: str) -> str:
    """``processing.create_infotext`` for image ``index`` of ``plan``."""
    params: dict[str, Any] = {
        "Steps": plan.steps,
        "Sampler": plan.sampler_name,
        "Schedule type": plan.schedule_label,
        "CFG scale": plan.cfg_scale,
        "Seed": plan.seeds[index],
        "Size": f"{plan.width}x{plan.height}",
        "Model hash": model.shorthash,
        "Model": model.name_for_extra,
        "Variation seed": None if plan.subseed_strength == 0 else plan.subseeds[index],
        "Variation seed strength": None if plan.subseed_strength == 0 else plan.subseed_strength,
        "Denoising strength": plan.denoising_strength if plan.enable_hr else None,
        "Clip skip": None if clip_skip <= 1 else clip_skip,
        **plan.extra_generation_params,
        "Version": version,
    }
    last = ", ".join(f"{key}: {quote(value)}" for key, value in params.items() if value is not None)
    negative = f"\nNegative prompt: {plan.negative_prompt}" if plan.negative_prompt else ""
    return f"{plan.prompt}{negative}\n{last}".strip()


def info_json(
    plan: Plan,
    model: ModelRun,
    *,
    infotexts: list[str],
    clip_skip: int,
    job_timestamp: str,
    version: str,
) -> str:
    """``Processed.js()``: the ``info`` string of a txt2img answer.

    The ``all_*`` lists cover every planned image (``p.all_seeds``) even when an interrupt
    stopped the job early; ``infotexts`` has one entry per image made.
    """
    count = plan.image_count
    obj = {
        "prompt": plan.prompt,
        "all_prompts": [plan.prompt] * count,
        "negative_prompt": plan.negative_prompt,
        "all_negative_prompts": [plan.negative_prompt] * count,
        "seed": plan.seeds[0],
        "all_seeds": list(plan.seeds),
        "subseed": plan.subseeds[0],
        "all_subseeds": list(plan.subseeds),
        "subseed_strength": plan.subseed_strength,
        "width": plan.width,
        "height": plan.height,
        "sampler_name": plan.sampler_name,
        "cfg_scale": plan.cfg_scale,
        "steps": plan.steps,
        "batch_size": plan.batch_size,
        "restore_faces": plan.restore_faces,
        "face_restoration_model": "CodeFormer" if plan.restore_faces else None,
        "sd_model_name": model.name_for_extra,
        "sd_model_hash": model.shorthash,
        "sd_vae_name": None,
        "sd_vae_hash": None,
        "seed_resize_from_w": plan.seed_resize_from_w,
        "seed_resize_from_h": plan.seed_resize_from_h,
        "denoising_strength": plan.denoising_strength,
        "extra_generation_params": dict(plan.extra_generation_params),
        "index_of_first_image": 0,
        "infotexts": infotexts,
        "styles": plan.styles,
        "job_timestamp": job_timestamp,
        "clip_skip": clip_skip,
        "is_using_inpainting_conditioning": False,
        "version": version,
    }
    return json.dumps(obj)
