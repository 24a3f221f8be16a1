"""What the simulated WebUI knows about: checkpoints, samplers and schedulers (A1111 1.10)."""

from __future__ import annotations

import hashlib
import posixpath
from dataclasses import dataclass
from typing import Any

MODELS_DIR = "/models/Stable-diffusion"


@dataclass
class Checkpoint:
    """One checkpoint file, named like A1111's ``CheckpointInfo``."""

    name: str
    """Path relative to the models folder: ``anime/diving.safetensors``."""
    hashed: bool
    """Whether the sha256 is known. Forge only hashes a checkpoint when it loads it."""

    @property
    def model_name(self) -> str:
        """``anime/diving.safetensors`` -> ``anime_diving`` (what /sd-models reports)."""
        return posixpath.splitext(self.name.replace("\\", "_").replace("/", "_"))[0]

    @property
    def name_for_extra(self) -> str:
        """``anime/diving.safetensors`` -> ``diving``: what infotexts call ``Model``."""
        return posixpath.splitext(posixpath.basename(self.name.replace("\\", "/")))[0]

    @property
    def full_sha256(self) -> str:
        return hashlib.sha256(f"charforge-simulator:{self.name}".encode()).hexdigest()

    @property
    def legacy_hash(self) -> str:
        """The old 8-hex ``model_hash`` A1111 still accepts as an alias."""
        return hashlib.sha256(f"legacy:{self.name}".encode()).hexdigest()[:8]

    @property
    def sha256(self) -> str | None:
        return self.full_sha256 if self.hashed else None

    @property
    def shorthash(self) -> str | None:
        return self.full_sha256[:10] if self.hashed else None

    @property
    def title(self) -> str:
        return f"{self.name} [{self.shorthash}]" if self.hashed else self.name

    @property
    def filename(self) -> str:
        return f"{MODELS_DIR}/{self.name}"

    def aliases(self) -> list[str]:
        """Every string A1111's ``checkpoint_aliases`` maps to this checkpoint."""
        ids = [
            self.legacy_hash,
            self.model_name,
            self.title,
            self.name,
            self.name_for_extra,
            f"{self.name} [{self.legacy_hash}]",
        ]
        if self.hashed:
            short = self.full_sha256[:10]
            ids += [
                short,
                self.full_sha256,
                f"{self.name} [{short}]",
                f"{self.name_for_extra} [{short}]",
            ]
        return ids

    def api_item(self) -> dict[str, Any]:
        return {
            "title": self.title,
            "model_name": self.model_name,
            "hash": self.shorthash,
            "sha256": self.sha256,
            "filename": self.filename,
            "config": None,
        }


def find_checkpoint(checkpoints: list[Checkpoint], wanted: str | None) -> Checkpoint | None:
    """A1111's ``checkpoint_aliases.get(wanted)``: an exact lookup over every alias.

    Later checkpoints do not steal an alias an earlier one registered, which matches the
    order A1111 fills its dict in closely enough for distinct file names.
    """
    if not wanted:
        return None
    for checkpoint in checkpoints:
        if wanted in checkpoint.aliases():
            return checkpoint
    return None


@dataclass(frozen=True)
class Sampler:
    name: str
    aliases: tuple[str, ...]
    options: dict[str, Any]

    @property
    def default_scheduler(self) -> str | None:
        value = self.options.get("scheduler")
        return value if isinstance(value, str) else None

    def api_item(self) -> dict[str, Any]:
        # SamplerItem.options is Dict[str, str]: pydantic turns True into "True".
        return {
            "name": self.name,
            "aliases": list(self.aliases),
            "options": {key: str(value) for key, value in self.options.items()},
        }


SAMPLERS: tuple[Sampler, ...] = (
    Sampler("DPM++ 2M", ("k_dpmpp_2m",), {"scheduler": "karras"}),
    Sampler(
        "DPM++ SDE",
        ("k_dpmpp_sde",),
        {"scheduler": "karras", "second_order": True, "brownian_noise": True},
    ),
    Sampler(
        "DPM++ 2M SDE", ("k_dpmpp_2m_sde",), {"scheduler": "exponential", "brownian_noise": True}
    ),
    Sampler(
        "DPM++ 2M SDE Heun",
        ("k_dpmpp_2m_sde_heun",),
        {"scheduler": "exponential", "brownian_noise": True, "solver_type": "heun"},
    ),
    Sampler(
        "DPM++ 2S a",
        ("k_dpmpp_2s_a",),
        {"scheduler": "karras", "uses_ensd": True, "second_order": True},
    ),
    Sampler(
        "DPM++ 3M SDE",
        ("k_dpmpp_3m_sde",),
        {"scheduler": "exponential", "discard_next_to_last_sigma": True, "brownian_noise": True},
    ),
    Sampler("Euler a", ("k_euler_a", "k_euler_ancestral"), {"uses_ensd": True}),
    Sampler("Euler", ("k_euler",), {}),
    Sampler("LMS", ("k_lms",), {}),
    Sampler("Heun", ("k_heun",), {"second_order": True}),
    Sampler("DPM2", ("k_dpm_2",), {"discard_next_to_last_sigma": True, "second_order": True}),
    Sampler(
        "DPM2 a",
        ("k_dpm_2_a",),
        {"discard_next_to_last_sigma": True, "uses_ensd": True, "second_order": True},
    ),
    Sampler("DPM fast", ("k_dpm_fast",), {"uses_ensd": True}),
    Sampler("DPM adaptive", ("k_dpm_ad",), {"uses_ensd": True}),
    Sampler("Restart", ("restart",), {"scheduler": "karras", "second_order": True}),
    Sampler("DDIM", ("ddim",), {}),
    Sampler("DDIM CFG++", ("ddim_cfgpp",), {}),
    Sampler("PLMS", ("plms",), {}),
    Sampler("UniPC", ("unipc",), {}),
    Sampler("LCM", ("k_lcm",), {}),
)
SAMPLERS_BY_NAME = {sampler.name: sampler for sampler in SAMPLERS}


@dataclass(frozen=True)
class Scheduler:
    name: str
    label: str
    aliases: tuple[str, ...] | None = None
    default_rho: float = -1
    need_inner_model: bool = False

    def api_item(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "label": self.label,
            "aliases": list(self.aliases) if self.aliases is not None else None,
            "default_rho": self.default_rho,
            "need_inner_model": self.need_inner_model,
        }


SCHEDULERS: tuple[Scheduler, ...] = (
    Scheduler("automatic", "Automatic"),
    Scheduler("uniform", "Uniform", need_inner_model=True),
    Scheduler("karras", "Karras", default_rho=7.0),
    Scheduler("exponential", "Exponential"),
    Scheduler("polyexponential", "Polyexponential", default_rho=1.0),
    Scheduler("sgm_uniform", "SGM Uniform", aliases=("SGMUniform",), need_inner_model=True),
    Scheduler("kl_optimal", "KL Optimal"),
    Scheduler("align_your_steps", "Align Your Steps"),
    Scheduler("simple", "Simple"),
    Scheduler("normal", "Normal"),
    Scheduler("ddim", "DDIM"),
    Scheduler("beta", "Beta"),
)
SCHEDULERS_BY_KEY = {
    **{scheduler.name: scheduler for scheduler in SCHEDULERS},
    **{scheduler.label: scheduler for scheduler in SCHEDULERS},
}

# With no sampler_name the API model's ``sampler_index`` default ("Euler") is used.
API_DEFAULT_SAMPLER = "Euler"
# ``sd_samplers.samplers[0]``: what an unknown sampler name silently falls back to.
FALLBACK_SAMPLER = SAMPLERS[0].name


def resolve_sampler(sampler_name: str | None, scheduler_name: str | None) -> tuple[str, str]:
    """A1111 1.10's ``get_sampler_and_scheduler``, returning (sampler name, schedule label).

    Old combined names like ``"DPM++ 2M Karras"`` are split; an unknown sampler silently
    becomes ``"DPM++ 2M"``; an unknown scheduler becomes ``Automatic``. The label returned
    is what the infotext writes as ``Schedule type``: ``Automatic`` resolves to the
    sampler's own default schedule when it has one.
    """
    scheduler = SCHEDULERS_BY_KEY.get(scheduler_name or "", SCHEDULERS[0])
    name = sampler_name or API_DEFAULT_SAMPLER
    for candidate in SCHEDULERS:
        for option in (candidate.label, *(candidate.aliases or ())):
            if name.endswith(" " + option):
                scheduler = candidate
                name = name[: -(len(option) + 1)]
                break
    sampler = SAMPLERS_BY_NAME.get(name, SAMPLERS_BY_NAME[FALLBACK_SAMPLER])
    if scheduler.name == "automatic" and sampler.default_scheduler is not None:
        scheduler = SCHEDULERS_BY_KEY[sampler.default_scheduler]
    return sampler.name, scheduler.label
