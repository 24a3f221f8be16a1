"""The local engine: diffusers in this process, checkpoints from a models folder.

A checkpoint is a single ``.safetensors`` (or ``.ckpt``) file or a diffusers folder (one with
a ``model_index.json``) anywhere under the models folder (CHARFORGE_MODELS_DIR, or
``models_dir`` of the backend); its name is its path relative to that folder, as A1111 lists
``anime/diving.safetensors``.

Listing, finding and probing read the folder only: this module imports neither torch nor
diffusers, so a web process (which lists checkpoints and probes in distributed mode) never
loads them. ``generate`` imports ``charforge.backends.local_engine`` on first use; without the
``local`` extra that is a clear error naming ``pip install 'charforge[local]'``.

Behaviour worth knowing:
- one pipeline stays loaded between jobs and is replaced only when another checkpoint is
  asked for, or the same one's weights changed on disk (it is keyed by path and hash, and the
  hash reported is the one of the weights that ran); one generation runs at a time (a lock);
- hashes are A1111's: sha256 of the file (the first 10 hex digits are the short form); for a
  folder the sha256 of its UNet (or transformer) weights. Hashing gigabytes is slow, so hashes
  are kept per (path, size, mtime, ctime) in ``.charforge/hashes.json`` in the models folder
  (or in the user's cache folder when the models folder is read-only);
- ``interrupt`` stops every generate call active when it is called, also one still hashing
  or waiting for the lock, and says False when none was;
- a probe reports the backend down when torch, diffusers or transformers are not installed
  (found without importing them);
- sampler and scheduler names are A1111's and are checked before anything is loaded;
- the high-resolution pass is an img2img pass over the first image upscaled by
  ``hires_scale`` (latents for A1111's "Latent" upscalers, the decoded image otherwise), with
  the components of the loaded pipeline;
- single files need a config folder: ``single_file_config`` of the backend when set, else a
  Stable Diffusion 1.x config written once by charforge (``local_configs``); for any other
  architecture the error says to set ``single_file_config``.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

from charforge.backends.base import (
    BackendRequest,
    BackendResult,
    CheckpointInfo,
    GeneratedImage,
    IdentityUse,
    ProbeResult,
    Progress,
)
from charforge.backends.identity_rule import asked, without
from charforge.backends.local_configs import (
    ARCHITECTURE_LABELS,
    SD1,
    detect_architecture,
    ensure_sd15_config,
    find_clip_bpe,
    safetensors_shapes,
)
from charforge.backends.local_keys import CheckpointLayoutError
from charforge.backends.transport import out_of_memory
from charforge.domain.checkpoints import file_stem, find_checkpoint_named
from charforge.domain.params import seeds_for
from charforge.domain.requirements import require_capabilities
from charforge.domain.routes import BackendSpec
from charforge.errors import (
    BackendRejected,
    BackendUnavailable,
    CheckpointMissing,
    InvalidInput,
)

if TYPE_CHECKING:
    from charforge.backends.local_engine import (
        DiffusersEngine,
        RenderParams,
        SchedulerChoice,
        Upscale,
    )

log = logging.getLogger(__name__)

INSTALL_HINT = "pip install 'charforge[local]'"
ENGINE_PACKAGES = ("torch", "diffusers", "transformers")  # what the local extra installs
CHECKPOINT_SUFFIXES = (".safetensors", ".ckpt")
CACHE_FOLDER = ".charforge"  # in the models folder: hashes, generated configs
_SCAN_DEPTH = 4
_PROGRESS_INTERVAL = 0.2  # seconds between progress reports (each one is a database write)
_LOAD_ATTEMPTS = 3  # reads of a checkpoint that keeps changing on disk while it is loaded
_CLOSE_WAIT = 5.0  # seconds close() waits for an interrupted generation to let go


class LocalEngineUnavailable(BackendUnavailable):
    """torch/diffusers are not installed here, or the device asked for is missing: waiting
    does not help, another backend of the pool may."""

    transient = False
    backend_specific = True


class LocalCheckpointUnusable(BackendRejected):
    """This checkpoint cannot run on this local backend (architecture without a config
    folder, a file diffusers cannot read); another backend of the pool may run it."""

    backend_specific = True


class _Stopped(Exception):
    """The generate call was interrupted before it rendered (while hashing, waiting, loading)."""


# -- A1111 names -> diffusers --------------------------------------------------------------------

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


# -- the models folder ---------------------------------------------------------------------------


@dataclass(frozen=True)
class LocalCheckpoint:
    name: str  # path relative to the models folder, with "/" separators
    path: Path

    @property
    def is_folder(self) -> bool:
        return self.path.is_dir()


def scan_models(models_dir: Path) -> list[LocalCheckpoint]:
    """Single files and diffusers folders under ``models_dir`` (hidden folders skipped)."""
    found: list[LocalCheckpoint] = []
    base_depth = len(models_dir.parts)
    for root, dirs, files in os.walk(models_dir, followlinks=True):
        here = Path(root)
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        if here != models_dir and "model_index.json" in files:
            found.append(LocalCheckpoint(here.relative_to(models_dir).as_posix(), here))
            dirs[:] = []  # its weights are parts of it, not checkpoints
            continue
        if len(here.parts) - base_depth >= _SCAN_DEPTH:
            dirs[:] = []
        for file in sorted(files):
            if file.lower().endswith(CHECKPOINT_SUFFIXES) and not file.startswith("."):
                path = here / file
                found.append(LocalCheckpoint(path.relative_to(models_dir).as_posix(), path))
    return sorted(found, key=lambda c: c.name.lower())


def match_checkpoint(name: str, available: list[LocalCheckpoint]) -> LocalCheckpoint | None:
    return find_checkpoint_named(name, available, lambda c: c.name)


def weight_files(checkpoint: LocalCheckpoint) -> list[Path]:
    """What the hash covers: the file itself, or a folder's UNet (transformer) weights."""
    if not checkpoint.is_folder:
        return [checkpoint.path]
    for component in ("unet", "transformer"):
        folder = checkpoint.path / component
        if folder.is_dir():
            files = sorted(
                p for p in folder.iterdir() if p.suffix in (".safetensors", ".bin") and p.is_file()
            )
            if files:
                return files
    return [checkpoint.path / "model_index.json"]


class HashCache:
    """sha256 of checkpoints, kept per (path, size, mtime, ctime) in memory and in a JSON file.

    The ctime (which no copy tool can set back) catches weights replaced by ones of the same
    size with the old mtime restored (``cp -p``, ``rsync -a``)."""

    def __init__(self, file: Callable[[], Path | None]) -> None:
        self._file = file
        self._lock = threading.Lock()
        self._entries: dict[str, dict[str, str]] | None = None

    @staticmethod
    def _stamp(files: list[Path]) -> str:
        parts = []
        for path in files:
            stat = path.stat()
            parts.append(f"{path.name}:{stat.st_size}:{stat.st_mtime_ns}:{stat.st_ctime_ns}")
        return "|".join(parts)

    def _load(self) -> dict[str, dict[str, str]]:
        if self._entries is None:
            self._entries = {}
            file = self._file()
            if file is not None and file.is_file():
                try:
                    data = json.loads(file.read_text("utf-8"))
                    if isinstance(data, dict):
                        self._entries = {
                            k: v for k, v in data.items() if isinstance(v, dict) and "sha256" in v
                        }
                except (OSError, ValueError):
                    log.warning("ignoring unreadable hash cache %s", file)
        return self._entries

    def cached(self, checkpoint: LocalCheckpoint) -> str | None:
        """The sha256 if known for the checkpoint as it is now; never reads the weights."""
        try:
            stamp = self._stamp(weight_files(checkpoint))
        except OSError:
            return None
        with self._lock:
            entry = self._load().get(str(checkpoint.path))
        return entry["sha256"] if entry and entry.get("stamp") == stamp else None

    def sha256(
        self, checkpoint: LocalCheckpoint, *, stopped: Callable[[], bool] | None = None
    ) -> str:
        """The sha256, from the cache while the files are unchanged; reading them otherwise,
        which raises _Stopped as soon as ``stopped()`` says so."""
        known = self.cached(checkpoint)
        if known is not None:
            return known
        files = weight_files(checkpoint)
        stamp = self._stamp(files)
        digest = hashlib.sha256()
        for path in files:
            with path.open("rb") as handle:
                while chunk := handle.read(8 * 1024 * 1024):
                    if stopped is not None and stopped():
                        raise _Stopped()
                    digest.update(chunk)
        value = digest.hexdigest()
        with self._lock:
            entries = self._load()
            entries[str(checkpoint.path)] = {"stamp": stamp, "sha256": value}
            self._save(entries)
        return value

    def _save(self, entries: dict[str, dict[str, str]]) -> None:
        file = self._file()
        if file is None:
            return
        try:
            file.parent.mkdir(parents=True, exist_ok=True)
            temp = file.with_name(f".{file.name}.{os.getpid()}.{threading.get_ident()}")
            temp.write_text(json.dumps(entries, indent=1, sort_keys=True), encoding="utf-8")
            temp.replace(file)
        except OSError as exc:
            log.warning("could not write the hash cache %s: %s", file, exc)


def short_hash(sha256: str | None) -> str | None:
    return sha256[:10] if sha256 else None


def _load_engine_module() -> ModuleType:
    try:
        from charforge.backends import local_engine
    except ImportError as exc:
        missing = getattr(exc, "name", None) or str(exc)
        raise LocalEngineUnavailable(
            f"The local engine needs torch, diffusers and transformers, which are not "
            f"installed in this Python ({missing} is missing).",
            hint=f"Install them with: {INSTALL_HINT}",
        ) from exc
    return local_engine


def missing_engine_packages() -> list[str]:
    """Which of torch, diffusers and transformers this Python lacks; found without importing
    them (a web process that probes must stay free of torch)."""
    missing = []
    for name in ENGINE_PACKAGES:
        try:
            found = importlib.util.find_spec(name) is not None
        except (ImportError, ValueError):  # a broken install, or a stub in sys.modules
            found = False
        if not found:
            missing.append(name)
    return missing


def plan_seeds(seed: int, count: int) -> list[int]:
    """The seeds of ``count`` images: ``seed``, ``seed + 1``, ... within 0..2**32-1 (as
    A1111's batches), from a random start when ``seed`` is -1."""
    return seeds_for(seed, max(1, count), pick=secrets.randbelow)


class _StepReport:
    """Turns the engine's steps into progress over all images of a call, at most every
    ``_PROGRESS_INTERVAL`` seconds (and always at the end of an image)."""

    def __init__(
        self,
        on_progress: Callable[[Progress], None] | None,
        steps: int,
        second_steps: int,
        images: int,
    ) -> None:
        self.on_progress = on_progress
        self.steps, self.second_steps, self.images = steps, second_steps, images
        self.per_image = steps + second_steps
        self.last = 0.0

    def __call__(self, index: int, pass_index: int, step: int, steps: int) -> None:
        if self.on_progress is None:
            return
        # Each pass counts for its planned steps; within a pass, the share of its own
        # timesteps done (Heun and DPM2 take two per step).
        planned = self.second_steps if pass_index else self.steps
        share = min(1.0, step / (steps or planned))
        in_image = (self.steps + share * self.second_steps) if pass_index else share * self.steps
        final = share >= 1.0 and pass_index == (1 if self.second_steps else 0)
        now = time.monotonic()
        if now - self.last < _PROGRESS_INTERVAL and not final:
            return
        self.last = now
        done = min(1.0, (index * self.per_image + in_image) / (self.images * self.per_image))
        try:
            self.on_progress(Progress(done, round(in_image), self.per_image))
        except Exception:  # progress is informational; never fail the image
            log.exception("progress report failed")


class LocalBackend:
    """Runs checkpoints of a models folder with diffusers, on CUDA when present, else CPU."""

    def __init__(self, spec: BackendSpec, *, probe_timeout: float = 3.0) -> None:
        self.spec = spec
        self._probe_timeout = probe_timeout
        folder = spec.models_dir or Path(spec.url.removeprefix("local:"))
        self.models_dir = folder.expanduser().absolute()
        self._lock = threading.Lock()  # one generation (and one load) at a time
        # One (task, event) per generate call running now (hashing, waiting for the lock,
        # loading or rendering): interrupt(task) sets the event of that task's call, so a
        # cancel that comes before a call takes the lock is not lost, nor does it stop
        # another call.
        self._calls_lock = threading.Lock()
        self._calls: list[tuple[str | None, threading.Event]] = []
        self._engine: DiffusersEngine | None = None
        self.hashes = HashCache(lambda: self.cache_dir() / "hashes.json")

    # -- folders -------------------------------------------------------------------------------

    def cache_dir(self) -> Path:
        """``.charforge`` in the models folder, or a user cache folder where that is read-only."""
        own = self.models_dir / CACHE_FOLDER
        if own.is_dir() and os.access(own, os.W_OK):
            return own
        if self.models_dir.is_dir() and os.access(self.models_dir, os.W_OK):
            return own
        base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
        key = hashlib.sha256(str(self.models_dir).encode()).hexdigest()[:12]
        return base / "charforge" / f"models-{key}"

    def _where(self, style: str | None) -> str:
        what = f"the {style} style's backend" if style else "backend"
        return f"{what} '{self.spec.name}'"

    def _folder_setting(self) -> str:
        return f"models_dir of {self.spec.source} (default: CHARFORGE_MODELS_DIR)"

    def list_checkpoints(self) -> list[LocalCheckpoint]:
        if not self.models_dir.is_dir():
            raise CheckpointMissing(
                f"The models folder {self.models_dir} of local backend '{self.spec.name}' "
                "does not exist.",
                hint=f"Create it and put checkpoints into it, or set {self._folder_setting()}.",
            )
        return scan_models(self.models_dir)

    def _locate(self, name: str, *, style: str) -> LocalCheckpoint:
        available = self.list_checkpoints()
        found = match_checkpoint(name, available)
        if found is None:
            names = ", ".join(c.name for c in available) or "nothing"
            raise CheckpointMissing(
                f"Checkpoint '{name}' for the {style} style is not in the models folder "
                f"{self.models_dir} of local backend '{self.spec.name}'. That folder has: "
                f"{names}.",
                hint=(
                    f"Put {name} (a .safetensors file, or a diffusers folder with a "
                    f"model_index.json) into {self.models_dir}, set {self._folder_setting()} "
                    f"to the folder that has it, or change the route with [routes.{style}] "
                    "checkpoint in CHARFORGE_CONFIG."
                ),
            )
        return found

    # -- ImageBackend ------------------------------------------------------------------------

    def find_checkpoint(self, name: str, *, style: str) -> CheckpointInfo:
        found = self._locate(name, style=style)
        return CheckpointInfo(found.name, found.name, short_hash(self.hashes.sha256(found)))

    def probe(self) -> ProbeResult:
        started = time.perf_counter()
        try:
            available = self.list_checkpoints()
        except Exception as exc:  # any failure means "cannot serve"
            message = getattr(exc, "message", None) or str(exc) or type(exc).__name__
            return ProbeResult(False, None, message)
        latency = (time.perf_counter() - started) * 1000
        listed = [
            CheckpointInfo(c.name, c.name, short_hash(self.hashes.cached(c))) for c in available
        ]
        missing = missing_engine_packages()
        if missing:
            return ProbeResult(
                False,
                None,
                f"Local backend '{self.spec.name}' cannot generate: {', '.join(missing)} "
                f"{'is' if len(missing) == 1 else 'are'} not installed in this Python. "
                f"Install the local engine with: {INSTALL_HINT}",
                listed,
            )
        return ProbeResult(True, latency, None, listed, self.loaded_checkpoint())

    def loaded_checkpoint(self) -> str | None:
        engine = self._engine
        return engine.loaded if engine is not None else None

    @property
    def loads(self) -> int:
        """How many times a checkpoint was read from disk (tests and metrics)."""
        return self._engine.loads if self._engine is not None else 0

    def interrupt(self, task_id: str) -> bool:
        """Stop the generate call of this task, wherever it is (hashing, waiting for the
        lock, loading, rendering); False when none runs."""
        return self._stop_calls(lambda task: task == task_id)

    def _stop_calls(self, which: Callable[[str | None], bool]) -> bool:
        with self._calls_lock:
            active = [event for task, event in self._calls if which(task)]
        for event in active:
            event.set()
        return bool(active)

    def close(self, timeout: float = _CLOSE_WAIT) -> None:
        """Interrupt what runs, then free the pipeline. A generation stops at its next step;
        one that does not let go within ``timeout`` (a load is not interruptible) keeps its
        pipeline only until it returns: the backend no longer holds it."""
        self._stop_calls(lambda _task: True)
        locked = self._lock.acquire(timeout=timeout)
        try:
            engine, self._engine = self._engine, None
            if engine is not None:
                engine.unload()
        finally:
            if locked:
                self._lock.release()
        if not locked:
            log.warning(
                "local backend %s: a generation did not stop within %gs; its pipeline is "
                "freed when it returns",
                self.spec.name,
                timeout,
            )

    # -- generation --------------------------------------------------------------------------

    def _single_file_config(self, checkpoint: LocalCheckpoint, engine: ModuleType) -> Path:
        if self.spec.single_file_config is not None:
            return self.spec.single_file_config
        try:
            if checkpoint.path.suffix.lower() == ".safetensors":
                shapes = safetensors_shapes(checkpoint.path)
            else:
                shapes = engine.checkpoint_shapes(checkpoint.path)
        except Exception as exc:
            raise LocalCheckpointUnusable(
                f"Checkpoint '{checkpoint.name}' on local backend '{self.spec.name}' could not "
                f"be read: {exc}",
                hint="The file may be incomplete or damaged; download it again.",
            ) from exc
        architecture = detect_architecture(shapes)
        if architecture != SD1:
            raise LocalCheckpointUnusable(
                f"Checkpoint '{checkpoint.name}' is {ARCHITECTURE_LABELS[architecture]}; "
                f"local backend '{self.spec.name}' runs single files of Stable Diffusion 1.x "
                "by itself, and other models only with their config files.",
                hint=(
                    f"Set single_file_config in {self.spec.source} to a folder with this "
                    "model's diffusers config and tokenizer files (model_index.json, unet/, "
                    "vae/, text_encoder/, tokenizer/, scheduler/ - no weights needed), or put "
                    "the model into the models folder as a diffusers folder."
                ),
            )
        bpe = find_clip_bpe()
        if bpe is None:
            raise LocalEngineUnavailable(
                "CLIP's tokenizer vocabulary (bpe_simple_vocab_16e6.txt.gz, from the "
                "openai-clip package) is not installed, so single-file checkpoints cannot "
                "be loaded offline.",
                hint=f"Install it with: {INSTALL_HINT}",
            )
        return ensure_sd15_config(self.cache_dir(), bpe)

    def _engine_for(self, module: ModuleType) -> DiffusersEngine:
        if self._engine is None:
            try:
                self._engine = module.DiffusersEngine(self.spec.device)
            except RuntimeError as exc:
                raise LocalEngineUnavailable(
                    f"Local backend '{self.spec.name}': {exc}.",
                    hint=f"Set device of {self.spec.source} to 'auto' or 'cpu', or install a "
                    "CUDA build of torch.",
                ) from exc
        return self._engine

    def generate(self, request: BackendRequest) -> BackendResult:
        stop = request.cancelled or threading.Event()
        call = (request.task_id, stop)
        with self._calls_lock:
            self._calls.append(call)
        try:
            return self._generate(request, stop)
        finally:
            with self._calls_lock:
                self._calls.remove(call)

    def _generate(self, request: BackendRequest, stop: threading.Event) -> BackendResult:
        p = request.params
        # Everything a request can get wrong is refused before anything is loaded.
        identity = self._identity(request)
        require_capabilities(self.spec, p, request.style)
        plan = plan_sampler(p.sampler, p.scheduler)
        upscaler_name, (on_latents, mode, antialias) = plan_upscaler(p.hires_upscaler)
        out_w, out_h = (
            hires_size(p.width, p.height, p.hires_scale) if p.hires else (p.width, p.height)
        )
        checkpoint = self._locate(request.checkpoint.name, style=request.style)
        module = _load_engine_module()
        config = None if checkpoint.is_folder else self._single_file_config(checkpoint, module)

        render_params: RenderParams = module.RenderParams(
            prompt=p.prompt,
            negative_prompt=p.negative_prompt,
            width=p.width,
            height=p.height,
            steps=p.steps,
            cfg_scale=p.cfg_scale,
            hires=p.hires,
            out_width=out_w,
            out_height=out_h,
            denoising_strength=p.denoising_strength,
            hires_steps=p.hires_steps,
            clip_skip=p.clip_skip,
        )
        choice: SchedulerChoice = module.SchedulerChoice(plan.class_name, plan.options, plan.sigmas)
        upscale: Upscale | None = module.Upscale(on_latents, mode, antialias) if p.hires else None
        seeds = plan_seeds(p.seed, request.count)
        second_steps = 0
        if p.hires and p.denoising_strength > 0:  # at 0 the pass only scales
            second_steps = p.hires_steps or max(1, int(p.steps * p.denoising_strength))

        engine: DiffusersEngine | None = None
        sha256: str | None = None
        switched = False
        load_seconds = 0.0
        images: list[GeneratedImage] = []
        extra: dict[str, Any] = {}
        try:
            # Hashing gigabytes is slow: done before the lock (another call may be rendering),
            # and again under it only when the file changed meanwhile.
            self.hashes.sha256(checkpoint, stopped=stop.is_set)
            with self._lock:
                if stop.is_set():
                    raise _Stopped()
                engine = self._engine_for(module)
                started = time.perf_counter()
                sha256, switched = self._load(engine, checkpoint, config, stop)
                load_seconds = time.perf_counter() - started
                report = _StepReport(request.on_progress, p.steps, second_steps, len(seeds))
                for index, seed in enumerate(seeds):
                    if stop.is_set():
                        break

                    def on_step(pass_index: int, step: int, steps: int, index: int = index) -> None:
                        if stop.is_set():
                            raise module.Interrupted()
                        report(index, pass_index, step, steps)
                        if stop.is_set():  # the report may take a while (a database write)
                            raise module.Interrupted()

                    try:
                        data, extra = engine.render(render_params, seed, choice, upscale, on_step)
                    except module.Interrupted:
                        break
                    except Exception as exc:
                        raise self._render_error(checkpoint, exc) from exc
                    images.append(GeneratedImage(data, seed))
        except _Stopped:
            pass  # interrupted before anything was rendered
        interrupted = len(images) < len(seeds)
        info: dict[str, Any] = {
            "seed": seeds[0],
            "all_seeds": seeds[: len(images)] if interrupted else seeds,
            "sd_model_name": file_stem(checkpoint.name),
            "sd_model_hash": short_hash(sha256),
            "sha256": sha256,
            "sampler": plan.sampler,
            "scheduler": plan.schedule,
            "diffusers_scheduler": plan.class_name,
            "sigmas": extra.get("sigmas"),
            "device": engine.device if engine is not None else None,
            "dtype": engine.dtype_name if engine is not None else None,
            "width": out_w,
            "height": out_h,
            "checkpoint_loaded": switched,
            "load_seconds": round(load_seconds, 3) if switched else 0.0,
            "interrupted": interrupted,
        }
        if p.hires:
            info["hires_upscaler"] = upscaler_name
            if upscaler_name.lower() != (p.hires_upscaler or "").strip().lower():
                info["hires_upscaler_asked"] = p.hires_upscaler
                log.warning(
                    "local backend %s has no upscaler %r; used %s",
                    self.spec.name,
                    p.hires_upscaler,
                    upscaler_name,
                )
        return BackendResult(images, checkpoint.name, short_hash(sha256), info, identity=identity)

    def _identity(self, request: BackendRequest) -> IdentityUse | None:
        """No IP-Adapter here yet: refused when asked for, else made without."""
        if not asked(request):
            return None
        return without(
            request,
            self.spec.name,
            "the local engine cannot condition on reference images yet",
            hint="Send identity.strength=0, or add a backend that can (A1111 with ControlNet, "
            "ComfyUI with IPAdapter) to the style's route.",
        )

    def _load(
        self,
        engine: DiffusersEngine,
        checkpoint: LocalCheckpoint,
        config: Path | None,
        stop: threading.Event,
    ) -> tuple[str, bool]:
        """Load the checkpoint as it is on disk now (under the lock); the sha256 of the
        weights in memory, and whether they were read from disk.

        The hash is checked again after loading: when the file changed while it was read,
        what is in memory has no known hash, so it is read again."""
        switched = False
        for _attempt in range(_LOAD_ATTEMPTS):
            sha256 = self.hashes.sha256(checkpoint, stopped=stop.is_set)  # cached: unchanged
            if stop.is_set():
                raise _Stopped()
            try:
                switched = (
                    engine.load(
                        checkpoint.name, checkpoint.path, sha256=sha256, single_file_config=config
                    )
                    or switched
                )
            except Exception as exc:
                raise self._load_error(checkpoint, exc, config) from exc
            if self.hashes.cached(checkpoint) == sha256:
                return sha256, switched
            log.warning(
                "local backend %s: checkpoint %s changed on disk while it was loaded; "
                "loading it again",
                self.spec.name,
                checkpoint.name,
            )
            engine.unload()
        raise BackendUnavailable(
            f"Checkpoint '{checkpoint.name}' of local backend '{self.spec.name}' kept changing "
            f"on disk while it was loaded ({_LOAD_ATTEMPTS} tries).",
            hint="Wait until it is fully copied into the models folder; the job is tried again.",
        )

    def _load_error(
        self, checkpoint: LocalCheckpoint, exc: Exception, config: Path | None
    ) -> Exception:
        if _is_out_of_memory(exc):
            return LocalCheckpointUnusable(
                f"Local backend '{self.spec.name}' ran out of memory loading '{checkpoint.name}'.",
                hint="Free GPU/CPU memory, or run this checkpoint on a bigger machine.",
            )
        detail = f"{type(exc).__name__}: {exc}".strip()[:500]
        hint = "The file may be incomplete or damaged; download it again."
        if isinstance(exc, CheckpointLayoutError):
            # Its message names the file and what is missing; a config folder is no cure.
            detail = str(exc)[:800]
            hint = (
                "Use a complete SD 1.x checkpoint (UNet, VAE and text encoder), or convert this "
                "one to the diffusers folder layout."
            )
        elif config is not None:
            hint = (
                f"It was read with the config folder {config}; if that is not this model's, "
                f"set single_file_config in {self.spec.source} to the right one."
            )
        return LocalCheckpointUnusable(
            f"Local backend '{self.spec.name}' could not load checkpoint '{checkpoint.name}': "
            f"{detail}",
            hint=hint,
        )

    def _render_error(self, checkpoint: LocalCheckpoint, exc: Exception) -> Exception:
        if _is_out_of_memory(exc):
            return BackendRejected(
                f"Local backend '{self.spec.name}' ran out of memory generating with "
                f"'{checkpoint.name}'.",
                hint="Lower width/height or turn the high-resolution pass off.",
            )
        return BackendRejected(
            f"Local backend '{self.spec.name}' failed generating with '{checkpoint.name}': "
            f"{type(exc).__name__}: {exc}"[:600],
            hint="The worker's log has the full traceback.",
        )


def _is_out_of_memory(exc: BaseException) -> bool:
    """torch's OutOfMemoryError by its type, other errors by their text (transport's
    markers: "out of memory", "allocation on device", ...)."""
    return "OutOfMemory" in type(exc).__name__ or out_of_memory(str(exc))
