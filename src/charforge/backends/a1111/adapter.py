"""AUTOMATIC1111 / Forge WebUI over its HTTP API (``/sdapi/v1``).

Facts this adapter is built on (DESIGN.md section 5, shared/reference/real-webuis.md):
- the checkpoint is chosen per request with ``override_settings.sd_model_checkpoint``, and
  ``override_settings_restore_afterwards: false`` keeps it loaded for the next request;
- an unknown checkpoint, sampler or LoRA is silently replaced or ignored, so names are checked
  against ``/sd-models``, ``/samplers``, ``/schedulers`` and ``/loras`` first and the model
  that ran is checked after; A1111 also takes the combined "DPM++ 2M Karras" form;
- A1111's defaults differ from ours (50 steps, CFG 7), so every parameter is sent;
- progress and interrupt are global; each request names its task (``force_task_id``) and
  ``POST /internal/progress`` says which task is active, so that its progress, cancel and
  timeout touch only it (tasks.py; with ``--nowebui`` that route is missing, see there);
- an interrupted run still answers 200 with a half-made picture: the WebUI's interrupted and
  skipped flags are watched while the task runs and read right after it, before anything
  else is sent, and such a result is never handed back as a success;
- NaNs in the output and an unreadable checkpoint fail again on the same WebUI (wire.py);
- Forge's hires pass raises ``TypeError`` unless ``hr_additional_modules`` is a list;
- errors arrive as ``{"error", "detail", "body", "errors"}`` (Forge: ``message``);
- ``/sd-models`` may report no hash until a checkpoint was loaded once;
- identity conditioning goes through the ControlNet extension (controlnet.py).
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from dataclasses import replace

import httpx

from charforge.backends.a1111.client import A1111Client
from charforge.backends.a1111.controlnet import (
    ControlNetProbe,
    script_missing,
    units_reported,
    with_units,
)
from charforge.backends.a1111.names import WebUINames
from charforge.backends.a1111.tasks import TaskStatus, TaskWatch, Watcher, WebUIState
from charforge.backends.a1111.wire import parse_txt2img, txt2img_payload
from charforge.backends.base import (
    BackendRequest,
    BackendResult,
    CheckpointInfo,
    NameLists,
    ProbeResult,
)
from charforge.backends.transport import capitalized
from charforge.domain.capabilities import Capability
from charforge.domain.checkpoints import find_checkpoint_named, strip_hash
from charforge.domain.routes import BackendSpec
from charforge.domain.samplers import NameBook, resolve
from charforge.errors import (
    BackendBadResponse,
    BackendInterrupted,
    BackendRejected,
    BackendTimeout,
    BackendUnavailable,
    CheckpointMissing,
)

log = logging.getLogger(__name__)
# A checkpoint seen in /sd-models is trusted this long; the check after generation still
# catches one that vanished meanwhile (A1111 would fall back, and the image is refused).
_CHECKPOINT_CACHE_SECONDS = 10.0
_PROGRESS_INTERVAL = 0.5
# How long a task given up on (timeout) is watched, to be stopped once it starts.
_REAP_SECONDS = 600.0


class A1111Backend:
    def __init__(self, spec: BackendSpec, *, probe_timeout: float = 3.0) -> None:
        self.spec = spec
        self._probe_timeout = probe_timeout
        self._http = A1111Client(spec, probe_timeout=probe_timeout)
        self._client = self._http.http
        self.names = WebUINames(spec, self._http)
        self._listed: tuple[float, list[CheckpointInfo]] | None = None
        self._watcher = Watcher(
            spec.name,
            read_state=self.read_state,
            read_status=self.task_status,
            interval=_PROGRESS_INTERVAL,
        )
        # Held while deciding whether to interrupt and while checking a finished task, so a
        # cancel never lands on the task that follows in this process.
        self._control = threading.Lock()
        self._has_task_route: bool | None = None  # POST /internal/progress (not --nowebui)
        self.controlnet = ControlNetProbe(spec, self._http)

    def close(self) -> None:
        self._watcher.close()
        self._http.close()

    def _where(self, style: str | None) -> str:
        return self._http.where(style)

    # -- checkpoints -----------------------------------------------------------------------

    def list_checkpoints(
        self, *, style: str | None = None, timeout: float | None = None
    ) -> list[CheckpointInfo]:
        response = self._http.call("GET", "/sdapi/v1/sd-models", style=style, timeout=timeout)
        items = self._http.json(response, style)
        if not isinstance(items, list):
            raise BackendBadResponse(f"{self._where(style)} sent a malformed model list.")
        result = []
        for item in items:
            if not isinstance(item, dict) or not isinstance(item.get("title"), str):
                continue
            short = item.get("hash") or (item.get("sha256") or "")[:10] or None
            result.append(CheckpointInfo(strip_hash(item["title"]), item["title"], short))
        return result

    def find_checkpoint(self, name: str, *, style: str) -> CheckpointInfo:
        cached = self._listed
        if cached and time.monotonic() - cached[0] < _CHECKPOINT_CACHE_SECONDS:
            found = _match(name, cached[1])
            if found is not None:
                return found
        available = self.list_checkpoints(style=style)
        found = _match(name, available)
        if found is None:
            # A file dropped into the models folder shows up only after a refresh.
            self._http.call("POST", "/sdapi/v1/refresh-checkpoints", style=style)
            available = self.list_checkpoints(style=style)
            found = _match(name, available)
        if found is None:
            names = ", ".join(c.name for c in available) or "none"
            raise CheckpointMissing(
                f"Checkpoint '{name}' for the {style} style is not on backend "
                f"'{self.spec.name}'. That backend has: {names}.",
                hint=(
                    f"Put {name} into the WebUI's models/Stable-diffusion folder, or point "
                    f"{self.spec.source} at a backend that has it, or change the route with "
                    f"[routes.{style}] checkpoint in CHARFORGE_CONFIG."
                ),
            )
        self._listed = (time.monotonic(), available)
        return found

    # -- names: samplers, schedulers, LoRAs, upscalers (names.py) ---------------------------

    def name_book(self, style: str | None = None) -> NameBook:
        return self.names.name_book(style)

    def check_loras(self, prompt: str, style: str) -> None:
        self.names.check_loras(prompt, style)

    def name_lists(self, style: str | None) -> NameLists:
        """The samplers, schedulers and upscalers the Generate page offers (cached a minute)."""
        return self.names.lists(style)

    # -- generation ------------------------------------------------------------------------

    def generate(self, request: BackendRequest) -> BackendResult:
        p = request.params
        sampler, scheduler = resolve(
            self.name_book(request.style),
            p.sampler,
            p.scheduler,
            strict=True,
            where=f"backend '{self.spec.name}'",
        )
        self.check_loras(p.prompt, request.style)
        # Only a pass that runs uses it; sent as the WebUI spells it (it looks it up exactly).
        upscaler = self.names.upscaler(p.hires_upscaler, request.style) if p.hires else None
        task_id = request.task_id or f"charforge-{uuid.uuid4().hex}"
        request = replace(
            request,
            params=replace(
                p,
                sampler=sampler,
                scheduler=scheduler or p.scheduler,
                hires_upscaler=upscaler or p.hires_upscaler,
            ),
            task_id=task_id,
        )
        watch = TaskWatch(
            task_id,
            steps=p.steps,
            interrupt=self._stop_if_active,
            report=request.on_progress,
            cancel=request.cancelled,
            passes=2 if p.hires else 1,
        )
        where = self._where(request.style)
        if watch.cancel.is_set():  # cancelled before anything was sent: send nothing
            raise BackendInterrupted(f"{capitalized(where)} was asked to stop this task.")
        units, identity = self.controlnet.conditioning(request)
        payload = txt2img_payload(request)
        self._watcher.add(watch)
        try:
            try:
                response = self._http.call(
                    "POST",
                    "/sdapi/v1/txt2img",
                    style=request.style,
                    json_body=with_units(payload, units) if units else payload,
                    checkpoint=request.checkpoint.name,
                )
            except BackendRejected as exc:
                if not (units and script_missing(exc.message)):
                    raise
                # The extension went away since it was listed: forget it, and go without.
                self.controlnet.forget()
                identity = self.controlnet.without(request, "the WebUI has no ControlNet extension")
                units = []
                response = self._http.call(
                    "POST",
                    "/sdapi/v1/txt2img",
                    style=request.style,
                    json_body=payload,
                    checkpoint=request.checkpoint.name,
                )
            body = self._http.json(response, request.style)
            with self._control:
                result = parse_txt2img(body, where)
                kept = _kept_on_cancel(watch, result, request.count)
                if kept is None:
                    self._refuse_if_stopped(watch, result, where)
                else:
                    result = kept
        except (BackendTimeout, BackendUnavailable) as exc:
            if isinstance(exc.__cause__, httpx.ConnectError | httpx.ConnectTimeout):
                raise  # never sent: there is nothing to stop
            # Our timeout, the proxy's (524), a dropped connection or a proxy's error page:
            # the WebUI may go on with the task (a closed connection does not stop it), and the
            # next job would queue behind it. Stop it now if it runs, or as soon as it starts
            # (where the WebUI can say which task runs; one never sent simply ends the watch).
            if self._has_task_route:
                watch.reap(time.monotonic() + max(_REAP_SECONDS, 2 * self.spec.timeout))
            self.interrupt(task_id)
            raise
        finally:
            self._watcher.release(watch)
        if units and not units_reported(result.info, len(units)):
            # The extension names every unit it ran; one it skipped (a model that would not
            # load, say) leaves the image unconditioned, and that is never claimed.
            identity = self.controlnet.without(
                request, "the ControlNet extension did not apply the units"
            )
        return replace(
            result,
            sampler=result.sampler or sampler,
            scheduler=result.scheduler or scheduler,
            identity=identity,
        )

    def _refuse_if_stopped(self, watch: TaskWatch, result: BackendResult, where: str) -> None:
        """Right after the task answered, before anything else of ours is sent: was it
        interrupted or skipped (by us or anyone)? Then its picture is half made."""
        if watch.cancel.is_set():
            raise BackendInterrupted(f"{capitalized(where)} was asked to stop this task.")
        try:
            state = self.read_state()
        except Exception as exc:  # the answer itself was fine: trust what the watch saw
            log.warning("could not read %s's state after a task: %s", self.spec.name, exc)
            state = None
        ours = result.info.get("job_timestamp")
        if (
            state is not None
            and state.current_task in (None, watch.task_id)
            # A task that began since cleared the flags: they would not be about ours.
            and (not ours or not state.job_timestamp or str(ours) == state.job_timestamp)
            and (state.interrupted or state.skipped)
        ):
            watch.stopped_seen = True
        if watch.stopped_seen:
            raise BackendInterrupted(
                f"{capitalized(where)} was interrupted while making this image (its Interrupt "
                "or Skip was pressed, or /sdapi/v1/interrupt called); A1111 still answered, "
                "with a half-made picture, which was not stored.",
                hint="It is tried again. If this keeps happening, someone else is using that "
                "WebUI's Interrupt button.",
            )

    # -- tasks -----------------------------------------------------------------------------

    def read_state(self) -> WebUIState | None:
        response = self._client.get(
            "/sdapi/v1/progress",
            params={"skip_current_image": "true"},
            timeout=self._probe_timeout,
        )
        return WebUIState.of(response.json()) if response.status_code == 200 else None

    def task_status(self, task_id: str) -> TaskStatus | None:
        """Where a task is, from ``POST /internal/progress``; None where the WebUI has no such
        route (``--nowebui``) or did not answer it."""
        if self._has_task_route is False:
            return None
        try:
            response = self._client.post(
                "/internal/progress",
                json={"id_task": task_id, "id_live_preview": -1, "live_preview": False},
                timeout=self._probe_timeout,
            )
            data = response.json() if response.status_code == 200 else None
        except (httpx.HTTPError, ValueError):
            return None
        if response.status_code == 404:
            log.warning(
                "backend %s has no /internal/progress (started with --nowebui?): while a "
                "request of charforge's is open, the task it runs is taken to be that one",
                self.spec.name,
            )
            self._has_task_route = False
            return None
        if not isinstance(data, dict):
            return None
        self._has_task_route = True
        return TaskStatus(
            bool(data.get("active")), bool(data.get("queued")), bool(data.get("completed"))
        )

    def interrupt(self, task_id: str) -> bool:
        """Stop this task and no other: now if it is the WebUI's current task, else (when a
        call of this process waits on it) as soon as it starts."""
        with self._control:
            watch = self._watcher.get(task_id)
            if watch is not None and not watch.done:
                watch.cancel.set()
                self._watcher.wake()
            status = self.task_status(task_id)
            if status is None:
                # No per-task route: only the process whose request is open may take the
                # running task for its own; its watch stops it (now, if it runs).
                if watch is None:
                    return False
                try:
                    state = self.read_state()
                except (httpx.HTTPError, ValueError):
                    return True
                status = TaskStatus(watch.active(None, state), False, False)
            if status.active:
                log.info("interrupting A1111 task %s on %s", task_id, self.spec.name)
                if watch is not None:
                    watch.interrupted_elsewhere()
                return self._interrupt_now(watch)
        return watch is not None or status.queued

    def _stop_if_active(self, task_id: str) -> bool:
        """The watcher's stop: only while the task is still the active one, decided under the
        same lock as every other interrupt of this WebUI."""
        with self._control:
            status = self.task_status(task_id)
            if status is not None and not status.active:
                return False
            return self._interrupt_now(self._watcher.get(task_id))

    def _interrupt_now(self, watch: TaskWatch | None = None) -> bool:
        if watch is not None and watch.cancel.is_set() and watch.made_before_stop is None:
            # Our own cancel: the images already whole are kept, so count them first (a
            # pass that ends meanwhile is not counted: never one too many).
            try:
                state = self.read_state()
            except (httpx.HTTPError, ValueError):
                state = None
            # Already stopped (by another process's cancel, say): the count may include the
            # half-made image, so none is kept.
            if (
                state is not None
                and state.running
                and not (state.interrupted or state.skipped)
                and state.job_no is not None
            ):
                watch.made_before_stop = state.job_no // watch.passes
        try:
            self._client.post("/sdapi/v1/interrupt", timeout=self.spec.connect_timeout)
        except httpx.HTTPError:
            log.warning("could not interrupt backend %s", self.spec.name)
            return False
        return True

    # -- state -----------------------------------------------------------------------------

    def loaded_checkpoint(self) -> str | None:
        """The checkpoint in memory: A1111 keeps it in ``options.sd_model_checkpoint``."""
        response = self._http.call(
            "GET", "/sdapi/v1/options", style=None, timeout=self._probe_timeout
        )
        options = self._http.json(response, None)
        value = options.get("sd_model_checkpoint") if isinstance(options, dict) else None
        return strip_hash(value) if isinstance(value, str) and value else None

    def probe(self) -> ProbeResult:
        started = time.perf_counter()
        try:
            checkpoints = self.list_checkpoints(timeout=self._probe_timeout)
            latency = (time.perf_counter() - started) * 1000
            loaded = self.loaded_checkpoint()
        except Exception as exc:  # any failure means "does not answer properly"
            message = getattr(exc, "message", None) or str(exc) or type(exc).__name__
            return ProbeResult(False, None, message)
        try:
            self.controlnet.forget()  # the probe is when the extension is asked again
            method = self.controlnet.method("realistic")
        except Exception as exc:  # the extension's routes failing is not the WebUI failing
            log.warning("could not ask %s about ControlNet: %s", self.spec.name, exc)
            return ProbeResult(True, latency, None, checkpoints, loaded)
        lacking = frozenset() if method else frozenset({Capability.REFERENCE_IMAGE})
        return ProbeResult(
            True,
            latency,
            None,
            checkpoints,
            loaded,
            lacking=lacking,
            identity_method=method.label if method else None,
        )


def _kept_on_cancel(watch: TaskWatch, result: BackendResult, count: int) -> BackendResult | None:
    """A task of several images stopped by our own cancel: the images that were whole when
    the stop was sent (A1111 answers with those and the half-made one), or None."""
    made = watch.made_before_stop
    if not watch.cancel.is_set() or count < 2 or not made or made > count:
        return None
    if len(result.images) < made:
        return None
    return replace(result, images=result.images[:made], stopped_after=made)


def _match(name: str, available: list[CheckpointInfo]) -> CheckpointInfo | None:
    exact = next((info for info in available if info.title == name), None)
    return exact or find_checkpoint_named(name, available, lambda info: info.name)
