"""The simulated WebUI's state: checkpoints, options, LoRAs, the generation queue, records.

Everything here is thread-safe: request handlers run in a thread pool (like A1111's sync
endpoints) and tests read the state from their own thread. ``shared.state`` and the per-task
tracking of ``modules/progress.py`` live in ``state.WebUIState``.
"""

from __future__ import annotations

import base64
import dataclasses
import logging
import threading
from dataclasses import dataclass
from typing import Any

from PIL import Image

from charforge.simulator.alwayson import check_alwayson_scripts
from charforge.simulator.catalog import known_upscaler
from charforge.simulator.config import Faults, RecordedRequest, SimulatorSettings
from charforge.simulator.controlnet import ControlNetRun, controlnet_for, with_controlnet
from charforge.simulator.loras import AppliedLora
from charforge.simulator.models import ModelState, Selection
from charforge.simulator.render import Placeholder, photo_picture, png_bytes, render_placeholder
from charforge.simulator.state import IterationResult, WebUIState, create_task_id
from charforge.simulator.txt2img import (
    A1111_VERSION,
    FORGE_VERSION,
    NAN_MESSAGE,
    GenerationError,
    Plan,
    Txt2ImgRequest,
    info_json,
    infotext,
    plan_txt2img,
)

log = logging.getLogger("charforge.simulator")


@dataclass
class Txt2ImgOutcome:
    """What the HTTP layer should answer for one txt2img call."""

    kind: str  # "ok", "error", "proxy", "malformed", "drop"
    status: int = 200
    body: dict[str, Any] | None = None
    error: GenerationError | None = None


class SimulatorEngine:
    """All the state of one simulated WebUI."""

    def __init__(self, settings: SimulatorSettings, faults: Faults | None = None) -> None:
        if not settings.models:
            raise ValueError("SimulatorSettings.models needs at least one checkpoint file name")
        self.faults = faults if faults is not None else Faults()
        self.webui = WebUIState()
        self.models = ModelState(settings)
        self._state_lock = threading.RLock()
        # A1111's ``queue_lock``: one generation (or checkpoint load) at a time.
        self._queue_lock = threading.Lock()
        self._records: list[RecordedRequest] = []
        self._generations = 0
        self._active = 0  # txt2img requests generating right now
        self._max_active = 0
        self._in_flight = 0  # txt2img requests generating or queued
        self._max_in_flight = 0
        self._images_made = 0  # pictures generated since reset (indexes photo_outputs)
        self._controlnet_units: list[list[dict[str, Any]]] = []

    def _initial_state(self) -> None:
        """First model loaded (and hashed), default options, no history."""
        self.models.reset()
        self.webui.reset()
        self._records.clear()
        self._generations = self._max_active = 0
        self._images_made = 0
        self._controlnet_units.clear()
        self._max_in_flight = self._in_flight  # requests still queued keep counting

    # ----------------------------------------------------------------- introspection

    @property
    def settings(self) -> SimulatorSettings:
        return self.models.settings

    @settings.setter
    def settings(self, value: SimulatorSettings) -> None:
        self.models.settings = value

    @property
    def flavor(self) -> str:
        return self.settings.flavor

    @property
    def version(self) -> str:
        return FORGE_VERSION if self.settings.flavor == "forge" else A1111_VERSION

    @property
    def loaded_checkpoint(self) -> str:
        return self.models.selected

    @property
    def weights_checkpoint(self) -> str:
        return self.models.weights

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
        return self.models.loads

    @property
    def controlnet_units(self) -> list[list[dict[str, Any]]]:
        """Per txt2img that reached ControlNet (extension installed, units parsed), one record
        per enabled unit: ``unit`` (N), ``slot``, module, model, ``model_resolved``, weight,
        ``image_sha256``, ``image_size``, ``applied`` and ``skipped`` (why not applied)."""
        with self._state_lock:
            return [[dict(unit) for unit in units] for units in self._controlnet_units]

    @property
    def failed_checkpoint_loads(self) -> list[dict[str, Any]]:
        return self.models.failed_loads

    def snapshot(self) -> dict[str, Any]:
        with self._state_lock:
            return {
                "name": self.settings.name,
                "flavor": self.settings.flavor,
                "loaded_checkpoint": self.models.selected,
                "weights_checkpoint": self.models.weights,
                "generations": self._generations,
                "max_concurrent_generations": self._max_active,
                "max_in_flight": self._max_in_flight,
                "checkpoint_loads": self.models.loads,
                "failed_checkpoint_loads": self.models.failed_loads,
                "controlnet_units": [[dict(u) for u in units] for units in self._controlnet_units],
                "loras": [item["name"] for item in self.models.loras()],
                "faults": self.faults.as_dict(),
                **self.webui.snapshot(),
            }

    def reset(self) -> None:
        """Back to the state right after start: faults off, first model loaded, Forge hashes
        forgotten, options at their defaults, counters and task history empty, no recorded
        requests. A running generation is interrupted and allowed to finish first."""
        self.faults.reset()
        self.webui.interrupt()  # cut a sleeping generation short
        with self._queue_lock, self._state_lock:
            self._initial_state()

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

    # ----------------------------------------------------------------- checkpoints, options

    def refresh_checkpoints_queued(self) -> None:
        """``POST /sdapi/v1/refresh-checkpoints``: A1111 takes the queue lock for it."""
        with self._queue_lock:
            self.models.refresh_checkpoints()

    def refresh_checkpoints(self) -> None:
        self.models.refresh_checkpoints()

    def sd_models(self) -> list[dict[str, Any]]:
        return self.models.sd_models()

    def refresh_loras(self) -> None:
        """``POST /sdapi/v1/refresh-loras``: re-read ``settings.loras``."""
        self.models.refresh_loras()

    def loras(self) -> list[dict[str, Any]]:
        """``GET /sdapi/v1/loras``."""
        return self.models.loras()

    def options(self) -> dict[str, Any]:
        return self.models.options()

    def _load(self, name: str, faults: Faults, via: str) -> None:
        self.models.load(name, faults, via, lambda s: self.webui.pause(s, interruptible=False))

    def set_options(self, values: dict[str, Any]) -> GenerationError | None:
        """``POST /sdapi/v1/options``; loading a checkpoint waits for the running generation.

        A checkpoint that fails to load does not fail the request: A1111's ``opts.set`` logs
        the error, puts the old value back and the call answers ``null`` as usual. Forge only
        records the choice (it loads lazily), so its next generation fails instead.
        """
        wanted = values.get("sd_model_checkpoint")
        target = self.models.find(str(wanted)) if wanted is not None else None
        if wanted is not None and target is None:
            return GenerationError("RuntimeError", f"model {wanted!r} not found")
        self.models.set_plain_options(values)
        if target is None:
            return None
        faults = self._faults_snapshot()
        if self.settings.flavor == "forge" and target.name in faults.corrupt_checkpoints:
            self.models.select(Selection(target.name, str(wanted)))
            return None
        with self._queue_lock:
            try:
                self._load(target.name, faults, via="options")
            except GenerationError as exc:
                log.error("changing setting sd_model_checkpoint to %s: %s", wanted, exc.message)
                return None
            self.models.select(Selection(target.name))
        return None

    # ----------------------------------------------------------------- progress and control

    def progress(self) -> dict[str, Any]:
        """``GET /sdapi/v1/progress``."""
        return self.webui.sdapi_progress()

    def internal_progress(self, id_task: str | None, id_live_preview: int = -1) -> dict[str, Any]:
        """``POST /internal/progress``; raises ``InternalProgressError`` like A1111 can."""
        return self.webui.internal_progress(id_task, id_live_preview)

    def interrupt(self) -> None:
        self.webui.interrupt()

    def skip(self) -> None:
        self.webui.skip()

    def resume(self) -> None:
        """Undo ``shutdown`` (the server is starting again)."""
        self.webui.resume()

    def shutdown(self) -> None:
        """Wake every sleeping generation so that the server can stop quickly."""
        self.webui.shutdown()

    def _faults_snapshot(self) -> Faults:
        f = self.faults
        return dataclasses.replace(
            f, nan_prompts=list(f.nan_prompts), corrupt_checkpoints=list(f.corrupt_checkpoints)
        )

    # ----------------------------------------------------------------- txt2img

    def txt2img(self, req: Txt2ImgRequest) -> Txt2ImgOutcome:
        """Run one ``POST /sdapi/v1/txt2img`` (blocking; call from a worker thread).

        Like ``Api.text2imgapi``: the task is queued before waiting for the queue lock, then
        ``state.begin()`` and ``start_task``; ``finish_task`` only after a normal return, so a
        task that failed stays ``current_task`` until the next one starts.
        """
        task_id = req.force_task_id or create_task_id("txt2img")
        refused = check_alwayson_scripts(req.alwayson_scripts, controlnet=self.settings.controlnet)
        if refused is not None:  # init_script_args raises before the task is queued
            return Txt2ImgOutcome("error", status=refused.status, error=refused)
        self.webui.add_pending(task_id)
        with self._state_lock:
            self._in_flight += 1
            self._max_in_flight = max(self._max_in_flight, self._in_flight)
        try:
            with self._queue_lock:
                with self._state_lock:
                    self._active += 1
                    self._max_active = max(self._max_active, self._active)
                try:
                    return self._run_task(req, task_id)
                finally:
                    with self._state_lock:
                        self._active -= 1
        finally:
            with self._state_lock:
                self._in_flight -= 1

    def _run_task(self, req: Txt2ImgRequest, task_id: str) -> Txt2ImgOutcome:
        faults = self._faults_snapshot()
        run: dict[str, Any] = {"task": task_id}
        self.webui.begin("scripts_txt2img")
        self.webui.start_task(task_id)
        try:
            outcome = self._process(req, task_id, faults, run)
            if outcome.kind != "error":
                self.webui.finish_task(task_id)
            return outcome
        finally:
            self.webui.end()
            self.webui.record_run(task_id, run)

    def _process(
        self, req: Txt2ImgRequest, task_id: str, faults: Faults, run: dict[str, Any]
    ) -> Txt2ImgOutcome:
        if faults.fail_status is not None or faults.drop_connection:
            steps = req.steps if isinstance(req.steps, int) and req.steps > 0 else 1
            n_iter = req.n_iter if isinstance(req.n_iter, int) and req.n_iter > 0 else 1
            self.webui.sample(
                task_id, n_iter=n_iter, steps=steps, hires_steps=None, seconds=faults.delay_seconds
            )
            if faults.drop_connection:
                run["outcome"] = "fault: dropped connection"
                return Txt2ImgOutcome("drop")
            status = faults.fail_status or 500
            run["outcome"] = f"fault: HTTP {status}"
            if status in (502, 524):
                return Txt2ImgOutcome("proxy", status=status)
            error = GenerationError("RuntimeError", faults.fail_message, status)
            return Txt2ImgOutcome("error", status=status, error=error)
        try:
            body = self._generate(req, task_id, faults, run)
        except GenerationError as exc:
            run.update(outcome="error", error=exc.error)
            return Txt2ImgOutcome("error", status=exc.status, error=exc)
        with self._state_lock:
            self._generations += 1
        if faults.malformed_json:
            return Txt2ImgOutcome("malformed")
        if faults.broken_image and body["images"]:
            broken = b"<html><body>502 Bad Gateway</body></html>\x00not a png"
            body["images"][0] = base64.b64encode(broken).decode()
        return Txt2ImgOutcome("ok", body=body)

    def _generate(
        self, req: Txt2ImgRequest, task_id: str, faults: Faults, run: dict[str, Any]
    ) -> dict[str, Any]:
        """``process_images``: overrides, checkpoint load, LoRAs, sampling, the answer."""
        plan = plan_txt2img(req)
        overrides = self.models.apply_overrides(
            req.override_settings or {}, faults.ignore_checkpoint
        )
        model_name = overrides.model
        run.update(
            checkpoint=model_name,
            sampler_name=plan.sampler_name,
            schedule_type=plan.schedule_label,
            seeds=list(plan.seeds),
            steps=plan.steps,
            hires_steps=plan.hires_steps,
        )
        try:
            self._load(model_name, faults, via="txt2img")
            upscaler = req.hr_upscaler
            extra = list(self.settings.upscalers)
            if plan.enable_hr and upscaler is not None and not known_upscaler(upscaler, extra):
                # A1111 1.10 raises this when the pass starts: HTTP 500, nothing is made.
                raise GenerationError("Exception", f"could not find upscaler named {upscaler}")
            if (
                self.settings.flavor == "forge"
                and plan.enable_hr
                and getattr(req, "hr_additional_modules", None) is None
            ):
                raise GenerationError("TypeError", "argument of type 'NoneType' is not iterable")
            settings = self.settings
            controlnet = controlnet_for(
                req.alwayson_scripts,
                installed=settings.controlnet,
                models=settings.controlnet_models,
            )
            plan.extra_generation_params = with_controlnet(plan.extra_generation_params, controlnet)
            if controlnet is not None:
                records = controlnet.records()
                run["controlnet"] = records
                with self._state_lock:
                    self._controlnet_units.append(records)
            applied: list[AppliedLora] = []
            hashes: str | None = None
            if not req.disable_extra_networks:
                applied, hashes = self.models.activate_loras(plan.prompt)
            if hashes:
                plan.extra_generation_params["Lora hashes"] = hashes
            run["loras"] = [
                {"name": a.lora.name, "te": a.tag.te, "unet": a.tag.unet} for a in applied
            ]
            nan = any(text and text in plan.prompt for text in faults.nan_prompts)
            iterations = self.webui.sample(
                task_id,
                n_iter=plan.n_iter,
                steps=plan.steps,
                hires_steps=plan.hires_steps,
                seconds=faults.delay_seconds,
                fail_first_step=GenerationError("NansException", NAN_MESSAGE) if nan else None,
            )
            model = self.models.model_run(model_name)
            clip_skip = int(self.models.option("CLIP_stop_at_last_layers", 1) or 1)
            made = [it for it in iterations for _ in range(plan.batch_size)]
            texts = [infotext(plan, i, model, clip_skip, self.version) for i in range(len(made))]
            render_keys = tuple(sorted(key for a in applied if (key := a.render_key)))
            images = [
                self._image(plan, i, model_name, texts[i], render_keys, it, controlnet)
                for i, it in enumerate(made)
            ]
            if controlnet is not None:
                maps = controlnet.detected_maps((plan.width, plan.height))
                images += [base64.b64encode(png_bytes(m, None)).decode("ascii") for m in maps]
        finally:
            if req.override_settings_restore_afterwards is not False:
                self.models.restore(overrides)
        reasons = {p.stopped_by for it in iterations for p in (it.first, it.hires) if p}
        interrupted = len(iterations) < plan.n_iter or bool(reasons - {None, "skipped"})
        run.update(
            steps_finished=[it.first.done for it in made],
            hires_steps_finished=[it.hires.done if it.hires else None for it in made],
            images=len(made),
            outcome="interrupted" if interrupted else "finished",
        )
        parameters = req.model_dump()
        if req.override_settings is not None:
            # A1111 pops an unknown checkpoint out of the very dict it echoes back.
            parameters["override_settings"] = overrides.echoed
        return {
            "images": images if req.send_images is not False else [],
            "parameters": parameters,
            "info": info_json(
                plan,
                model,
                infotexts=texts or [infotext(plan, 0, model, clip_skip, self.version)],
                clip_skip=clip_skip,
                job_timestamp=self.webui.job_timestamp,
                version=self.version,
            ),
        }

    def _image(
        self,
        plan: Plan,
        index: int,
        checkpoint: str,
        text: str,
        loras: tuple[str, ...],
        it: IterationResult,
        controlnet: ControlNetRun | None,
    ) -> str:
        hires = it.hires is not None  # an interrupt in the first pass skips the hires pass
        stopped: tuple[int, int] | None = None
        if it.first.stopped_by is not None:
            stopped = (it.first.done, it.first.total)
        elif it.hires is not None and it.hires.stopped_by is not None:
            stopped = (it.hires.done, it.hires.total)
        spec = Placeholder(
            width=plan.output_width if hires else plan.width,
            height=plan.output_height if hires else plan.height,
            seed=plan.seeds[index],
            checkpoint=checkpoint,
            sampler=plan.sampler_name,
            steps=plan.steps,
            cfg_scale=plan.cfg_scale,
            prompt=plan.prompt,
            first_pass=(plan.width, plan.height) if hires else None,
            loras=loras,
            stopped_at=stopped,
        )
        picture = self._picture(spec)
        if controlnet is not None:
            picture = controlnet.apply(picture)
        return base64.b64encode(png_bytes(picture, text)).decode("ascii")

    def _picture(self, spec: Placeholder) -> Image.Image:
        """The placeholder, or the next of ``settings.photo_outputs`` when there are some."""
        photos = self.settings.photo_outputs
        with self._state_lock:
            number = self._images_made
            self._images_made += 1
        if not photos:
            return render_placeholder(spec)
        chosen = min(number, len(photos) - 1)
        try:
            return photo_picture(photos[chosen], spec.width, spec.height)
        except ValueError as exc:
            raise GenerationError("RuntimeError", f"photo_outputs[{chosen}]: {exc}") from exc
