"""AUTOMATIC1111 / Forge WebUI over its HTTP API (``/sdapi/v1``).

Facts this adapter is built on (DESIGN.md section 5):
- the checkpoint is chosen per request with ``override_settings.sd_model_checkpoint``, and
  ``override_settings_restore_afterwards: false`` keeps it loaded for the next request;
- an unknown checkpoint or sampler is silently replaced by a default, so names are checked
  against ``/sd-models`` and ``/samplers`` first and the model that ran is checked after;
- A1111's defaults differ from ours (50 steps, CFG 7), so every parameter is sent;
- Forge's hires pass raises ``TypeError`` unless ``hr_additional_modules`` is a list;
- errors arrive as ``{"error", "detail", "body", "errors"}`` (Forge: ``message``);
- ``/sd-models`` may report no hash until a checkpoint was loaded once.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import httpx

from charforge.backends.base import (
    BackendRequest,
    BackendResult,
    CheckpointInfo,
    GeneratedImage,
    ProbeResult,
    Progress,
)
from charforge.backends.transport import (
    Hints,
    capitalized,
    decode_image_base64,
    proxy_unavailable,
    read_json,
    send,
    timeout_of,
)
from charforge.domain.checkpoints import find_checkpoint_named, strip_hash
from charforge.domain.routes import BackendSpec
from charforge.errors import (
    BackendAuthFailed,
    BackendBadResponse,
    BackendRejected,
    BackendTimeout,
    CheckpointMissing,
    InvalidInput,
)

log = logging.getLogger(__name__)
_NAME_CACHE_SECONDS = 60.0
# A checkpoint seen in /sd-models is trusted this long; the check after generation still
# catches one that vanished meanwhile (A1111 would fall back, and the image is refused).
_CHECKPOINT_CACHE_SECONDS = 10.0
_PROGRESS_INTERVAL = 0.5


def auth_setting(spec: BackendSpec) -> str:
    """Where a user sets this backend's credentials."""
    if spec.source.endswith("_URL"):
        return spec.source[: -len("_URL")] + "_AUTH"
    return f"auth of {spec.source}"


def error_message(response: httpx.Response) -> str:
    """The human part of an A1111 (``errors``), Forge (``message``) or FastAPI error body."""
    try:
        body = response.json()
    except ValueError:
        text = response.text.strip()
        return text[:300] or f"HTTP {response.status_code}"
    if isinstance(body, dict):
        for key in ("errors", "message", "detail", "error"):
            value = body.get(key)
            if value:
                return value if isinstance(value, str) else json.dumps(value)[:500]
    return json.dumps(body)[:300]


class A1111Backend:
    def __init__(self, spec: BackendSpec, *, probe_timeout: float = 3.0) -> None:
        self.spec = spec
        self._probe_timeout = probe_timeout
        self._client = httpx.Client(
            base_url=spec.url,
            auth=httpx.BasicAuth(*spec.auth) if spec.auth else None,
            timeout=httpx.Timeout(spec.timeout, connect=spec.connect_timeout),
            headers={"User-Agent": "charforge"},
        )
        self._names: dict[str, tuple[float, dict[str, str] | None]] = {}
        self._names_lock = threading.Lock()
        self._listed: tuple[float, list[CheckpointInfo]] | None = None

    def close(self) -> None:
        self._client.close()

    # -- transport -------------------------------------------------------------------------

    def _where(self, style: str | None) -> str:
        # No URL: messages reach every user, and a pod URL is access to the GPU.
        what = f"the {style} style's backend" if style else "backend"
        return f"{what} '{self.spec.name}'"

    def _call(
        self,
        method: str,
        path: str,
        *,
        style: str | None,
        json_body: Any = None,
        timeout: float | None = None,
    ) -> httpx.Response:
        where = self._where(style)
        response = send(
            self._client,
            method,
            path,
            where=where,
            connect_timeout=self.spec.connect_timeout,
            limit=timeout or self.spec.timeout,
            hints=Hints(
                reach=self._reach_hint(),
                stuck=(
                    f"Check that the WebUI behind {self.spec.source} is not stuck; for slow GPUs "
                    "raise CHARFORGE_BACKEND_TIMEOUT (or timeout_seconds of the backend)."
                ),
            ),
            json=json_body,
            timeout=timeout_of(timeout, self.spec.connect_timeout) or httpx.USE_CLIENT_DEFAULT,
        )
        self._raise_for_status(response, where, path)
        return response

    def _reach_hint(self) -> str:
        return (
            f"Check that the A1111/Forge WebUI is running with --api and that {self.spec.source} "
            "points at it; GET /api/styles shows which backends answer."
        )

    def _raise_for_status(self, response: httpx.Response, where: str, path: str) -> None:
        status = response.status_code
        if status < 400:
            return
        if status == 401:
            raise BackendAuthFailed(
                f"{capitalized(where)} refused charforge's credentials (HTTP 401).",
                hint=f"Set {auth_setting(self.spec)} to the user:password given to --api-auth.",
            )
        if status == 524:
            raise BackendTimeout(
                f"The proxy in front of {where} gave up waiting (HTTP 524, RunPod's proxy "
                "stops at 100 s); the WebUI may still be working.",
                hint="Lower steps or size, or reach the pod directly instead of through the proxy.",
            )
        down = proxy_unavailable(response, where, server="the WebUI", hint=self._reach_hint())
        if down is not None:
            raise down
        if status == 404 and path.startswith("/sdapi"):
            raise BackendRejected(
                f"{capitalized(where)} has no API route {path} (HTTP 404).",
                hint="Start the WebUI with the --api flag.",
            )
        raise BackendRejected(
            f"{capitalized(where)} failed (HTTP {status}): {error_message(response)}",
            hint="This is the WebUI's own error message; its console shows the details.",
            retriable=status >= 500,  # a server fault may pass, or another backend may do it
        )

    @staticmethod
    def _json(response: httpx.Response, where: str) -> Any:
        return read_json(response, where, expected="the A1111 API")

    # -- checkpoints -----------------------------------------------------------------------

    def list_checkpoints(
        self, *, style: str | None = None, timeout: float | None = None
    ) -> list[CheckpointInfo]:
        response = self._call("GET", "/sdapi/v1/sd-models", style=style, timeout=timeout)
        items = self._json(response, self._where(style))
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
            self._call("POST", "/sdapi/v1/refresh-checkpoints", style=style)
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

    def _known_names(self, path: str, style: str) -> dict[str, str] | None:
        """Sampler or scheduler names (cached): every name, label and alias in lower case ->
        the spelling txt2img looks up exactly; None when this WebUI has no such route."""
        with self._names_lock:
            cached = self._names.get(path)
            if cached and time.monotonic() - cached[0] < _NAME_CACHE_SECONDS:
                return cached[1]
        try:
            response = self._call("GET", path, style=style)
        except BackendRejected as exc:
            if "404" not in exc.message:
                raise
            names: dict[str, str] | None = None  # A1111 before 1.9 has no /schedulers
        else:
            data = self._json(response, self._where(style))
            # txt2img finds a sampler by its name only, a scheduler by name or label.
            exact = "label" if path.endswith("schedulers") else "name"
            names = {}
            for item in data if isinstance(data, list) else []:
                if isinstance(item, dict) and item.get(exact):
                    spellings = [item.get("name"), item.get("label"), *(item.get("aliases") or [])]
                    for spelling in spellings:
                        if spelling:
                            names.setdefault(str(spelling).lower(), str(item[exact]))
        with self._names_lock:
            self._names[path] = (time.monotonic(), names)
        return names

    def _exact_name(self, value: str, path: str, field: str, style: str) -> str:
        """``value`` as this WebUI spells it: A1111 looks names up exactly and silently uses
        its default for anything else (another case, an alias)."""
        names = self._known_names(path, style)
        if names is None:
            return value
        if value.lower() not in names:
            shown = ", ".join(dict.fromkeys(names.values()))
            raise InvalidInput(
                f"{field.capitalize()} '{value}' is not known to backend '{self.spec.name}'; "
                f"A1111 would silently use another. Known: {shown}.",
                field=field,
                hint=f"Pick one of the {field}s listed, or leave {field} out for the default.",
            )
        return names[value.lower()]

    # -- generation ------------------------------------------------------------------------

    def generate(self, request: BackendRequest) -> BackendResult:
        p = request.params
        exact = replace(
            p,
            sampler=self._exact_name(p.sampler, "/sdapi/v1/samplers", "sampler", request.style),
            scheduler=self._exact_name(
                p.scheduler, "/sdapi/v1/schedulers", "scheduler", request.style
            ),
        )
        request = replace(request, params=exact)
        where = self._where(request.style)
        done = threading.Event()
        watcher = None
        if request.on_progress is not None:
            watcher = threading.Thread(
                target=self._watch_progress,
                args=(request.on_progress, done),
                name=f"progress-{self.spec.name}",
                daemon=True,
            )
            watcher.start()
        try:
            response = self._call(
                "POST", "/sdapi/v1/txt2img", style=request.style, json_body=txt2img_payload(request)
            )
        except BackendTimeout:
            # Ours or the proxy's (524): the WebUI goes on otherwise, and the next job (or this
            # one's retry) would queue behind it.
            self.interrupt()
            raise
        finally:
            done.set()
            if watcher is not None:
                watcher.join(timeout=self._probe_timeout)
        body = self._json(response, where)
        return parse_txt2img(body, where)

    def _watch_progress(self, report: Callable[[Progress], None], done: threading.Event) -> None:
        """Poll /progress while a generation runs (A1111 has no push channel for it)."""
        while not done.wait(_PROGRESS_INTERVAL):
            try:
                response = self._client.get(
                    "/sdapi/v1/progress",
                    params={"skip_current_image": "true"},
                    timeout=self._probe_timeout,
                )
                data = response.json() if response.status_code == 200 else None
            except (httpx.HTTPError, ValueError):
                continue  # progress is a nicety: the generation itself decides the outcome
            if not isinstance(data, dict) or done.is_set():
                continue
            state = data.get("state") if isinstance(data.get("state"), dict) else {}
            assert isinstance(state, dict)
            fraction = data.get("progress")
            step, steps = state.get("sampling_step"), state.get("sampling_steps")
            if isinstance(fraction, int | float) and state.get("job_count"):
                report(
                    Progress(
                        min(max(float(fraction), 0.0), 1.0),
                        step if isinstance(step, int) else None,
                        steps if isinstance(steps, int) and steps > 0 else None,
                    )
                )

    def interrupt(self) -> bool:
        try:
            self._client.post("/sdapi/v1/interrupt", timeout=self.spec.connect_timeout)
        except httpx.HTTPError:
            log.warning("could not interrupt backend %s", self.spec.name)
            return False
        return True

    def loaded_checkpoint(self) -> str | None:
        """The checkpoint in memory: A1111 keeps it in ``options.sd_model_checkpoint``."""
        response = self._call("GET", "/sdapi/v1/options", style=None, timeout=self._probe_timeout)
        options = self._json(response, self._where(None))
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
        return ProbeResult(True, latency, None, checkpoints, loaded)


def txt2img_payload(request: BackendRequest) -> dict[str, Any]:
    """The txt2img body for a request (also what RunPod's A1111 worker takes as input)."""
    p = request.params
    return {
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
        "hr_second_pass_steps": 0,
        "denoising_strength": p.denoising_strength,
        # Forge's hires pass fails with a TypeError without it; A1111 ignores it.
        "hr_additional_modules": ["Use same choices"],
        "override_settings": {"sd_model_checkpoint": request.checkpoint.title},
        # Keep the model loaded: restoring would reload weights on every request.
        "override_settings_restore_afterwards": False,
        "send_images": True,
        "save_images": False,
    }


def _match(name: str, available: list[CheckpointInfo]) -> CheckpointInfo | None:
    exact = next((info for info in available if info.title == name), None)
    return exact or find_checkpoint_named(name, available, lambda info: info.name)


def parse_txt2img(body: Any, where: str) -> BackendResult:
    """Images, seeds and the model that ran, from A1111's ``{images, parameters, info}``."""
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
        images.append(GeneratedImage(data, seed))
    reported = info.get("sd_model_name")
    return BackendResult(
        images=images,
        checkpoint=str(reported) if reported else None,
        checkpoint_hash=info.get("sd_model_hash") or None,
        info=info,
    )
