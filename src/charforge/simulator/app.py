"""The FastAPI app that answers like A1111 1.10 / Forge 2 on ``/sdapi/v1/*``.

Like the real WebUIs, ``/sdapi/v1/loras``, ``/sdapi/v1/refresh-loras`` and the UI's
``/internal/progress`` and ``/internal/ping`` are registered on the app directly, so
``--api-auth`` does not cover them; the ``/internal/*`` routes are missing with ``nowebui``.

With ``SimulatorSettings.controlnet`` the sd-webui-controlnet extension's ``/controlnet/*``
routes answer (registered on the app by ``on_app_started``: no ``--api-auth`` either); without
it they are 404 like any unknown path. The setting is read per request.

Besides the WebUI routes there are control routes under ``/_simulator/`` (never recorded,
never behind auth) so that tests in another process can read what was sent and set faults.
"""

from __future__ import annotations

import asyncio
import base64
import json
import secrets
import time
from typing import TYPE_CHECKING, Any

from fastapi import Body, Depends, FastAPI, Request
from fastapi.exceptions import HTTPException
from fastapi.responses import HTMLResponse, JSONResponse, Response
from fastapi.security import HTTPBasic, HTTPBasicCredentials
from pydantic import BaseModel, ConfigDict
from starlette.concurrency import run_in_threadpool
from starlette.middleware.gzip import GZipMiddleware
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from charforge.domain.samplers import SAMPLERS, SCHEDULERS
from charforge.simulator.catalog import (
    latent_mode_items,
    sampler_item,
    scheduler_item,
    upscaler_items,
)
from charforge.simulator.config import Faults, RecordedRequest
from charforge.simulator.controlnet import decode_image, detected_map
from charforge.simulator.controlnet_units import (
    API_VERSION,
    UNIT_COUNT,
    ControlNetUnit,
    UnitError,
    control_types,
    find_preprocessor,
    module_list,
)
from charforge.simulator.engine import SimulatorEngine, Txt2ImgOutcome
from charforge.simulator.render import png_bytes
from charforge.simulator.state import InternalProgressError
from charforge.simulator.txt2img import ForgeTxt2ImgRequest, GenerationError, Txt2ImgRequest

if TYPE_CHECKING:
    from charforge.simulator.server import A1111Simulator

TRANSPORT_EXTENSION = "charforge.simulator.transport"
"""Scope extension under which the simulator's uvicorn protocol exposes the socket transport."""
CONTROL_PREFIX = "/_simulator"

_BAD_GATEWAY = (
    "<html>\r\n<head><title>502 Bad Gateway</title></head>\r\n<body>\r\n"
    "<center><h1>502 Bad Gateway</h1></center>\r\n<hr><center>nginx</center>\r\n"
    "</body>\r\n</html>\r\n"
)
_CLOUDFLARE_TIMEOUT = """<!DOCTYPE html>
<html lang="en-US">
<head><title>sd.example.com | 524: A timeout occurred</title></head>
<body>
<div id="cf-wrapper"><div id="cf-error-details">
<h1><span class="cf-error-type">A timeout occurred</span>
<span class="code-label">Error code 524</span></h1>
<p>The origin web server timed out responding to this request.</p>
<p>Cloudflare Ray ID: <strong>8a1b2c3d4e5f6a7b</strong></p>
</div></div>
</body>
</html>
"""
_TRUNCATED_JSON = b'{"images": ["iVBORw0KGgoAAAANSUhEUgAAAgAAAAIACAIAAAB7GkOtAAEAAElEQVR4nOz9Z5Mk'


def error_body(flavor: str, error: str, message: str, detail: Any = "") -> dict[str, Any]:
    """The JSON A1111 (``errors``) or Forge (``message``) answers an exception with."""
    key = "message" if flavor == "forge" else "errors"
    return {"error": error, "detail": detail, "body": "", key: message}


def _error_response(engine: SimulatorEngine, exc: GenerationError) -> JSONResponse:
    body = error_body(engine.flavor, exc.error, exc.message, detail=exc.detail)
    return JSONResponse(body, status_code=exc.status)


class _RecordingMiddleware:
    """Records every non-control request (body included) before the app sees it.

    For the A1111 flavor it also adds ``X-Process-Time`` like A1111's ``log_and_time``.
    """

    def __init__(self, app: ASGIApp, engine: SimulatorEngine) -> None:
        self.app = app
        self.engine = engine

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"].startswith(CONTROL_PREFIX):
            await self.app(scope, receive, send)
            return
        chunks: list[bytes] = []
        while True:
            message = await receive()
            if message["type"] != "http.request":
                break
            chunks.append(message.get("body", b""))
            if not message.get("more_body", False):
                break
        raw = b"".join(chunks)
        headers: dict[str, str] = {}
        for name, value in scope["headers"]:
            key, text = name.decode("latin-1").lower(), value.decode("latin-1")
            headers[key] = f"{headers[key]}, {text}" if key in headers else text
        self.engine.record(
            RecordedRequest(
                method=scope["method"],
                path=scope["path"],
                body=_parse_json(raw),
                headers=headers,
                query=scope.get("query_string", b"").decode("latin-1"),
            )
        )

        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": raw, "more_body": False}
            return await receive()

        started = time.perf_counter()
        add_timing = self.engine.flavor == "a1111"

        async def timed_send(message: Message) -> None:
            if add_timing and message["type"] == "http.response.start":
                took = str(round(time.perf_counter() - started, 4)).encode()
                message = {
                    **message,
                    "headers": [*message.get("headers", []), (b"x-process-time", took)],
                }
            await send(message)

        await self.app(scope, replay, timed_send)


def _parse_json(raw: bytes) -> Any:
    if not raw:
        return None
    try:
        return json.loads(raw)
    except ValueError:
        return None


class _DropConnection(Response):
    """Closes the TCP connection without a byte of response.

    Under the simulator's own server (see ``server.py``) the socket transport is in the
    scope and is simply closed. Under any other server this falls back to starting a
    response and failing mid-body, which servers answer by closing the connection.
    """

    def __init__(self) -> None:
        super().__init__(status_code=200)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        transport = scope.get("extensions", {}).get(TRANSPORT_EXTENSION)
        if transport is not None:
            transport.close()
            # Let the server see the connection go before the app returns.
            await asyncio.sleep(0.05)
            return
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b'{"images": [', "more_body": True})
        raise ConnectionAbortedError("simulated dropped connection")


class _FaultsPatch(BaseModel):
    model_config = ConfigDict(extra="forbid")

    fail_status: int | None = None
    fail_message: str | None = None
    delay_seconds: float | None = None
    ignore_checkpoint: bool | None = None
    switch_delay_seconds: float | None = None
    malformed_json: bool | None = None
    broken_image: bool | None = None
    drop_connection: bool | None = None
    nan_prompts: list[str] | None = None
    corrupt_checkpoints: list[str] | None = None


class _ProgressRequest(BaseModel):
    """``progress.ProgressRequest``: every field optional, but a JSON body is required."""

    model_config = ConfigDict(coerce_numbers_to_str=True)

    id_task: str | None = None
    id_live_preview: int = -1
    live_preview: bool = True


def _apply_faults(faults: Faults, patch: _FaultsPatch) -> None:
    for name in patch.model_fields_set:
        value = getattr(patch, name)
        if value is None and name != "fail_status":
            value = getattr(Faults(), name)
        setattr(faults, name, value)


def _answer(engine: SimulatorEngine, outcome: Txt2ImgOutcome) -> Response:
    if outcome.kind == "ok" and outcome.body is not None:
        return JSONResponse(outcome.body)
    if outcome.kind == "error" and outcome.error is not None:
        return _error_response(engine, outcome.error)
    if outcome.kind == "proxy":
        page = _BAD_GATEWAY if outcome.status == 502 else _CLOUDFLARE_TIMEOUT
        return HTMLResponse(page, status_code=outcome.status)
    if outcome.kind == "malformed":
        return Response(_TRUNCATED_JSON, status_code=200, media_type="application/json")
    return _DropConnection()


def create_simulator_app(sim: A1111Simulator | SimulatorEngine) -> FastAPI:
    """Build the app for ``sim`` (an ``A1111Simulator`` or its bare ``SimulatorEngine``)."""
    engine = sim if isinstance(sim, SimulatorEngine) else sim.engine
    app = FastAPI(title=f"{engine.settings.name} (simulated {engine.flavor})", docs_url="/docs")
    basic = HTTPBasic(auto_error=False)

    def auth(credentials: HTTPBasicCredentials | None = Depends(basic)) -> None:
        expected = engine.settings.api_auth
        if expected is None:
            return
        if credentials is None:
            raise HTTPException(401, "Not authenticated", headers={"WWW-Authenticate": "Basic"})
        user_ok = secrets.compare_digest(credentials.username.encode(), expected[0].encode())
        password_ok = secrets.compare_digest(credentials.password.encode(), expected[1].encode())
        if not (user_ok and password_ok):
            raise HTTPException(
                401, "Incorrect username or password", headers={"WWW-Authenticate": "Basic"}
            )

    guarded = [Depends(auth)]
    # Forge registers /progress with auth_required=False.
    progress_guard = [] if engine.flavor == "forge" else guarded

    if engine.flavor == "a1111":
        # A1111's api_middleware renders its own (fastapi) HTTPExceptions in the error
        # shape and drops their headers; Starlette's routing 404/405 keep FastAPI's shape.
        @app.exception_handler(HTTPException)
        async def a1111_http_exception(request: Request, exc: HTTPException) -> JSONResponse:
            body = error_body("a1111", "HTTPException", str(exc), detail=exc.detail)
            return JSONResponse(body, status_code=exc.status_code)

    @app.get("/sdapi/v1/sd-models", dependencies=guarded)
    def sd_models() -> list[dict[str, Any]]:
        return engine.sd_models()

    @app.get("/sdapi/v1/options", dependencies=guarded)
    def get_options() -> dict[str, Any]:
        return engine.options()

    @app.post("/sdapi/v1/options", dependencies=guarded, response_model=None)
    def set_options(values: dict[str, Any] = Body(...)) -> JSONResponse | None:
        error = engine.set_options(values)
        return _error_response(engine, error) if error is not None else None

    @app.get("/sdapi/v1/samplers", dependencies=guarded)
    def samplers() -> list[dict[str, Any]]:
        return [sampler_item(sampler) for sampler in SAMPLERS]

    @app.get("/sdapi/v1/schedulers", dependencies=guarded)
    def schedulers() -> list[dict[str, Any]]:
        return [scheduler_item(scheduler) for scheduler in SCHEDULERS]

    @app.get("/sdapi/v1/upscalers", dependencies=guarded)
    def upscalers() -> list[dict[str, Any]]:
        return upscaler_items(list(engine.settings.upscalers))

    @app.get("/sdapi/v1/latent-upscale-modes", dependencies=guarded)
    def latent_upscale_modes() -> list[dict[str, Any]]:
        return latent_mode_items()

    @app.get("/sdapi/v1/progress", dependencies=progress_guard)
    def progress(skip_current_image: bool = False) -> dict[str, Any]:
        return engine.progress()

    @app.post("/sdapi/v1/interrupt", dependencies=guarded)
    def interrupt() -> dict[str, Any]:
        engine.interrupt()
        return {}

    @app.post("/sdapi/v1/skip", dependencies=guarded)
    def skip() -> None:
        engine.skip()

    # The Lora extension registers these on the app itself: never behind --api-auth.
    @app.get("/sdapi/v1/loras")
    def loras() -> list[dict[str, Any]]:
        return engine.loras()

    @app.post("/sdapi/v1/refresh-loras")
    def refresh_loras() -> None:
        engine.refresh_loras()

    if not engine.settings.nowebui:
        # Registered by webui() next to the Gradio UI (not by api_only()), so no --api-auth.
        @app.post("/internal/progress", response_model=None)
        def internal_progress(req: _ProgressRequest) -> dict[str, Any] | JSONResponse:
            try:
                return engine.internal_progress(req.id_task, req.id_live_preview)
            except InternalProgressError as exc:
                return JSONResponse(error_body(engine.flavor, "TypeError", str(exc)), 500)

        @app.get("/internal/ping")
        def ping() -> dict[str, Any]:
            return {}

    _add_controlnet_routes(app, engine)

    @app.post("/sdapi/v1/refresh-checkpoints", dependencies=guarded)
    def refresh_checkpoints() -> None:
        engine.refresh_checkpoints_queued()

    if engine.flavor == "forge":

        @app.post("/sdapi/v1/txt2img", dependencies=guarded, response_model=None)
        async def txt2img_forge(req: ForgeTxt2ImgRequest) -> Response:
            return _answer(engine, await run_in_threadpool(engine.txt2img, req))

    else:

        @app.post("/sdapi/v1/txt2img", dependencies=guarded, response_model=None)
        async def txt2img(req: Txt2ImgRequest) -> Response:
            return _answer(engine, await run_in_threadpool(engine.txt2img, req))

    @app.get(f"{CONTROL_PREFIX}/requests")
    def recorded_requests() -> list[dict[str, Any]]:
        return [request.as_dict() for request in engine.requests]

    @app.delete(f"{CONTROL_PREFIX}/requests")
    def clear_recorded_requests() -> dict[str, Any]:
        engine.clear_requests()
        return {"cleared": True}

    @app.get(f"{CONTROL_PREFIX}/faults")
    def get_faults() -> dict[str, Any]:
        return engine.faults.as_dict()

    @app.post(f"{CONTROL_PREFIX}/faults")
    def set_faults(patch: _FaultsPatch) -> dict[str, Any]:
        _apply_faults(engine.faults, patch)
        return engine.faults.as_dict()

    @app.delete(f"{CONTROL_PREFIX}/faults")
    def reset_faults() -> dict[str, Any]:
        engine.faults.reset()
        return engine.faults.as_dict()

    @app.get(f"{CONTROL_PREFIX}/state")
    def state() -> dict[str, Any]:
        return engine.snapshot()

    # Both WebUIs add GZip (minimum_size=1000) in initialize_util.setup_middleware.
    app.add_middleware(GZipMiddleware, minimum_size=1000)
    app.add_middleware(_RecordingMiddleware, engine=engine)
    return app


_CONTROLNET_ROUTES = {
    "version": "GET",
    "model_list": "GET",
    "module_list": "GET",
    "control_types": "GET",
    "settings": "GET",
    "detect": "POST",
}
_TRUE_QUERY = ("1", "true", "on", "yes", "t", "y")


def _http_exception(engine: SimulatorEngine, status: int, detail: str) -> JSONResponse:
    # Starlette 0.26's HTTPException has no args, so A1111's "errors" (str(e)) is empty.
    return JSONResponse(error_body(engine.flavor, "HTTPException", "", detail), status)


def _add_controlnet_routes(app: FastAPI, engine: SimulatorEngine) -> None:
    """``scripts/api.py`` of sd-webui-controlnet, present only while the extension is."""

    @app.api_route(
        "/controlnet/{rest:path}",
        methods=["GET", "POST", "PUT", "PATCH", "DELETE"],
        include_in_schema=False,
    )
    async def controlnet(rest: str, request: Request) -> Response:
        settings = engine.settings
        if not settings.controlnet or rest not in _CONTROLNET_ROUTES:
            return JSONResponse({"detail": "Not Found"}, 404)
        if request.method != _CONTROLNET_ROUTES[rest]:
            return JSONResponse({"detail": "Method Not Allowed"}, 405)
        if rest == "version":
            return JSONResponse({"version": API_VERSION})
        if rest == "settings":
            return JSONResponse({"control_net_unit_count": UNIT_COUNT})
        if rest == "model_list":
            return JSONResponse({"model_list": list(settings.controlnet_models)})
        if rest == "module_list":
            alias = request.query_params.get("alias_names", "false").lower() in _TRUE_QUERY
            return JSONResponse(module_list(alias))
        if rest == "control_types":
            return JSONResponse(control_types(list(settings.controlnet_models)))
        return _detect(engine, _parse_json(await request.body()))


def _detect(engine: SimulatorEngine, body: Any) -> JSONResponse:
    """``POST /controlnet/detect``: each input image through the preprocessor, at its own
    size scaled so that the short side is the processor resolution (512 by default)."""
    body = body if isinstance(body, dict) else {}
    module = body.get("controlnet_module", "none")
    preprocessor = find_preprocessor(module)
    if preprocessor is None:
        return _http_exception(engine, 422, "Module not available")
    if preprocessor.name in ("clip_vision", "revision_clipvision", "revision_ignore_prompt"):
        return _http_exception(engine, 422, "Module not supported")
    if preprocessor.name == "ip-adapter-auto":
        return _http_exception(engine, 422, "Module not supported")
    images = body.get("controlnet_input_images") or []
    if not isinstance(images, list) or not images:
        return _http_exception(engine, 422, "No image selected")
    resolution = body.get("controlnet_processor_res", -1)
    if not isinstance(resolution, (int, float)) or not 128 <= resolution <= 2048:
        resolution = 512
    unit = ControlNetUnit(enabled=True, module=preprocessor.name, resize_mode="Just Resize")
    encoded = []
    for image in images:
        try:
            picture, _ = decode_image(image)
        except UnitError as exc:
            return JSONResponse(error_body(engine.flavor, exc.error, exc.message), 500)
        scale = resolution / min(picture.size)
        size = (round(picture.width * scale), round(picture.height * scale))
        found = png_bytes(detected_map(unit, picture, size), None)
        encoded.append(base64.b64encode(found).decode())
    return JSONResponse({"info": "Success", "images": encoded})
