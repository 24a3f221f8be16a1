"""What the simulated WebUI knows about: checkpoints, samplers and schedulers (A1111 1.10)."""

from __future__ import annotations

import hashlib
import posixpath
from dataclasses import dataclass
from typing import Any

from charforge.domain.samplers import (
    LATENT_UPSCALE_MODES,
    SAMPLERS,
    SCHEDULERS,
    UPSCALERS,
    Sampler,
    Scheduler,
)

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


# A1111 1.10's samplers and schedulers: the same catalog charforge resolves names against.
SAMPLERS_BY_NAME = {sampler.name: sampler for sampler in SAMPLERS}


def sampler_item(sampler: Sampler) -> dict[str, Any]:
    """``GET /sdapi/v1/samplers``: SamplerItem.options is Dict[str, str], so pydantic turns
    True into "True"."""
    return {
        "name": sampler.name,
        "aliases": list(sampler.aliases),
        "options": {key: str(value) for key, value in sampler.options.items()},
    }


def scheduler_item(scheduler: Scheduler) -> dict[str, Any]:
    """``GET /sdapi/v1/schedulers``."""
    return {
        "name": scheduler.name,
        "label": scheduler.label,
        "aliases": list(scheduler.aliases) if scheduler.aliases is not None else None,
        "default_rho": scheduler.default_rho,
        "need_inner_model": scheduler.need_inner_model,
    }


def upscaler_items(extra: list[str]) -> list[dict[str, Any]]:
    """``GET /sdapi/v1/upscalers``: A1111's own, then the models added to its folders."""
    own = [
        {
            "name": u.name,
            "model_name": u.model_name,
            "model_path": u.model_path,
            "model_url": None,
            "scale": u.scale,
        }
        for u in UPSCALERS
    ]
    added = [
        {
            "name": name,
            "model_name": name,
            "model_path": f"/models/ESRGAN/{name}.pth",
            "model_url": None,
            "scale": 4,
        }
        for name in extra
    ]
    return own + added


def latent_mode_items() -> list[dict[str, Any]]:
    """``GET /sdapi/v1/latent-upscale-modes``."""
    return [{"name": name} for name in LATENT_UPSCALE_MODES]


def known_upscaler(name: str, extra: list[str]) -> bool:
    """What ``hr_upscaler`` may name: a latent mode or an upscaler, looked up exactly as
    A1111 does (``any(x.name == self.hr_upscaler ...)``), case and all."""
    return name in LATENT_UPSCALE_MODES or any(u.name == name for u in UPSCALERS) or name in extra


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


# What GET /sdapi/v1/options answers besides the checkpoint (a representative subset).
BASE_OPTIONS: dict[str, Any] = {
    "samples_save": True,
    "samples_format": "png",
    "samples_filename_pattern": "",
    "save_images_add_number": True,
    "grid_save": True,
    "jpeg_quality": 80,
    "outdir_samples": "",
    "outdir_txt2img_samples": "outputs/txt2img-images",
    "sd_vae": "Automatic",
    "sd_checkpoint_cache": 0,
    "sd_vae_checkpoint_cache": 0,
    "CLIP_stop_at_last_layers": 1,
    "eta_noise_seed_delta": 0,
    "randn_source": "GPU",
    "token_merging_ratio": 0.0,
    "add_model_hash_to_info": True,
    "add_model_name_to_info": True,
    "add_version_to_infotext": True,
    "show_progress_every_n_steps": 10,
    "live_previews_enable": True,
    "face_restoration": False,
    "face_restoration_model": "CodeFormer",
    "lora_add_hashes_to_infotext": True,
    "lora_preferred_name": "Alias from file",
    "extra_networks_default_multiplier": 1.0,
}
FORGE_OPTIONS: dict[str, Any] = {
    "forge_preset": "sd",
    "forge_additional_modules": [],
    "forge_unet_storage_dtype": "Automatic",
    "forge_inference_memory": 1024,
    "forge_async_loading": "Queue",
    "forge_pin_shared_memory": "CPU",
}
