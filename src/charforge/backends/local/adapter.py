"""The local backend (``LocalBackend``): checkpoints of a models folder found, hashed and
run with the engine module, one generation at a time, its failures told in charforge's terms.
How it behaves is told in the package's docstring (``charforge.backends.local``)."""

from __future__ import annotations

import hashlib
import logging
import os
import threading
import time
from collections.abc import Callable
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
)
from charforge.backends.identity_rule import asked, without
from charforge.backends.local.availability import (
    INSTALL_HINT,
    LocalEngineUnavailable,
    _load_engine_module,
    missing_engine_packages,
)
from charforge.backends.local.configs import (
    ARCHITECTURE_LABELS,
    SD1,
    detect_architecture,
    ensure_sd15_config,
    find_clip_bpe,
    safetensors_shapes,
)
from charforge.backends.local.keys import CheckpointLayoutError
from charforge.backends.local.models_folder import (
    CACHE_FOLDER,
    HashCache,
    LocalCheckpoint,
    _Stopped,
    match_checkpoint,
    scan_models,
    short_hash,
)
from charforge.backends.local.progress import _StepReport
from charforge.backends.local.settings_plan import (
    hires_size,
    plan_sampler,
    plan_seeds,
    plan_upscaler,
)
from charforge.backends.transport import out_of_memory
from charforge.domain.checkpoints import file_stem
from charforge.domain.requirements import require_capabilities
from charforge.domain.routes import BackendSpec
from charforge.errors import BackendRejected, BackendUnavailable, CheckpointMissing

if TYPE_CHECKING:
    from charforge.backends.local.engine import (
        DiffusersEngine,
        RenderParams,
        SchedulerChoice,
        Upscale,
    )

log = logging.getLogger(__name__)

_LOAD_ATTEMPTS = 3  # reads of a checkpoint that keeps changing on disk while it is loaded
_CLOSE_WAIT = 5.0  # seconds close() waits for an interrupted generation to let go


class LocalCheckpointUnusable(BackendRejected):
    """This checkpoint cannot run on this local backend (architecture without a config
    folder, a file diffusers cannot read); another backend of the pool may run it."""

    backend_specific = True


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
