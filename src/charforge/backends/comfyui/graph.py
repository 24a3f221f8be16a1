"""ComfyUI API-format graphs: the one charforge builds, and a user's own workflow template.

An API-format graph maps node ids to ``{"class_type", "inputs"}``; an input that comes from
another node is ``[node_id, output_index]``. Shared by the ComfyUI adapter and the RunPod
ComfyUI worker (which takes the same graph as ``input.workflow``).

The high-resolution pass follows A1111's upscaler name: a ``Latent*`` upscaler scales the
first pass's latent (``LatentUpscaleBy``); any other runs in pixel space, as A1111 does: the
first pass is decoded, scaled with ``ImageScaleBy``, encoded again and sampled a second time.
Upscaler models (ESRGAN, R-ESRGAN, SwinIR, ...) are not loaded: they would need their own
weights on the server and an ``UpscaleModelLoader``, so a Lanczos pixel upscale stands in for
them, and the adapters report what ran (``hires_upscale(...).label``, e.g. ``lanczos
(pixel)``) in the result's info.
"""

from __future__ import annotations

import copy
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from charforge.domain.capabilities import lora_tags, strip_lora_tags
from charforge.domain.params import GenerationParams

Graph = dict[str, dict[str, Any]]

# A1111 sampler titles -> ComfyUI sampler_name. ComfyUI's own names pass through unchanged.
SAMPLERS: dict[str, str] = {
    "euler": "euler",
    "euler a": "euler_ancestral",
    "lms": "lms",
    "heun": "heun",
    "dpm2": "dpm_2",
    "dpm2 a": "dpm_2_ancestral",
    "dpm++ 2s a": "dpmpp_2s_ancestral",
    "dpm++ 2m": "dpmpp_2m",
    "dpm++ sde": "dpmpp_sde",
    "dpm++ 2m sde": "dpmpp_2m_sde",
    "dpm++ 3m sde": "dpmpp_3m_sde",
    "dpm fast": "dpm_fast",
    "dpm adaptive": "dpm_adaptive",
    "lcm": "lcm",
    "ddim": "ddim",
    "ddpm": "ddpm",
    "unipc": "uni_pc",
    "deis": "deis",
    "ipndm": "ipndm",
}
# A1111 schedule types -> ComfyUI scheduler.
SCHEDULERS: dict[str, str] = {
    "automatic": "normal",
    "uniform": "normal",
    "normal": "normal",
    "karras": "karras",
    "exponential": "exponential",
    "sgm uniform": "sgm_uniform",
    "simple": "simple",
    "ddim": "ddim_uniform",
    "beta": "beta",
    "kl optimal": "kl_optimal",
}
# A1111's latent hires upscalers -> LatentUpscaleBy's upscale_method.
LATENT_UPSCALERS: dict[str, str] = {
    "latent": "bilinear",
    "latent (antialiased)": "bilinear",
    "latent (bicubic)": "bicubic",
    "latent (bicubic antialiased)": "bicubic",
    "latent (nearest)": "nearest-exact",
    "latent (nearest-exact)": "nearest-exact",
}
# ImageScaleBy's own upscale methods; any other pixel upscaler (a model) becomes Lanczos.
PIXEL_UPSCALE_METHODS = ("nearest-exact", "bilinear", "area", "bicubic", "lanczos")
_PIXEL_ALIASES = {"nearest": "nearest-exact"}  # A1111's title for it
PIXEL_FALLBACK = "lanczos"


@dataclass(frozen=True)
class HiresUpscale:
    """How the high-resolution pass scales the first one: in latent or in pixel space."""

    space: str  # "latent" (LatentUpscaleBy) or "pixel" (VAEDecode, ImageScaleBy, VAEEncode)
    method: str  # the node's upscale_method

    @property
    def label(self) -> str:
        return f"{self.method} ({self.space})"


def hires_upscale(upscaler: str) -> HiresUpscale:
    """The pass for A1111's ``hr_upscaler`` name: ``Latent*`` in latent space, anything else
    in pixel space; an upscaler model (ESRGAN & co.) is not loaded, Lanczos stands in."""
    name = (upscaler or "Latent").strip().lower()
    if name.startswith("latent"):
        return HiresUpscale("latent", LATENT_UPSCALERS.get(name, "bislerp"))
    name = _PIXEL_ALIASES.get(name, name)
    return HiresUpscale("pixel", name if name in PIXEL_UPSCALE_METHODS else PIXEL_FALLBACK)


def comfy_sampler(sampler: str, scheduler: str) -> tuple[str, str]:
    """ComfyUI's (sampler_name, scheduler) for A1111-style or ComfyUI-style names. A1111
    before 1.9 folded the schedule into the sampler ("DPM++ 2M Karras"): that is unfolded."""
    name, sched = sampler.strip(), scheduler.strip()
    lowered = name.lower()
    for title in ("karras", "exponential"):
        if lowered.endswith(" " + title) and lowered[: -len(title) - 1] in SAMPLERS:
            lowered, sched = lowered[: -len(title) - 1], title
    return SAMPLERS.get(lowered, name), SCHEDULERS.get(sched.lower(), sched)


@dataclass(frozen=True)
class GraphIds:
    """Where the parts of a charforge graph are, for checks after it ran."""

    checkpoint_loader: str = "4"
    save: str = "9"


IDS = GraphIds()


def build_graph(
    params: GenerationParams,
    checkpoint: str,
    seed: int,
    *,
    prefix: str = "charforge",
    loras: Mapping[str, str] | None = None,
) -> Graph:
    """txt2img (+ the high-resolution second pass, see ``hires_upscale``) as ComfyUI's default
    workflow lays it out, with a LoraLoader per ``<lora:name:weight>`` tag of the prompt
    (``loras``: a tag's name -> the file ComfyUI lists for it) and a CLIPSetLastLayer for a
    clip skip above 1."""
    sampler, scheduler = comfy_sampler(params.sampler, params.scheduler)
    graph: Graph = {
        IDS.checkpoint_loader: {
            "class_type": "CheckpointLoaderSimple",
            "inputs": {"ckpt_name": checkpoint},
        },
    }
    model: list[Any] = [IDS.checkpoint_loader, 0]
    clip: list[Any] = [IDS.checkpoint_loader, 1]
    for index, (name, weight) in enumerate(lora_tags(params.prompt)):
        node = f"lora{index + 1}"
        lora_file = (loras or {}).get(name) or (
            name if "." in name.rsplit("/", 1)[-1] else f"{name}.safetensors"
        )
        graph[node] = {
            "class_type": "LoraLoader",
            "inputs": {
                "model": model,
                "clip": clip,
                "lora_name": lora_file,
                "strength_model": weight,
                "strength_clip": weight,
            },
        }
        model, clip = [node, 0], [node, 1]
    if params.clip_skip > 1:  # A1111's clip skip n is ComfyUI's last layer -n
        graph["14"] = {
            "class_type": "CLIPSetLastLayer",
            "inputs": {"clip": clip, "stop_at_clip_layer": -params.clip_skip},
        }
        clip = ["14", 0]
    graph["6"] = {
        "class_type": "CLIPTextEncode",
        "inputs": {"text": strip_lora_tags(params.prompt), "clip": clip},
    }
    graph["7"] = {
        "class_type": "CLIPTextEncode",
        "inputs": {"text": params.negative_prompt, "clip": clip},
    }
    graph["5"] = {
        "class_type": "EmptyLatentImage",
        "inputs": {"width": params.width, "height": params.height, "batch_size": 1},
    }
    sampling = {
        "model": model,
        "seed": seed,
        "steps": params.steps,
        "cfg": params.cfg_scale,
        "sampler_name": sampler,
        "scheduler": scheduler,
        "positive": ["6", 0],
        "negative": ["7", 0],
    }
    graph["3"] = {
        "class_type": "KSampler",
        "inputs": {**sampling, "latent_image": ["5", 0], "denoise": 1.0},
    }
    latent: list[Any] = ["3", 0]
    vae = (IDS.checkpoint_loader, 2)  # copied into each input: one list shared by two nodes
    # would change both when a graph is edited in place
    if params.hires:
        upscale = hires_upscale(params.hires_upscaler)
        scaling = {"upscale_method": upscale.method, "scale_by": params.hires_scale}
        if upscale.space == "latent":
            graph["10"] = {
                "class_type": "LatentUpscaleBy",
                "inputs": {"samples": latent, **scaling},
            }
            second: list[Any] = ["10", 0]
        else:  # decode the first pass, scale its pixels, encode them for the second sampler
            graph["12"] = {"class_type": "VAEDecode", "inputs": {"samples": latent, "vae": [*vae]}}
            graph["10"] = {"class_type": "ImageScaleBy", "inputs": {"image": ["12", 0], **scaling}}
            graph["13"] = {
                "class_type": "VAEEncode",
                "inputs": {"pixels": ["10", 0], "vae": [*vae]},
            }
            second = ["13", 0]
        graph["11"] = {
            "class_type": "KSampler",
            "inputs": {
                **sampling,
                # A1111's hr_second_pass_steps: 0 is as many as the first pass.
                "steps": params.hires_steps or params.steps,
                "latent_image": second,
                "denoise": params.denoising_strength,
            },
        }
        latent = ["11", 0]
    graph["8"] = {"class_type": "VAEDecode", "inputs": {"samples": latent, "vae": [*vae]}}
    graph[IDS.save] = {
        "class_type": "SaveImage",
        "inputs": {"images": ["8", 0], "filename_prefix": prefix},
    }
    return graph


# -- a user's own workflow -------------------------------------------------------------------

REQUIRED_PLACEHOLDERS = (
    "prompt",
    "negative_prompt",
    "seed",
    "width",
    "height",
    "steps",
    "cfg",
    "sampler",
    "scheduler",
    "checkpoint",
)
# A workflow's own second pass may take the request's denoising strength, and its LoadImage
# the first reference image of the character (the file's name in ComfyUI's input folder): a
# workflow without it cannot condition on references.
OPTIONAL_PLACEHOLDERS = ("denoise", "reference_image")
_PLACEHOLDER = re.compile(r"\{\{\s*([a-z_]+)\s*\}\}")


class WorkflowError(ValueError):
    """A workflow file charforge cannot use; the message says what to change."""


def _strings(value: Any) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, dict):
        return [s for item in value.values() for s in _strings(item)]
    if isinstance(value, list):
        return [s for item in value for s in _strings(item)]
    return []


def load_workflow(path: Path) -> Graph:
    """Read and check a user's API-format workflow (ComfyUI: "Export (API)")."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise WorkflowError(f"workflow {path} is not readable JSON: {exc}") from exc
    return check_workflow(data, str(path))


def check_workflow(data: Any, source: str) -> Graph:
    if isinstance(data, dict) and "nodes" in data and "links" in data:
        raise WorkflowError(
            f"workflow {source} is in ComfyUI's UI format; export it with "
            "'Export (API)' (enable dev mode options in ComfyUI's settings)"
        )
    if (
        not isinstance(data, dict)
        or not data
        or not all(
            isinstance(node, dict) and "class_type" in node and "inputs" in node
            for node in data.values()
        )
    ):
        raise WorkflowError(
            f"workflow {source} is not an API-format graph ({{node_id: {{class_type, inputs}}}})"
        )
    found = placeholders_in(data)
    unknown = sorted(found - set(REQUIRED_PLACEHOLDERS) - set(OPTIONAL_PLACEHOLDERS))
    if unknown:
        raise WorkflowError(
            f"workflow {source} has unknown placeholders: {', '.join(unknown)}; known: "
            f"{', '.join(REQUIRED_PLACEHOLDERS + OPTIONAL_PLACEHOLDERS)}"
        )
    missing = [name for name in REQUIRED_PLACEHOLDERS if name not in found]
    if missing:
        shown = ", ".join("{{" + name + "}}" for name in missing)
        raise WorkflowError(
            f"workflow {source} lacks the placeholders {shown}; without them a request's "
            "settings would be silently ignored"
        )
    if not any(node["class_type"] == "SaveImage" for node in data.values()):
        raise WorkflowError(f"workflow {source} has no SaveImage node, so it returns no image")
    return data


def placeholders_in(template: Graph) -> set[str]:
    """The placeholder names a workflow template uses."""
    return {m.group(1) for text in _strings(template) for m in _PLACEHOLDER.finditer(text)}


def placeholder_inputs(template: Graph, name: str) -> list[tuple[str, str]]:
    """``(node_id, input)`` of every input whose whole value is the placeholder ``name``:
    where the filled value can be read back from the graph that ran."""
    return [
        (node_id, key)
        for node_id, node in template.items()
        for key, value in node["inputs"].items()
        if isinstance(value, str)
        and (whole := _PLACEHOLDER.fullmatch(value.strip())) is not None
        and whole.group(1) == name
    ]


def fill_workflow(
    template: Graph,
    params: GenerationParams,
    checkpoint: str,
    seed: int,
    *,
    reference_image: str | None = None,
) -> Graph:
    """The template with its placeholders replaced. A value that is exactly one placeholder
    takes the value's own type (a number stays a number); inside longer text it is text."""
    if reference_image is None and "reference_image" in placeholders_in(template):
        raise WorkflowError("the workflow needs a reference image for {{reference_image}}")
    sampler, scheduler = comfy_sampler(params.sampler, params.scheduler)
    values: dict[str, Any] = {
        "prompt": params.prompt,
        "negative_prompt": params.negative_prompt,
        "seed": seed,
        "width": params.width,
        "height": params.height,
        "steps": params.steps,
        "cfg": params.cfg_scale,
        "checkpoint": checkpoint,
        "sampler": sampler,
        "scheduler": scheduler,
        "denoise": params.denoising_strength,
        "reference_image": reference_image,
    }

    def fill(value: Any) -> Any:
        if isinstance(value, str):
            whole = _PLACEHOLDER.fullmatch(value.strip())
            if whole:
                return values[whole.group(1)]
            return _PLACEHOLDER.sub(lambda m: str(values[m.group(1)]), value)
        if isinstance(value, dict):
            return {key: fill(item) for key, item in value.items()}
        if isinstance(value, list):
            return [fill(item) for item in value]
        return value

    result: Graph = fill(copy.deepcopy(template))
    return result


def checkpoints_in(graph: Graph) -> list[str]:
    """Every checkpoint a graph loads (what ran, read back from ComfyUI's history)."""
    return [
        str(node["inputs"]["ckpt_name"])
        for node in graph.values()
        if isinstance(node, dict)
        and isinstance(node.get("inputs"), dict)
        and "ckpt_name" in node["inputs"]
    ]


def graph_for(
    template: Graph | None,
    params: GenerationParams,
    checkpoint: str,
    seed: int,
    *,
    loras: Mapping[str, str] | None = None,
    reference_image: str | None = None,
) -> Graph:
    """The graph of one image: the user's workflow filled in, or charforge's own."""
    if template is not None:
        return fill_workflow(template, params, checkpoint, seed, reference_image=reference_image)
    return build_graph(params, checkpoint, seed, loras=loras)
