"""A1111's wire formats: the txt2img body, its answer, its error bodies and their meaning.

Pure functions, no I/O (RunPod's A1111 worker takes the same body and answers the same way).
"""

from __future__ import annotations

import json
from typing import Any

import httpx

from charforge.backends.base import BackendRequest, BackendResult, GeneratedImage
from charforge.backends.transport import capitalized, decode_image_base64
from charforge.domain.infotext import parse_infotext
from charforge.errors import BackendBadResponse, CheckpointUnloadable, NanProduced

# Infotext keys charforge writes itself into a stored PNG; the run's other keys are kept.
OWN_INFOTEXT_KEYS = frozenset(
    {
        "Prompt",
        "Negative prompt",
        "Steps",
        "Sampler",
        "Schedule type",
        "CFG scale",
        "Seed",
        "Size",
        "Model hash",
        "Model",
        "Denoising strength",
        "Hires upscale",
        "Hires upscaler",
        "Version",
        "Art style",
    }
)

# What a checkpoint that cannot be read says while A1111 loads it: safetensors' header
# errors, torch.load's zip and pickle errors, a state dict of the wrong shape.
_UNLOADABLE_MARKERS = (
    "deserializing header",
    "metadataincompletebuffer",
    "headertoolarge",
    "invalidheader",
    "pytorchstreamreader",
    "invalid load key",
    "ran out of input",
    "error(s) in loading state_dict",
    "unpickling",
)
_UNLOADABLE_ERRORS = ("SafetensorError", "UnpicklingError", "EOFError")


def txt2img_payload(request: BackendRequest) -> dict[str, Any]:
    """The txt2img body for a request (also what RunPod's A1111 worker takes as input)."""
    p = request.params
    payload: dict[str, Any] = {
        "prompt": p.prompt,
        "negative_prompt": p.negative_prompt,
        "seed": p.seed,
        "subseed": -1,
        "sampler_name": p.sampler,
        "scheduler": p.scheduler,
        "steps": p.steps,
        "cfg_scale": p.cfg_scale,
        "width": p.width,
        "height": p.height,
        "batch_size": 1,
        # One image after the other: several in one batch would multiply GPU memory.
        "n_iter": request.count,
        "enable_hr": p.hires,
        "hr_scale": p.hires_scale,
        "hr_upscaler": p.hires_upscaler,
        "hr_second_pass_steps": p.hires_steps,
        "denoising_strength": p.denoising_strength,
        # Forge's hires pass fails with a TypeError without it; A1111 ignores it.
        "hr_additional_modules": ["Use same choices"],
        "override_settings": {
            "sd_model_checkpoint": request.checkpoint.title,
            # Sent every time, 1 included: nothing is restored afterwards (below), so a clip
            # skip left out would be the previous request's.
            "CLIP_stop_at_last_layers": p.clip_skip,
        },
        # Keep the model loaded: restoring would reload weights on every request.
        "override_settings_restore_afterwards": False,
        "send_images": True,
        "save_images": False,
    }
    if request.task_id is not None:
        # Per-task progress and a cancel that stops only this task.
        payload["force_task_id"] = request.task_id
    return payload


def error_text(response: httpx.Response) -> str:
    """The human part of an A1111 (``errors``), Forge (``message``) or FastAPI error body."""
    return error_parts(response)[1]


def error_parts(response: httpx.Response) -> tuple[str | None, str]:
    """(exception class, message) of an error answer: A1111's middleware sends
    ``{"error": class, "detail", "body", "errors": str(e)}`` (Forge: ``message``)."""
    try:
        body = response.json()
    except ValueError:
        text = response.text.strip()
        return None, text[:300] or f"HTTP {response.status_code}"
    if isinstance(body, dict):
        kind = body.get("error") if isinstance(body.get("error"), str) else None
        for key in ("errors", "message", "detail", "error"):
            value = body.get(key)
            if value:
                return kind, value if isinstance(value, str) else json.dumps(value)[:500]
        return kind, json.dumps(body)[:300]
    return None, json.dumps(body)[:300]


def failure_meaning(
    kind: str | None, message: str, *, where: str, checkpoint: str | None, source: str
) -> CheckpointUnloadable | NanProduced | None:
    """A WebUI failure that will happen again on this WebUI, so is not retried there: NaNs
    in the model's output, or a checkpoint file that cannot be read."""
    lowered = message.lower()
    if kind == "NansException" or "nans was produced" in lowered or "nan in output" in lowered:
        return NanProduced(
            f"{capitalized(where)} produced NaNs instead of an image (A1111's NansException: "
            f"{message[:200]}). The same prompt and seed fail again on this WebUI.",
            hint="Start that WebUI with --no-half (or --no-half-vae when the VAE is named), or "
            "turn on Settings > Stable Diffusion > 'Upcast cross attention layer to float32'; "
            "a half-precision GPU cannot run this checkpoint as is.",
        )
    if checkpoint and (
        kind in _UNLOADABLE_ERRORS or any(marker in lowered for marker in _UNLOADABLE_MARKERS)
    ):
        return CheckpointUnloadable(
            f"{capitalized(where)} could not load checkpoint '{checkpoint}': {message[:200]}. "
            "The file is damaged or incomplete.",
            hint=f"Replace {checkpoint} in that WebUI's models/Stable-diffusion folder with a "
            f"complete copy (compare its size or sha256 with the original), or take the "
            f"backend out of {source}; then run `charforge backends check`.",
        )
    return None


def parse_txt2img(body: Any, where: str) -> BackendResult:
    """Images, seeds, what ran and the run's extra infotext fields, from A1111's
    ``{images, parameters, info}``."""
    if not isinstance(body, dict) or not isinstance(body.get("images"), list):
        raise BackendBadResponse(f"{capitalized(where)} sent no image list.")
    raw_info = body.get("info")
    try:
        info = json.loads(raw_info) if isinstance(raw_info, str) else raw_info
    except ValueError as exc:
        raise BackendBadResponse(f"{where} sent an unreadable info block.") from exc
    if not isinstance(info, dict):
        raise BackendBadResponse(f"{where} sent no info block, so seeds and model are unknown.")
    first = int(info.get("index_of_first_image") or 0)
    seeds = info.get("all_seeds") or [info.get("seed")]
    texts = info.get("infotexts")
    infotexts: list[Any] = texts if isinstance(texts, list) else []
    # Extensions (ControlNet maps, ...) append extra images after the generated ones.
    encoded = body["images"][first : first + len(seeds)]
    if not encoded:
        raise BackendBadResponse(f"{capitalized(where)} returned no image.")
    images = []
    for index, item in enumerate(encoded):
        data = decode_image_base64(item, where)
        seed = seeds[index] if index < len(seeds) else seeds[-1]
        if not isinstance(seed, int):
            raise BackendBadResponse(f"{where} reported no seed for image {index + 1}.")
        text = infotexts[first + index] if first + index < len(infotexts) else None
        images.append(GeneratedImage(data, seed, run_extras(text)))
    reported = info.get("sd_model_name")
    extra_params = info.get("extra_generation_params")
    schedule = extra_params.get("Schedule type") if isinstance(extra_params, dict) else None
    sampler = info.get("sampler_name")
    return BackendResult(
        images=images,
        checkpoint=str(reported) if reported else None,
        checkpoint_hash=info.get("sd_model_hash") or None,
        info=info,
        sampler=sampler if isinstance(sampler, str) and sampler else None,
        scheduler=schedule if isinstance(schedule, str) and schedule else None,
    )


def run_extras(infotext: Any) -> dict[str, str]:
    """The keys of an image's infotext that charforge does not write itself."""
    if not isinstance(infotext, str) or not infotext:
        return {}
    fields = parse_infotext(infotext)
    return {k: v for k, v in fields.items() if k not in OWN_INFOTEXT_KEYS and v != ""}
