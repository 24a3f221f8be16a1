"""The simulated WebUI's state: checkpoints, options, the generation queue, progress, records.

Everything here is thread-safe: request handlers run in a thread pool (like A1111's sync
endpoints) and tests read the state from their own thread.
"""

from __future__ import annotations

import base64
import copy
import logging
import threading
import time
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from charforge.simulator.catalog import Checkpoint, find_checkpoint
from charforge.simulator.config import Faults, RecordedRequest, SimulatorSettings
from charforge.simulator.render import Placeholder, png_bytes, render_placeholder
from charforge.simulator.txt2img import (
    A1111_VERSION,
    FORGE_VERSION,
    GenerationError,
    ModelRun,
    Plan,
    Txt2ImgRequest,
    info_json,
    infotext,
    plan_txt2img,
)

log = logging.getLogger("charforge.simulator")

_BASE_OPTIONS: dict[str, Any] = {
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
}
_FORGE_OPTIONS: dict[str, Any] = {
    "forge_preset": "sd",
    "forge_additional_modules": [],
    "forge_unet_storage_dtype": "Automatic",
    "forge_inference_memory": 1024,
    "forge_async_loading": "Queue",
    "forge_pin_shared_memory": "CPU",
}
# Options the simulator computes; a POST cannot set them directly.
_COMPUTED_OPTIONS = ("sd_model_checkpoint", "sd_checkpoint_hash")


@dataclass
class Txt2ImgOutcome:
    """What the HTTP layer should answer for one txt2img call."""

    kind: str  # "ok", "error", "proxy", "malformed", "drop"
    status: int = 200
    body: dict[str, Any] | None = None
    error: GenerationError | None = None


@dataclass
class _Progress:
    job: str = ""
    job_count: int = 0
    job_no: int = 0
    sampling_step: int = 0
    sampling_steps: int = 0
    job_timestamp: str = "0"
    time_start: float = 0.0
    interrupted: bool = False
    skipped: bool = False
    task_id: str | None = None


class SimulatorEngine:
    """All the state of one simulated WebUI."""

    def __init__(self, settings: SimulatorSettings, faults: Faults | None = None) -> None:
        if not settings.models:
            raise ValueError("SimulatorSettings.models needs at least one checkpoint file name")
        self.settings = settings
        self.faults = faults if faults is not None else Faults()
        self._state_lock = threading.RLock()
        # A1111's ``queue_lock``: one generation (or checkpoint load) at a time.
        self._queue_lock = threading.Lock()
        self._wake = threading.Event()  # set by /interrupt and by shutdown
        self._shutting_down = False
        self._checkpoints: list[Checkpoint] = []
        self._selected = ""  # what options.sd_model_checkpoint points to
        self._weights = ""  # the model actually in (simulated) VRAM
        self._options: dict[str, Any] = {}
        self._progress = _Progress()
        self._records: list[RecordedRequest] = []
        self._generations = 0
        self._active = 0  # txt2img requests generating right now
        self._max_active = 0
        self._in_flight = 0  # txt2img requests generating or queued
        self._max_in_flight = 0
        self._checkpoint_loads = 0
        self._task_counter = 0
        self._initial_state()

    def _initial_state(self) -> None:
        """First model loaded (and hashed), default options, no history."""
        self._checkpoints = []
        self.refresh_checkpoints()
        first = self._checkpoints[0]
        first.hashed = True
        self._selected = self._weights = first.name
        self._options = dict(_BASE_OPTIONS)
        if self.settings.flavor == "forge":
            self._options.update(_FORGE_OPTIONS)
        self._progress = _Progress()
        self._records.clear()
        self._generations = self._max_active = self._checkpoint_loads = 0
        self._max_in_flight = self._in_flight  # requests still queued keep counting

    # ----------------------------------------------------------------- introspection

    @property
    def flavor(self) -> str:
        return self.settings.flavor

    @property
    def version(self) -> str:
        return FORGE_VERSION if self.settings.flavor == "forge" else A1111_VERSION

    @property
    def loaded_checkpoint(self) -> str:
        with self._state_lock:
            return self._selected

    @property
    def weights_checkpoint(self) -> str:
        with self._state_lock:
            return self._weights

    @property
    def generations(self) -> int:
        with self._state_lock:
            return self._generations

    @property
    def max_concurrent_generations(self) -> int:
        with self._state_lock:
            return self._max_active

    @property
    def max_in_flight(self) -> int:
        with self._state_lock:
            return self._max_in_flight

    @property
    def checkpoint_loads(self) -> int:
        with self._state_lock:
            return self._checkpoint_loads

    def snapshot(self) -> dict[str, Any]:
        with self._state_lock:
            return {
                "name": self.settings.name,
                "flavor": self.settings.flavor,
                "loaded_checkpoint": self._selected,
                "weights_checkpoint": self._weights,
                "generations": self._generations,
                "max_concurrent_generations": self._max_active,
                "max_in_flight": self._max_in_flight,
                "checkpoint_loads": self._checkpoint_loads,
                "faults": self.faults.as_dict(),
            }

    def reset(self) -> None:
        """Back to the state right after start: faults off, first model loaded, Forge hashes
        forgotten, options at their defaults, counters at zero, no recorded requests.

        A running generation is woken and allowed to finish first.
        """
        self.faults.reset()
        self.interrupt()  # cut a sleeping generation short
        with self._queue_lock, self._state_lock:
            self._initial_state()
            if not self._shutting_down:
                self._wake.clear()

    # ----------------------------------------------------------------- recording

    def record(self, request: RecordedRequest) -> None:
        with self._state_lock:
            self._records.append(request)

    @property
    def requests(self) -> list[RecordedRequest]:
        with self._state_lock:
            return list(self._records)

    def clear_requests(self) -> None:
        with self._state_lock:
            self._records.clear()

    # ----------------------------------------------------------------- checkpoints

    def refresh_checkpoints_queued(self) -> None:
        """``POST /sdapi/v1/refresh-checkpoints``: A1111 takes the queue lock for it."""
        with self._queue_lock:
            self.refresh_checkpoints()

    def refresh_checkpoints(self) -> None:
        """Re-read ``settings.models``; known checkpoints keep their hashed state."""
        with self._state_lock:
            known = {c.name: c for c in self._checkpoints}
            always_hashed = self.settings.flavor == "a1111"
            fresh: list[Checkpoint] = []
            for name in dict.fromkeys(self.settings.models):
                fresh.append(known.get(name) or Checkpoint(name=name, hashed=always_hashed))
            if fresh:
                self._checkpoints = fresh

    def sd_models(self) -> list[dict[str, Any]]:
        with self._state_lock:
            return [c.api_item() for c in self._checkpoints]

    def _checkpoint(self, name: str) -> Checkpoint:
        for checkpoint in self._checkpoints:
            if checkpoint.name == name:
                return checkpoint
        # Removed by a refresh while selected: keep answering about it.
        return Checkpoint(name=name, hashed=self.settings.flavor == "a1111")

    def find(self, wanted: str | None) -> Checkpoint | None:
        with self._state_lock:
            return find_checkpoint(self._checkpoints, wanted)

    def _load_weights(self, name: str) -> None:
        """Put ``name`` in VRAM (caller holds the queue lock). Loading hashes it."""
        with self._state_lock:
            if self._weights == name:
                return
            delay = self.faults.switch_delay_seconds
        if delay > 0:
            self._sleep(delay)
        with self._state_lock:
            self._weights = name
            self._checkpoint(name).hashed = True
            self._checkpoint_loads += 1
        log.info("simulator loaded checkpoint %s", name)

    # ----------------------------------------------------------------- options

    def options(self) -> dict[str, Any]:
        with self._state_lock:
            selected = self._checkpoint(self._selected)
            weights = self._checkpoint(self._weights)
            return {
                **self._options,
                "sd_model_checkpoint": selected.title,
                "sd_checkpoint_hash": weights.sha256,
            }

    def set_options(self, values: dict[str, Any]) -> GenerationError | None:
        """``POST /sdapi/v1/options``; loading a checkpoint waits for the running generation."""
        wanted = values.get("sd_model_checkpoint")
        target: Checkpoint | None = None
        if wanted is not None:
            target = self.find(str(wanted))
            if target is None:
                return GenerationError("RuntimeError", f"model {wanted!r} not found")
        with self._state_lock:
            for key, value in values.items():
                if key not in _COMPUTED_OPTIONS:
                    self._options[key] = value
        if target is not None:
            with self._queue_lock:
                self._arm_wake()
                self._load_weights(target.name)
                with self._state_lock:
                    self._selected = target.name
        return None

    # ----------------------------------------------------------------- progress

    def progress(self) -> dict[str, Any]:
        """``GET /sdapi/v1/progress``, computed the way A1111's ``progressapi`` does."""
        with self._state_lock:
            p = self._progress
            state = {
                "skipped": p.skipped,
                "interrupted": p.interrupted,
                "stopping_generation": False,
                "job": p.job,
                "job_count": p.job_count,
                "job_timestamp": p.job_timestamp,
                "job_no": p.job_no,
                "sampling_step": p.sampling_step,
                "sampling_steps": p.sampling_steps,
            }
            if p.job_count == 0:
                return {
                    "progress": 0.0,
                    "eta_relative": 0.0,
                    "state": state,
                    "current_image": None,
                    "textinfo": None,
                    "current_task": None,
                }
            progress = 0.01
            if p.job_count > 0:
                progress += p.job_no / p.job_count
            if p.sampling_steps > 0:
                progress += 1 / p.job_count * p.sampling_step / p.sampling_steps
            elapsed = time.monotonic() - p.time_start
            eta_relative = elapsed / progress - elapsed
            return {
                "progress": min(progress, 1.0),
                "eta_relative": eta_relative,
                "state": state,
                "current_image": None,
                "textinfo": None,
                "current_task": p.task_id,
            }

    def interrupt(self) -> None:
        with self._state_lock:
            if self._progress.job:
                self._progress.interrupted = True
                self._wake.set()

    def resume(self) -> None:
        """Undo ``shutdown`` (the server is starting again)."""
        with self._state_lock:
            self._shutting_down = False
            self._wake.clear()

    def shutdown(self) -> None:
        """Wake every sleeping generation so that the server can stop quickly."""
        with self._state_lock:
            self._shutting_down = True
        self._wake.set()

    def _sleep(self, seconds: float) -> None:
        """Sleep, but wake early on interrupt or shutdown."""
        self._wake.wait(timeout=seconds)

    def _stopped_early(self) -> bool:
        with self._state_lock:
            return self._progress.interrupted or self._shutting_down

    # ----------------------------------------------------------------- txt2img

    def txt2img(self, req: Txt2ImgRequest) -> Txt2ImgOutcome:
        """Run one ``POST /sdapi/v1/txt2img`` (blocking; call from a worker thread)."""
        with self._state_lock:
            self._in_flight += 1
            self._max_in_flight = max(self._max_in_flight, self._in_flight)
        try:
            with self._queue_lock:
                with self._state_lock:
                    self._active += 1
                    self._max_active = max(self._max_active, self._active)
                try:
                    return self._txt2img_locked(req)
                finally:
                    with self._state_lock:
                        self._active -= 1
        finally:
            with self._state_lock:
                self._in_flight -= 1

    def _arm_wake(self) -> None:
        """Forget an old interrupt before sleeping again (caller holds the queue lock)."""
        with self._state_lock:
            if not self._shutting_down:
                self._wake.clear()

    def _begin_job(self, steps: int, n_iter: int, task_id: str) -> None:
        self._arm_wake()
        with self._state_lock:
            self._progress = _Progress(
                job="scripts_txt2img",
                job_count=n_iter,
                sampling_steps=steps,
                job_timestamp=datetime.now().strftime("%Y%m%d%H%M%S"),
                time_start=time.monotonic(),
                task_id=task_id,
            )

    def _end_job(self) -> None:
        with self._state_lock:
            p = self._progress
            self._progress = _Progress(job_timestamp=p.job_timestamp, interrupted=p.interrupted)

    def _txt2img_locked(self, req: Txt2ImgRequest) -> Txt2ImgOutcome:
        faults = copy.copy(self.faults)
        with self._state_lock:
            self._task_counter += 1
            task_id = req.force_task_id or f"task(sim{self._task_counter:06d})"
        steps = req.steps if isinstance(req.steps, int) and req.steps > 0 else 1
        n_iter = req.n_iter if isinstance(req.n_iter, int) and req.n_iter > 0 else 1
        self._begin_job(steps, n_iter, task_id)
        try:
            if faults.fail_status is not None or faults.drop_connection:
                self._wait_generating(faults.delay_seconds, n_iter, steps)
                if faults.drop_connection:
                    return Txt2ImgOutcome("drop")
                status = faults.fail_status or 500
                if status in (502, 524):
                    return Txt2ImgOutcome("proxy", status=status)
                error = GenerationError("RuntimeError", faults.fail_message, status)
                return Txt2ImgOutcome("error", status=status, error=error)
            try:
                body = self._generate(req, faults, n_iter, steps)
            except GenerationError as exc:
                return Txt2ImgOutcome("error", status=exc.status, error=exc)
            with self._state_lock:
                self._generations += 1
            if faults.malformed_json:
                return Txt2ImgOutcome("malformed")
            if faults.broken_image and body["images"]:
                broken = b"<html><body>502 Bad Gateway</body></html>\x00not a png"
                body["images"][0] = base64.b64encode(broken).decode()
            return Txt2ImgOutcome("ok", body=body)
        finally:
            self._end_job()

    def _wait_generating(self, seconds: float, n_iter: int, steps: int) -> int:
        """Pretend to sample for ``seconds``; returns how many iterations finished."""
        if seconds <= 0:
            return n_iter
        deadline = time.monotonic() + seconds
        per_iteration = seconds / n_iter
        for iteration in range(n_iter):
            with self._state_lock:
                self._progress.job_no = iteration
            iteration_end = deadline - (n_iter - iteration - 1) * per_iteration
            while True:
                now = time.monotonic()
                if now >= iteration_end or self._stopped_early():
                    break
                done = 1 - (iteration_end - now) / per_iteration
                with self._state_lock:
                    self._progress.sampling_step = min(int(done * steps), steps)
                self._sleep(min(0.02, iteration_end - now))
            if self._stopped_early():
                return iteration + 1  # A1111 finishes the batch it was on, then stops
        return n_iter

    def _select_for_request(
        self, req: Txt2ImgRequest, faults: Faults
    ) -> tuple[str, dict[str, Any], dict[str, Any]]:
        """Apply ``override_settings``; returns (model to run, options restore, clean overrides)."""
        overrides = dict(req.override_settings or {})
        wanted = overrides.get("sd_model_checkpoint")
        with self._state_lock:
            stored = {k: self._options[k] for k in overrides if k in self._options}
            stored["sd_model_checkpoint"] = self._selected
            target = self.find(str(wanted)) if wanted is not None else None
            if wanted is not None and (target is None or faults.ignore_checkpoint):
                if target is None:
                    log.warning("checkpoint %r not found; keeping %s", wanted, self._selected)
                    overrides.pop("sd_model_checkpoint", None)
                target = None
            if target is not None:
                self._selected = target.name
            for key, value in overrides.items():
                if key not in _COMPUTED_OPTIONS:
                    self._options[key] = value
            return self._selected, stored, overrides

    def _restore(self, stored: dict[str, Any]) -> None:
        with self._state_lock:
            for key, value in stored.items():
                if key == "sd_model_checkpoint":
                    self._selected = value
                else:
                    self._options[key] = value

    def _generate(
        self, req: Txt2ImgRequest, faults: Faults, n_iter: int, steps: int
    ) -> dict[str, Any]:
        plan = plan_txt2img(req)
        model_name, stored, overrides = self._select_for_request(req, faults)
        try:
            self._load_weights(model_name)
            if (
                self.settings.flavor == "forge"
                and plan.enable_hr
                and getattr(req, "hr_additional_modules", None) is None
            ):
                raise GenerationError("TypeError", "argument of type 'NoneType' is not iterable")
            finished = self._wait_generating(faults.delay_seconds, n_iter, steps)
            with self._state_lock:
                checkpoint = self._checkpoint(model_name)
                run = ModelRun(checkpoint.name_for_extra, checkpoint.shorthash)
                clip_skip = int(self._options.get("CLIP_stop_at_last_layers", 1) or 1)
                job_timestamp = self._progress.job_timestamp
            count = plan.batch_size * min(finished, plan.n_iter)
            texts = [infotext(plan, i, run, clip_skip, self.version) for i in range(count)]
            images = [self._image(plan, i, checkpoint.name, texts[i]) for i in range(count)]
        finally:
            if req.override_settings_restore_afterwards is not False:
                self._restore(stored)
        parameters = req.model_dump()
        if req.override_settings is not None:
            # A1111 pops an unknown checkpoint out of the very dict it echoes back.
            parameters["override_settings"] = overrides
        return {
            "images": images if req.send_images is not False else [],
            "parameters": parameters,
            "info": info_json(
                plan,
                run,
                infotexts=texts,
                clip_skip=clip_skip,
                job_timestamp=job_timestamp,
                version=self.version,
            ),
        }

    @staticmethod
    def _image(plan: Plan, index: int, checkpoint: str, text: str) -> str:
        spec = Placeholder(
            width=plan.output_width,
            height=plan.output_height,
            seed=plan.seeds[index],
            checkpoint=checkpoint,
            sampler=plan.sampler_name,
            steps=plan.steps,
            cfg_scale=plan.cfg_scale,
            prompt=plan.prompt,
            first_pass=(plan.width, plan.height) if plan.enable_hr else None,
        )
        return base64.b64encode(png_bytes(render_placeholder(spec), text)).decode("ascii")
