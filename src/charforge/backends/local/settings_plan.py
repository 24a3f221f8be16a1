"""What a request's A1111 settings become on the local engine: the diffusers scheduler of a
sampler and scheduler name, the upscaler of the high-resolution pass and its size, the seeds of
a batch. All checked before anything is loaded."""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from typing import Any

from charforge.domain.params import seeds_for
from charforge.errors import InvalidInput

# A1111 sampler title -> (diffusers scheduler class, from_config overrides).
SAMPLERS: dict[str, tuple[str, dict[str, Any]]] = {
    "Euler": ("EulerDiscreteScheduler", {}),
    "Euler a": ("EulerAncestralDiscreteScheduler", {}),
    "LMS": ("LMSDiscreteScheduler", {}),
    "Heun": ("HeunDiscreteScheduler", {}),
    "DPM2": ("KDPM2DiscreteScheduler", {}),
    "DPM2 a": ("KDPM2AncestralDiscreteScheduler", {}),
    "DPM++ 2M": (
        "DPMSolverMultistepScheduler",
        {"algorithm_type": "dpmsolver++", "solver_order": 2},
    ),
    "DPM++ 2M SDE": (
        "DPMSolverMultistepScheduler",
        {"algorithm_type": "sde-dpmsolver++", "solver_order": 2},
    ),
    "DPM++ 3M SDE": (
        "DPMSolverMultistepScheduler",
        {"algorithm_type": "sde-dpmsolver++", "solver_order": 3},
    ),
    "DPM++ SDE": ("DPMSolverSDEScheduler", {}),
    "DPM++ 2S a": ("DPMSolverSinglestepScheduler", {"algorithm_type": "dpmsolver++"}),
    "DDIM": ("DDIMScheduler", {}),
    "DDPM": ("DDPMScheduler", {}),
    "PLMS": ("PNDMScheduler", {"skip_prk_steps": True}),
    "UniPC": ("UniPCMultistepScheduler", {}),
    "DEIS": ("DEISMultistepScheduler", {}),
    "LCM": ("LCMScheduler", {}),
}

# A1111 scheduler (sigma schedule) -> (sigma kind asked of the scheduler, overrides).
SCHEDULES: dict[str, tuple[str | None, dict[str, Any]]] = {
    "Automatic": (None, {}),
    "Uniform": (None, {}),
    "Normal": (None, {}),
    "Simple": (None, {}),
    "DDIM": (None, {}),
    "Karras": ("karras", {}),
    "Exponential": ("exponential", {}),
    "Beta": ("beta", {}),
    "SGM Uniform": (None, {"timestep_spacing": "trailing"}),
}

# A1111 hires upscaler -> (on latents?, interpolation, antialias).
UPSCALERS: dict[str, tuple[bool, str, bool]] = {
    "Latent": (True, "bilinear", False),
    "Latent (antialiased)": (True, "bilinear", True),
    "Latent (bicubic)": (True, "bicubic", False),
    "Latent (bicubic antialiased)": (True, "bicubic", True),
    "Latent (nearest)": (True, "nearest", False),
    "Latent (nearest-exact)": (True, "nearest-exact", False),
    "Lanczos": (False, "lanczos", False),
    "Nearest": (False, "nearest", False),
    "None": (False, "lanczos", False),
}
_FALLBACK_UPSCALER = "Lanczos"

_SAMPLER_KEYS = {name.lower(): name for name in SAMPLERS}
_SCHEDULE_KEYS = {name.lower(): name for name in SCHEDULES}
_UPSCALER_KEYS = {name.lower(): name for name in UPSCALERS}


@dataclass(frozen=True)
class SamplerPlan:
    sampler: str  # A1111 title as known here
    schedule: str
    class_name: str
    options: dict[str, Any]
    sigmas: str | None


def plan_sampler(sampler: str, scheduler: str) -> SamplerPlan:
    """A1111's sampler + scheduler names as a diffusers scheduler, or a 422 naming the field.

    Old A1111 titles that carry the schedule ("DPM++ 2M Karras") are understood too."""
    name = sampler.strip()
    schedule = (scheduler or "").strip() or "Automatic"
    for suffix in ("Karras", "Exponential"):
        if name.lower().endswith(" " + suffix.lower()) and name.lower() not in _SAMPLER_KEYS:
            name = name[: -len(suffix) - 1].strip()
            if schedule.lower() in ("automatic", ""):
                schedule = suffix
    known_sampler = _SAMPLER_KEYS.get(name.lower())
    if known_sampler is None:
        names = ", ".join(SAMPLERS)
        raise InvalidInput(
            f"Unknown sampler '{sampler}' for the local engine. Known samplers: {names}.",
            field="sampler",
            hint=f"Use one of: {names}.",
        )
    known_schedule = _SCHEDULE_KEYS.get(schedule.lower())
    if known_schedule is None:
        names = ", ".join(SCHEDULES)
        raise InvalidInput(
            f"Unknown scheduler '{scheduler}' for the local engine. Known schedulers: {names}.",
            field="scheduler",
            hint=f"Use one of: {names}.",
        )
    class_name, options = SAMPLERS[known_sampler]
    sigmas, schedule_options = SCHEDULES[known_schedule]
    return SamplerPlan(
        known_sampler, known_schedule, class_name, {**options, **schedule_options}, sigmas
    )


def plan_upscaler(name: str) -> tuple[str, tuple[bool, str, bool]]:
    """The upscaler as known here; others (ESRGAN and friends need their own weights) fall
    back to Lanczos on the decoded image, which the result's info says."""
    known = _UPSCALER_KEYS.get((name or "Latent").strip().lower())
    if known is None:
        return _FALLBACK_UPSCALER, UPSCALERS[_FALLBACK_UPSCALER]
    return known, UPSCALERS[known]


def hires_size(width: int, height: int, scale: float) -> tuple[int, int]:
    """The second pass's size: the first's times ``scale``, rounded to a multiple of 8."""
    return (max(8, round(width * scale / 8) * 8), max(8, round(height * scale / 8) * 8))


def plan_seeds(seed: int, count: int) -> list[int]:
    """The seeds of ``count`` images: ``seed``, ``seed + 1``, ... within 0..2**32-1 (as
    A1111's batches), from a random start when ``seed`` is -1."""
    return seeds_for(seed, max(1, count), pick=secrets.randbelow)
