"""The part of the local engine that imports torch and diffusers (a worker process only).

``charforge.backends.local`` imports this module the first time it generates; nothing else
does, so a web process that lists or probes a local backend never loads torch.

Facts it is built on (DESIGN.md section 5, checked on this project's machines): a diffusers
folder loads with ``local_files_only=True``; the high-resolution pass shares the loaded
components through ``AutoPipelineForImage2Image.from_pipe`` (no second load); the img2img
pipeline takes latents (4 channels) as its image, which is A1111's "Latent" upscaler;
``from_single_file`` works offline only with ``config=`` a local folder of configs; diffusers
0.42 takes ``dtype=`` (``torch_dtype=`` is deprecated); its pipeline ``from_single_file`` reads
only a path (no state dict), but takes components built beforehand, and builds one from a state
dict with ``load_single_file_sub_model``: that is how a file in a key layout diffusers does not
read (``keys``) gets its text encoder, while the UNet and VAE come from the file as usual.
"""

from __future__ import annotations

import os

# Never reach a model hub: every file comes from the models folder or from charforge itself.
# Set before huggingface_hub is imported, which reads them once.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_HUB_DISABLE_TELEMETRY"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
# Their warnings about optional packages (torchvision, which must not be installed beside a CPU
# build of torch from PyPI) would only mislead; real errors still raise.
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import gc
import inspect
import io
import json
import logging
import math
import threading
import zipfile
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import diffusers
import huggingface_hub.constants
import torch
from diffusers import AutoPipelineForImage2Image, DiffusionPipeline
from diffusers.loaders.single_file import load_single_file_sub_model
from PIL import Image
from safetensors import safe_open

from charforge.backends.local.configs import safetensors_shapes
from charforge.backends.local.keys import (
    TEXT_ENCODER,
    CheckpointLayoutError,
    layout_error,
    layout_problem,
    renamed_keys,
    unwrap_state_dict,
)
from charforge.backends.transport import out_of_memory

log = logging.getLogger(__name__)

# Also when huggingface_hub was imported before the variables above were set.
huggingface_hub.constants.HF_HUB_OFFLINE = True
diffusers.utils.logging.disable_progress_bar()


class Interrupted(Exception):
    """Raised inside the step callback to stop a generation at once."""


@dataclass(frozen=True)
class SchedulerChoice:
    class_name: str  # a diffusers scheduler class
    options: dict[str, Any]  # from_config overrides (algorithm, sigma schedule)
    sigmas: str | None = None  # "karras" | "exponential" | "beta": asked of the scheduler


@dataclass(frozen=True)
class Upscale:
    latent: bool  # upscale the latents (A1111 "Latent*") or the decoded image
    mode: str  # torch interpolate mode, or a PIL filter name
    antialias: bool = False


@dataclass(frozen=True)
class RenderParams:
    prompt: str
    negative_prompt: str
    width: int
    height: int
    steps: int
    cfg_scale: float
    hires: bool
    out_width: int
    out_height: int
    denoising_strength: float
    hires_steps: int = 0  # steps the second pass runs; 0: as many as the first pass's share
    clip_skip: int = 1  # A1111's: 1 uses CLIP's last layer, 2 the one before it, ...


StepCallback = Callable[[int, int, int], None]  # (pass index, step done, steps of that pass)


# -- reading single files --------------------------------------------------------------------------

# Globals a pickled SD checkpoint may name beside its tensors, all training bookkeeping, which
# A1111's restricted unpickler (modules/safe.py) lets through and torch's weights-only one does
# not: CompVis' .ckpt files keep PyTorch Lightning's callback state (keyed by the callback's
# class), some trainers numpy scalars. They are read as inert placeholders, never imported.
TRAINING_METADATA_GLOBALS = (
    "pytorch_lightning.callbacks.model_checkpoint.ModelCheckpoint",
    "pytorch_lightning.callbacks.model_checkpoint",
    "numpy.core.multiarray.scalar",
    "numpy.core.multiarray._reconstruct",
    "numpy._core.multiarray.scalar",  # numpy 2's spelling of the two above
    "numpy._core.multiarray._reconstruct",
    "numpy.dtype",
    "numpy.ndarray",
)


class TrainingMetadata:
    """What a global of TRAINING_METADATA_GLOBALS unpickles to: built and filled without
    running any code of the class it stands for, and never used."""

    def __init__(self, *_args: object, **_kwargs: object) -> None:
        pass

    def __setstate__(self, _state: object) -> None:
        pass


_allowance_lock = threading.Lock()
_allowance_users = 0
_allowance: Any = None


@contextmanager
def training_metadata_allowed() -> Iterator[None]:
    """Lets torch's weights-only unpickler read TRAINING_METADATA_GLOBALS as placeholders, for
    as long as any load in this process needs it (torch keeps that list process-wide)."""
    global _allowance, _allowance_users
    with _allowance_lock:
        if _allowance_users == 0:
            _allowance = torch.serialization.safe_globals(
                [(TrainingMetadata, name) for name in TRAINING_METADATA_GLOBALS]
            )
            _allowance.__enter__()
        _allowance_users += 1
    try:
        yield
    finally:
        with _allowance_lock:
            _allowance_users -= 1
            if _allowance_users == 0:
                _allowance.__exit__(None, None, None)
                _allowance = None


def load_pickled(path: Path) -> Mapping[str, Any]:
    """The tensors of a pickled ``.ckpt`` by name, unwrapped from ``"state_dict"``: weights only,
    memory-mapped (nothing read until used) unless it is in torch's legacy non-zip format."""
    with training_metadata_allowed():
        data = torch.load(
            path, map_location="cpu", mmap=zipfile.is_zipfile(path), weights_only=True
        )
    return unwrap_state_dict(data)


def checkpoint_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """Tensor names and shapes of a pickled ``.ckpt`` (loaded memory-mapped, weights only)."""
    state = load_pickled(path)
    return {k: tuple(v.shape) for k, v in state.items() if isinstance(v, torch.Tensor)}


def read_single_file(path: Path) -> tuple[list[str], Mapping[str, Any] | None]:
    """The tensor names of a single-file checkpoint (from the header of a ``.safetensors``),
    and for a ``.ckpt`` its tensors unpickled without reading the weights (memory-mapped);
    CheckpointLayoutError naming the file when it cannot be read."""
    try:
        if path.suffix.lower() == ".safetensors":
            return list(safetensors_shapes(path)), None
        state = load_pickled(path)
    except Exception as exc:
        if _is_out_of_memory(exc):
            raise
        text = " ".join(str(exc).split())
        if _UNPICKLER_SAYS in text:  # torch's long advice around the one line that matters
            reason = text.split(_UNPICKLER_SAYS, 1)[1].split(" Check the documentation")[0]
            raise CheckpointLayoutError(
                f"{path.name} could not be read as a .ckpt file (PyTorch's weights-only "
                f"unpickler: {reason.strip()[:200]}): it is damaged, or holds Python objects "
                "besides tensors, which charforge does not run."
            ) from exc
        raise CheckpointLayoutError(
            f"{path.name} could not be read as a {path.suffix or 'checkpoint'} file: "
            f"{type(exc).__name__}: {text[:200]}"
        ) from exc
    return [k for k, v in state.items() if isinstance(v, torch.Tensor)], state


def renamed_tensors(
    path: Path, renames: Mapping[str, str], prefix: str, pickled: Mapping[str, Any] | None
) -> dict[str, Any]:
    """The tensors whose name, once renamed (``renames``: old -> new), starts with ``prefix``:
    from ``pickled`` (a ``.ckpt``'s), else only those read from the ``.safetensors``."""

    def wanted(key: str) -> bool:
        return renames.get(key, key).startswith(prefix)

    if pickled is not None:
        return {
            renames.get(k, k): v
            for k, v in pickled.items()
            if wanted(k) and isinstance(v, torch.Tensor)
        }
    with safe_open(str(path), framework="pt", device="cpu") as handle:
        names = handle.keys()  # a safe_open handle is not iterable itself
        return {renames.get(k, k): handle.get_tensor(k) for k in names if wanted(k)}


_UNPICKLER_SAYS = "WeightsUnpickler error:"


def _is_out_of_memory(exc: BaseException) -> bool:
    return "OutOfMemory" in type(exc).__name__ or out_of_memory(str(exc))


def resolve_device(wanted: str) -> str:
    if wanted == "cpu":
        return "cpu"
    available = torch.cuda.is_available()
    if wanted == "cuda" and not available:
        raise RuntimeError(
            "device = 'cuda' but torch sees no CUDA GPU (a CPU build of torch, or no driver)"
        )
    return "cuda" if available else "cpu"


class DiffusersEngine:
    """One loaded pipeline (and its img2img twin), switched only when the checkpoint (its path
    or the hash of its weights) changes."""

    def __init__(self, device: str = "auto") -> None:
        self.device = resolve_device(device)
        self.dtype = torch.float16 if self.device == "cuda" else torch.float32
        self.loaded: str | None = None  # the name of the checkpoint in memory
        self.loaded_sha256: str | None = None  # the hash of the weights in memory
        self.loads = 0  # how many times a checkpoint was read from disk
        self._identity: tuple[str, str] | None = None  # (path, sha256) of what is in memory
        self._pipe: Any = None
        self._img2img: Any = None
        self._scheduler_config: Any = None

    @property
    def dtype_name(self) -> str:
        return str(self.dtype).removeprefix("torch.")

    def unload(self) -> None:
        self._pipe = self._img2img = self._scheduler_config = None
        self.loaded = self.loaded_sha256 = None
        self._identity = None
        gc.collect()
        if self.device == "cuda":
            torch.cuda.empty_cache()

    def load(self, name: str, path: Path, *, sha256: str, single_file_config: Path | None) -> bool:
        """Make the weights at ``path``, whose hash the caller took as ``sha256``, the loaded
        checkpoint; False when exactly those were in memory already.

        Keyed by path and hash, not by name: a file replaced under the same name (another
        hash) is read again, so the hash reported is always that of the weights in memory."""
        identity = (str(path), sha256)
        if self._identity == identity and self._pipe is not None:
            self.loaded = name
            return False
        self.unload()  # free the old weights before reading the new ones
        if path.is_dir():
            kwargs = _safety_off(path / "model_index.json")
            pipe = DiffusionPipeline.from_pretrained(
                str(path), local_files_only=True, dtype=self.dtype, **kwargs
            )
        else:
            if single_file_config is None:
                raise ValueError("a single-file checkpoint needs a config folder")
            pipe = self._load_single_file(path, single_file_config)
        pipe.to(self.device)
        pipe.set_progress_bar_config(disable=True)
        self._pipe = pipe
        self._img2img = AutoPipelineForImage2Image.from_pipe(pipe)
        self._img2img.set_progress_bar_config(disable=True)
        self._scheduler_config = pipe.scheduler.config
        self.loaded, self.loaded_sha256, self._identity = name, sha256, identity
        self.loads += 1
        return True

    def _load_single_file(self, path: Path, config: Path) -> Any:
        """A pipeline from one file with the configs in ``config``. A file whose text-encoder
        keys lack ``text_model.`` (``keys``) gets its text encoder built from its tensors
        renamed; everything else diffusers reads from the file itself, as for any file."""
        index = json.loads((config / "model_index.json").read_text("utf-8"))
        pipeline_class = getattr(diffusers, str(index.get("_class_name")), None)
        if pipeline_class is None or not hasattr(pipeline_class, "from_single_file"):
            raise ValueError(
                f"model_index.json in {config} names "
                f"{index.get('_class_name')!r}, which diffusers cannot load from one file"
            )
        keys, pickled = read_single_file(path)  # no weights read (a .ckpt is memory-mapped)
        components: dict[str, Any] = {}
        renames = renamed_keys(keys)
        entry = index.get("text_encoder")
        if renames and isinstance(entry, list) and len(entry) == 2 and entry[0]:
            tensors = renamed_tensors(path, renames, TEXT_ENCODER, pickled)
            components["text_encoder"] = self._component_from_tensors(
                "text_encoder", entry, tensors, config
            )
            del tensors
        del pickled  # diffusers reads the file again, for the UNet and VAE
        try:
            with training_metadata_allowed():
                return pipeline_class.from_single_file(
                    str(path),
                    config=str(config),
                    local_files_only=True,
                    dtype=self.dtype,
                    **_safety_off(config / "model_index.json"),
                    **components,
                )
        except Exception as exc:
            problem = layout_problem(keys)
            if problem is None or _is_out_of_memory(exc):
                raise  # a layout charforge knows: diffusers' own error says more
            said = " ".join(str(exc).split()).split(". ")[0].rstrip(".")  # its first sentence
            raise CheckpointLayoutError(layout_error(path.name, keys, problem, said)) from exc

    def _component_from_tensors(
        self, name: str, entry: list[Any], tensors: dict[str, Any], config: Path
    ) -> Any:
        """One pipeline component built by diffusers from a state dict in the original layout,
        as ``from_single_file`` builds it from the file's."""
        library, class_name = str(entry[0]), str(entry[1])
        return load_single_file_sub_model(
            library_name=library,
            class_name=class_name,
            name=name,
            checkpoint=tensors,
            pipelines=diffusers.pipelines,
            is_pipeline_module=hasattr(diffusers.pipelines, library),
            cached_model_config_path=str(config),
            torch_dtype=self.dtype,
            local_files_only=True,
        )

    @staticmethod
    def _scheduler(choice: SchedulerChoice, config: Any) -> tuple[Any, str | None]:
        cls = getattr(diffusers, choice.class_name)
        options = dict(choice.options)
        applied = None
        if choice.sigmas:
            flag = f"use_{choice.sigmas}_sigmas"
            if flag in inspect.signature(cls.__init__).parameters:
                options[flag] = True
                applied = choice.sigmas
        return cls.from_config(config, **options), applied

    def render(
        self,
        params: RenderParams,
        seed: int,
        scheduler: SchedulerChoice,
        upscale: Upscale | None,
        on_step: StepCallback,
    ) -> tuple[bytes, dict[str, Any]]:
        """One image as PNG bytes; raises Interrupted when on_step does."""
        if self._pipe is None:
            raise RuntimeError("no checkpoint loaded")
        # Its own references: an unload from another thread (a close that did not wait)
        # frees them only once this image is done.
        pipe, img2img, config = self._pipe, self._img2img, self._scheduler_config
        pipe.scheduler, sigmas = self._scheduler(scheduler, config)
        generator = torch.Generator(self.device).manual_seed(seed)

        def callback(pass_index: int) -> Callable[..., dict[str, Any]]:
            def step_end(
                p: Any, step: int, _timestep: Any, kwargs: dict[str, Any]
            ) -> dict[str, Any]:
                on_step(pass_index, step + 1, int(getattr(p, "num_timesteps", 0) or 0))
                return kwargs

            return step_end

        common: dict[str, Any] = {
            "num_inference_steps": params.steps,
            "guidance_scale": params.cfg_scale,
            "generator": generator,
            **_conditioning(pipe, params),
        }
        # A strength of 0 changes nothing: the first image is only scaled (below).
        hires = params.hires and upscale is not None and params.denoising_strength > 0
        first = pipe(
            **common,
            width=params.width,
            height=params.height,
            output_type="latent" if hires and upscale and upscale.latent else "pil",
            callback_on_step_end=callback(0),
        ).images
        image: Image.Image
        if hires and upscale is not None:
            img2img.scheduler, _ = self._scheduler(scheduler, config)
            if upscale.latent:
                factor = int(getattr(pipe, "vae_scale_factor", 8))
                size = (params.out_height // factor, params.out_width // factor)
                init: Any = torch.nn.functional.interpolate(
                    first, size=size, mode=upscale.mode, antialias=upscale.antialias
                )
            else:
                resample = getattr(Image.Resampling, upscale.mode.upper())
                init = first[0].resize((params.out_width, params.out_height), resample)
            image = img2img(
                **{**common, "num_inference_steps": second_pass_schedule(params)},
                image=init,
                strength=params.denoising_strength,
                callback_on_step_end=callback(1),
            ).images[0]
        else:
            image = first[0]
        if image.size != (params.out_width, params.out_height):
            image = image.resize((params.out_width, params.out_height), Image.Resampling.LANCZOS)
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        return buffer.getvalue(), {"sigmas": sigmas}


def _conditioning(pipe: Any, params: RenderParams) -> dict[str, Any]:
    """The prompts, or with a clip skip their embeddings taken from the text encoder's layer
    ``clip_skip`` from the end (A1111's CLIP_stop_at_last_layers), through its final layer
    norm as A1111 does. diffusers' own ``clip_skip`` reaches for ``text_model``, which
    transformers 5's CLIPTextModel no longer has."""
    if params.clip_skip <= 1:
        return {"prompt": params.prompt, "negative_prompt": params.negative_prompt or None}
    encoder = pipe.text_encoder
    norm = getattr(encoder, "final_layer_norm", None) or encoder.text_model.final_layer_norm

    def embed(text: str) -> Any:
        tokens = pipe.tokenizer(
            text,
            padding="max_length",
            max_length=pipe.tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        ).input_ids.to(encoder.device)
        with torch.no_grad():
            hidden = encoder(tokens, output_hidden_states=True).hidden_states
            return norm(hidden[-params.clip_skip]).to(encoder.dtype)

    return {
        "prompt_embeds": embed(params.prompt),
        "negative_prompt_embeds": embed(params.negative_prompt or ""),
    }


def second_pass_schedule(params: RenderParams) -> int:
    """img2img's num_inference_steps: it runs int(n * strength) of them, so A1111's
    ``hr_second_pass_steps`` k becomes ceil(k / strength) (at most the 1000 training steps)."""
    if params.hires_steps <= 0:
        return params.steps
    return min(1000, math.ceil(params.hires_steps / params.denoising_strength))


def _safety_off(model_index: Path) -> dict[str, Any]:
    """No safety checker (A1111 has none; charforge filters on its own), where one is listed."""
    try:
        index = json.loads(model_index.read_text("utf-8"))
    except (OSError, ValueError):
        return {}
    if "safety_checker" in index:
        return {"safety_checker": None, "requires_safety_checker": False}
    return {}
