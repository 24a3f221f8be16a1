"""Run the simulator: uvicorn in a daemon thread (tests) or in the foreground (the CLI)."""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from types import TracebackType
from typing import Any

import uvicorn
from fastapi import FastAPI
from starlette.types import ASGIApp, Receive, Scope, Send
from uvicorn.protocols.http.h11_impl import H11Protocol

from charforge.simulator.app import TRANSPORT_EXTENSION, create_simulator_app
from charforge.simulator.config import Faults, RecordedRequest, SimulatorSettings
from charforge.simulator.engine import SimulatorEngine

_START_TIMEOUT = 15.0
_STOP_TIMEOUT = 10.0


class _ExposeTransport:
    """Per-connection ASGI wrapper that puts the socket transport into the scope.

    It is what lets ``Faults.drop_connection`` close a connection without answering.
    """

    def __init__(self, app: ASGIApp, transport: asyncio.Transport) -> None:
        self.app = app
        self.transport = transport

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            extensions = {**scope.get("extensions", {}), TRANSPORT_EXTENSION: self.transport}
            scope = {**scope, "extensions": extensions}
        await self.app(scope, receive, send)


class _SimulatorH11Protocol(H11Protocol):
    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self.app = _ExposeTransport(self.app, transport)


def _protocol_class() -> type[asyncio.Protocol]:
    """uvicorn's fastest available HTTP protocol, exposing its transport to the app."""
    try:
        from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
    except ImportError:  # httptools missing: h11 is always there
        return _SimulatorH11Protocol

    class _SimulatorHttpToolsProtocol(HttpToolsProtocol):
        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self.app = _ExposeTransport(self.app, transport)

    return _SimulatorHttpToolsProtocol


def _uvicorn_config(app: FastAPI, log_level: str, **extra: Any) -> uvicorn.Config:
    return uvicorn.Config(
        app,
        http=_protocol_class(),
        ws="none",
        lifespan="off",
        log_level=log_level,
        access_log=log_level == "debug",
        timeout_graceful_shutdown=2,
        **extra,
    )


class A1111Simulator:
    """A fake A1111/Forge WebUI on a real socket.

    >>> with A1111Simulator(SimulatorSettings(models=["diving.safetensors"])) as sim:
    ...     httpx.get(f"{sim.url}/sdapi/v1/sd-models")
    """

    def __init__(self, settings: SimulatorSettings) -> None:
        self.engine = SimulatorEngine(settings)
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None
        self._url: str | None = None
        self._lifecycle = threading.Lock()

    # ------------------------------------------------------------------ settings, faults

    @property
    def settings(self) -> SimulatorSettings:
        """Live settings: ``api_auth`` is read per request, ``models`` on refresh-checkpoints."""
        return self.engine.settings

    @settings.setter
    def settings(self, value: SimulatorSettings) -> None:
        self.engine.settings = value

    @property
    def faults(self) -> Faults:
        """Mutable: set attributes at any time, e.g. ``sim.faults.fail_status = 500``."""
        return self.engine.faults

    @faults.setter
    def faults(self, value: Faults) -> None:
        self.engine.faults = value

    # ------------------------------------------------------------------ lifecycle

    def start(self, host: str = "127.0.0.1", port: int = 0) -> str:
        """Serve on ``host:port`` (0 = a free port) from a daemon thread; returns the base URL."""
        with self._lifecycle:
            if self._url is not None:
                return self._url
            family = socket.AF_INET6 if ":" in host else socket.AF_INET
            sock = socket.socket(family, socket.SOCK_STREAM)
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                sock.bind((host, port))
                sock.listen(128)
            except OSError:
                sock.close()
                raise
            bound_port = sock.getsockname()[1]
            self.engine.resume()
            config = _uvicorn_config(create_simulator_app(self.engine), log_level="warning")
            server = uvicorn.Server(config)
            thread = threading.Thread(
                target=server.run,
                kwargs={"sockets": [sock]},
                name=f"{self.settings.name}-uvicorn",
                daemon=True,
            )
            thread.start()
            deadline = time.monotonic() + _START_TIMEOUT
            while not server.started:
                if not thread.is_alive() or time.monotonic() > deadline:
                    server.should_exit = True
                    thread.join(timeout=_STOP_TIMEOUT)
                    sock.close()
                    raise RuntimeError(f"simulator {self.settings.name!r} did not start")
                time.sleep(0.005)
            self._server, self._thread = server, thread
            url_host = f"[{host}]" if family == socket.AF_INET6 else host
            self._url = f"http://{url_host}:{bound_port}"
            return self._url

    def stop(self) -> None:
        """Stop serving (idempotent). Sleeping generations are woken so this is quick."""
        with self._lifecycle:
            server, thread = self._server, self._thread
            self._server = self._thread = None
            self._url = None
            if server is None or thread is None:
                return
            self.engine.shutdown()
            server.should_exit = True
            thread.join(timeout=_STOP_TIMEOUT)
            if thread.is_alive():
                server.force_exit = True
                thread.join(timeout=_STOP_TIMEOUT)

    def __enter__(self) -> A1111Simulator:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    @property
    def url(self) -> str:
        if self._url is None:
            raise RuntimeError("the simulator is not running; call start() first")
        return self._url

    def reset(self) -> None:
        """Forget everything that happened (faults, records, counters, loaded model) so that
        one running simulator can serve many tests. Waits for a running generation."""
        self.engine.reset()

    # ------------------------------------------------------------------ what happened

    @property
    def requests(self) -> list[RecordedRequest]:
        """Every request but ``/_simulator/*`` ones, in arrival order (a copy)."""
        return self.engine.requests

    def txt2img_bodies(self) -> list[dict[str, Any]]:
        """The JSON bodies POSTed to ``/sdapi/v1/txt2img``, in order."""
        return [
            r.body
            for r in self.engine.requests
            if r.method == "POST" and r.path == "/sdapi/v1/txt2img" and isinstance(r.body, dict)
        ]

    def clear_requests(self) -> None:
        self.engine.clear_requests()

    @property
    def loaded_checkpoint(self) -> str:
        """File name of the current model: what ``options.sd_model_checkpoint`` names and
        what a request without a checkpoint override renders with."""
        return self.engine.loaded_checkpoint

    @property
    def weights_checkpoint(self) -> str:
        """File name of the model physically in (simulated) memory. After a generation with
        ``override_settings_restore_afterwards`` it stays the override's model until the
        next generation reloads the current one, exactly like A1111."""
        return self.engine.weights_checkpoint

    @property
    def checkpoint_loads(self) -> int:
        """How many times a model had to be loaded (switches, not the initial one)."""
        return self.engine.checkpoint_loads

    @property
    def generations(self) -> int:
        return self.engine.generations

    @property
    def controlnet_units(self) -> list[list[dict[str, Any]]]:
        """What ControlNet did, per txt2img that reached it (``settings.controlnet`` on and
        the units parsed), in order: one record per *enabled* unit with ``unit`` (the N of
        ``ControlNet N``), ``slot``, ``module``, ``model``, ``model_resolved``, ``weight``,
        ``resize_mode``, ``guidance_start``/``guidance_end``, ``save_detected_map``,
        ``image_sha256`` (of the decoded bytes sent), ``image_size``, ``applied`` and
        ``skipped`` (the error A1111 would have logged instead of applying it)."""
        return self.engine.controlnet_units

    @property
    def max_concurrent_generations(self) -> int:
        return self.engine.max_concurrent_generations

    @property
    def max_in_flight(self) -> int:
        """Most txt2img requests open at once (running plus queued)."""
        return self.engine.max_in_flight

    # ------------------------------------------------------------------ tasks (progress.py)

    @property
    def current_task(self) -> str | None:
        """``progress.current_task``: the task running, or the last one that *failed* (A1111
        only clears it on success), until the next task starts."""
        return self.engine.webui.current_task

    @property
    def pending_tasks(self) -> list[str]:
        """Task ids waiting for the queue lock, in arrival order."""
        return self.engine.webui.pending_tasks

    @property
    def finished_tasks(self) -> list[str]:
        """The last 16 task ids that returned normally (an interrupted one included)."""
        return self.engine.webui.finished_tasks

    @property
    def interrupted_tasks(self) -> list[dict[str, Any]]:
        """``{"task", "step", "steps", "job_no", "pass"}`` for each task an interrupt stopped:
        ``step`` of ``steps`` done in that pass ("first" or "hires") of batch ``job_no``."""
        return self.engine.webui.interrupted_tasks

    @property
    def skipped_tasks(self) -> list[dict[str, Any]]:
        """One entry (same keys as ``interrupted_tasks``) per batch a skip cut short."""
        return self.engine.webui.skipped_tasks

    @property
    def task_runs(self) -> dict[str, dict[str, Any]]:
        """Per task id, what ran: checkpoint, sampler_name, schedule_type, seeds, steps,
        hires_steps, loras, steps_finished (per image), images, outcome (and error)."""
        return self.engine.webui.task_runs

    @property
    def failed_checkpoint_loads(self) -> list[dict[str, Any]]:
        """``{"checkpoint", "via", "error"}`` for each load of a corrupt checkpoint."""
        return self.engine.failed_checkpoint_loads


def run_simulator(
    settings: SimulatorSettings,
    host: str,
    port: int,
    *,
    log_level: str = "info",
    delay_seconds: float = 0.0,
) -> None:
    """Serve a simulator in the foreground until interrupted (for ``charforge simulate-a1111``);
    ``delay_seconds``: each generation takes this long (the faults endpoint can change it)."""
    sim = A1111Simulator(settings)
    sim.faults.delay_seconds = delay_seconds
    server = uvicorn.Server(
        _uvicorn_config(create_simulator_app(sim), log_level=log_level, host=host, port=port)
    )
    try:
        server.run()
    finally:
        sim.engine.shutdown()
