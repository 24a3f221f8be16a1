"""One graph queued on ComfyUI and followed to its history entry; prompts given up on are
stopped.

Facts (ComfyUI's server.py, execution.py, main.py; what its answers mean is in wire.py):
- ``POST /prompt {"prompt", "client_id"}`` validates the whole graph before queueing it (a
  400 with ``node_errors`` when it refuses it);
- events go only to the websocket whose ``clientId`` is the prompt's ``client_id``, so the
  socket is opened before the prompt is queued; text frames are ``{"type", "data"}``, binary
  frames are previews; ``execution_interrupted`` is broadcast to every socket;
- ``execution_success`` is sent before the history entry is written, ``executing`` with
  ``node: null`` after it; ``GET /history/{id}`` is ``{}`` until then;
- ``GET /queue`` is ``{"queue_running": [...], "queue_pending": [...]}``, each item
  ``[number, prompt_id, prompt, extra_data, outputs_to_execute]``; ``POST /queue {"delete":
  [prompt_id]}`` drops a pending prompt (a running one is not in the queue any more);
  ``POST /interrupt`` stops what runs now: ``{"prompt_id"}`` limits it to that prompt, but
  older versions ignore the body and stop whatever runs, another client's prompt included.
  So a prompt is stopped by looking it up first: pending is deleted, only running is
  interrupted.
"""

from __future__ import annotations

import contextlib
import json
import logging
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from websockets.exceptions import ConnectionClosed
from websockets.sync.client import ClientConnection

from charforge.backends.base import Progress
from charforge.backends.comfyui.client import ComfyClient
from charforge.backends.comfyui.graph import Graph
from charforge.backends.comfyui.wire import failure, ran_checkpoint, refusal, saved_image
from charforge.backends.transport import capitalized
from charforge.errors import (
    BackendBadResponse,
    BackendError,
    BackendRejected,
    BackendTimeout,
    BackendUnavailable,
)

log = logging.getLogger(__name__)

_POLL_FIRST = 0.1  # polling /history: first pause, growing to _POLL_MAX
_POLL_MAX = 1.0
# A websocket that says nothing this long may sit behind a proxy that buffers: look at the
# history anyway, so a finished prompt is never missed.
QUIET_SECONDS = 2.0
_WAKE_SECONDS = 0.25  # the longest a websocket read blocks before looking at the flags again
# Failed history reads in a row (a dropped connection, a 5xx, a half-sent body) ridden out
# before giving up on a prompt; the prompt runs on regardless, the next read may get through.
_HISTORY_FAILURES = 5


def sampling_passes(graph: Graph) -> int:
    """How many sampler nodes report steps (two with the high-resolution pass)."""
    return max(1, sum(isinstance(node["inputs"].get("steps"), int) for node in graph.values()))


@dataclass
class Active:
    """One generate call: set ``interrupted`` to stop it, before or while a prompt runs."""

    task_id: str | None = None
    interrupted: threading.Event = field(default_factory=threading.Event)
    prompt_id: str | None = None


@dataclass
class _Strikes:
    """Failed history reads of one prompt in a row."""

    count: int = 0


@dataclass
class Tracker:
    """Turns ComfyUI's per-node ``progress`` into one fraction over the whole request."""

    report: Callable[[Progress], None] | None
    count: int
    index: int = 0
    passes: int = 1
    nodes: dict[str, float] = field(default_factory=dict)
    last: float = 0.0

    def start(self, index: int, passes: int) -> None:
        self.index, self.passes, self.nodes = index, passes, {}

    def step(self, node: str, value: int, maximum: int) -> None:
        self.nodes[node] = min(value / maximum, 1.0)
        within = min(sum(self.nodes.values()) / self.passes, 1.0)
        self._send(Progress((self.index + within) / self.count, value, maximum))

    def finished(self) -> None:
        self._send(Progress((self.index + 1) / self.count))

    def _send(self, update: Progress) -> None:
        if self.report is None or update.fraction < self.last:
            return
        self.last = update.fraction
        try:
            self.report(update)
        except Exception:  # progress is a nicety: it must not fail the generation
            log.exception("progress callback failed")


class PromptRunner:
    """Runs graphs on one ComfyUI for its adapter, and stops them (``interrupt``)."""

    def __init__(
        self,
        client: ComfyClient,
        *,
        quiet_seconds: float,
        checkpoint_refused: Callable[[str, str], str],
    ) -> None:
        self.client = client
        self.spec = client.spec
        self._quiet = quiet_seconds  # websocket silence after which the history is read
        # Called when ComfyUI refuses a checkpoint (name, style): the adapter forgets its list
        # and answers the hint for the user.
        self._checkpoint_refused = checkpoint_refused
        self._lock = threading.Lock()
        self._active: list[Active] = []

    @contextlib.contextmanager
    def tracking(self, active: Active) -> Iterator[None]:
        with self._lock:
            self._active.append(active)
        try:
            yield
        finally:
            with self._lock:
                self._active.remove(active)

    def run(
        self, graph: Graph, style: str, tracker: Tracker, deadline: float, active: Active
    ) -> tuple[str, dict[str, Any]]:
        """Queue one graph and wait for its history entry."""
        interrupted = active.interrupted
        self._check_time(deadline, interrupted, style)
        client_id = uuid.uuid4().hex
        with contextlib.ExitStack() as stack:
            # Opened before queueing: events sent before a client connects are lost.
            socket = self.client.open_socket(client_id, stack)
            prompt_id = self._queue(graph, client_id, style)
            with self._lock:
                active.prompt_id = prompt_id
            if interrupted.is_set():  # interrupt() came while the prompt was being queued
                self._stop(prompt_id)
            strikes = _Strikes()
            try:
                entry = None
                if socket is not None:
                    entry = self._follow(
                        socket, prompt_id, tracker, deadline, interrupted, style, strikes
                    )
                if not entry:
                    entry = self._poll(prompt_id, deadline, interrupted, style, strikes)
                return prompt_id, entry
            except BaseException:
                # Whatever went wrong, the prompt would run on and the next one wait behind
                # it. An interrupt() has stopped it already (it sets the flag, then stops).
                if not interrupted.is_set():
                    self._stop(prompt_id)
                raise
            finally:
                with self._lock:
                    active.prompt_id = None

    def _queue(self, graph: Graph, client_id: str, style: str) -> str:
        where = self.client.where(style)
        response = self.client.call(
            "POST",
            "/prompt",
            style=style,
            json_body={"prompt": graph, "client_id": client_id},
            accept=(400,),
        )
        body = self.client.json(response, where)
        if response.status_code == 400:
            raise self._refusal(body, graph, style)
        prompt_id = body.get("prompt_id") if isinstance(body, dict) else None
        if not isinstance(prompt_id, str) or not prompt_id:
            raise BackendBadResponse(
                f"{capitalized(where)} queued the prompt but sent no prompt_id."
            )
        return prompt_id

    def _refusal(self, body: Any, graph: Graph, style: str) -> BackendError:
        return refusal(
            body,
            graph,
            where=self.client.where(style),
            backend=self.spec.name,
            style=style,
            checkpoint_refused=self._checkpoint_refused,
        )

    def _follow(
        self,
        socket: ClientConnection,
        prompt_id: str,
        tracker: Tracker,
        deadline: float,
        interrupted: threading.Event,
        style: str,
        strikes: _Strikes,
    ) -> dict[str, Any] | None:
        """Read events until the prompt is done; None when the history must still be read
        (it is done, or the socket dropped), else the history entry already read."""
        heard = time.monotonic()  # the last frame, or the last look at the history
        while True:
            self._check_time(deadline, interrupted, style)
            now = time.monotonic()
            # Short waits: an interrupt() or the deadline is noticed soon, not after the quiet.
            wait = min(_WAKE_SECONDS, self._quiet - (now - heard), deadline - now)
            try:
                frame = socket.recv(timeout=max(0.01, wait))
            except TimeoutError:
                if time.monotonic() - heard < self._quiet:
                    continue
                entry = self._look(prompt_id, style, strikes)
                if entry is not None:
                    return entry
                heard = time.monotonic()
                continue
            except (ConnectionClosed, OSError) as exc:
                log.info("backend %s: websocket lost (%s); polling", self.spec.name, exc)
                return None
            heard = time.monotonic()
            if isinstance(frame, bytes):
                continue  # a preview image
            try:
                message = json.loads(frame)
            except ValueError:
                continue
            if not isinstance(message, dict) or not isinstance(message.get("data"), dict):
                continue
            kind, data = message.get("type"), message["data"]
            if data.get("prompt_id", prompt_id) != prompt_id:
                continue  # broadcasts (a prompt queued without client_id) may name another
            if kind == "progress":
                value, maximum = data.get("value"), data.get("max")
                if isinstance(value, int) and isinstance(maximum, int) and maximum > 0:
                    tracker.step(str(data.get("node")), value, maximum)
            elif kind in ("execution_error", "execution_interrupted"):
                raise failure(kind, data, self.client.where(style))
            elif kind == "executing" and data.get("node") is None:
                return None  # sent after the history is written (execution_success: before)

    def _poll(
        self,
        prompt_id: str,
        deadline: float,
        interrupted: threading.Event,
        style: str,
        strikes: _Strikes,
    ) -> dict[str, Any]:
        pause = _POLL_FIRST
        while True:
            entry = self._look(prompt_id, style, strikes)
            if entry is not None:
                return entry
            self._check_time(deadline, interrupted, style)
            interrupted.wait(min(pause, max(deadline - time.monotonic(), 0.0)))
            pause = min(pause * 2, _POLL_MAX)

    def _check_time(self, deadline: float, interrupted: threading.Event, style: str) -> None:
        where = self.client.where(style)
        if interrupted.is_set():
            raise BackendRejected(f"The generation on {where} was interrupted.", retriable=True)
        if time.monotonic() >= deadline:
            raise BackendTimeout(
                f"{capitalized(where)} did not finish within {self.spec.timeout:g}s; "
                "the prompt was stopped.",
                hint=(
                    f"Check that the ComfyUI behind {self.spec.source} is not stuck or busy with "
                    "other work; for slow GPUs raise timeout_seconds of the backend."
                ),
            )

    def _look(self, prompt_id: str, style: str, strikes: _Strikes) -> dict[str, Any] | None:
        """``_history``, riding out up to ``_HISTORY_FAILURES`` passing faults in a row (the
        caller's deadline still bounds the whole wait)."""
        try:
            entry = self._history(prompt_id, style)
        except (BackendUnavailable, BackendBadResponse, BackendRejected) as exc:
            strikes.count += 1
            if not exc.retriable or strikes.count >= _HISTORY_FAILURES:
                raise
            log.info(
                "backend %s: history of %s not read (%d in a row): %s",
                self.spec.name,
                prompt_id,
                strikes.count,
                exc.message,
            )
            return None
        strikes.count = 0
        return entry

    def _history(self, prompt_id: str, style: str) -> dict[str, Any] | None:
        """The prompt's history entry; None while it is queued or running."""
        where = self.client.where(style)
        response = self.client.call("GET", f"/history/{prompt_id}", style=style)
        body = self.client.json(response, where)
        if not isinstance(body, dict):
            raise BackendBadResponse(f"{capitalized(where)} sent a malformed history.")
        entry = body.get(prompt_id)
        return entry if isinstance(entry, dict) else None

    # -- the result ------------------------------------------------------------------------

    def collect(
        self,
        entry: dict[str, Any],
        graph: Graph,
        style: str,
        checkpoint_inputs: list[tuple[str, str]],
    ) -> tuple[bytes, str | None]:
        """The saved image and the checkpoint that really ran, from a history entry."""
        image, ran = saved_image(entry, graph, self.client.where(style))
        return self._download(image, style), ran_checkpoint(ran, checkpoint_inputs)

    def _download(self, image: dict[str, Any], style: str) -> bytes:
        where = self.client.where(style)
        params = {
            "filename": str(image.get("filename", "")),
            "subfolder": str(image.get("subfolder", "")),
            "type": str(image.get("type", "output")),
        }
        response = self.client.call(
            "GET", "/view", style=style, params=params, accept=(400, 403, 404)
        )
        if response.status_code != 200 or not response.content:
            raise BackendBadResponse(
                f"{capitalized(where)} listed {params['filename']} as its output but did not "
                "send it "
                f"(HTTP {response.status_code}).",
                hint="ComfyUI's output folder may have been cleaned meanwhile.",
            )
        return response.content

    # -- stopping --------------------------------------------------------------------------

    def _place(self, prompt_id: str) -> str | None:
        """Where the prompt is: "running", "pending", "gone" (done, or never there), or None
        when the queue could not be read."""
        response = self.client.control("GET", "/queue")
        try:
            body = response.json() if response is not None else None
        except ValueError:
            body = None
        if not isinstance(body, dict):
            if response is not None:
                log.warning("backend %s: GET /queue sent no queue", self.spec.name)
            return None
        for place, key in (("running", "queue_running"), ("pending", "queue_pending")):
            items = body.get(key)
            for item in items if isinstance(items, list) else []:
                if isinstance(item, list) and len(item) > 1 and item[1] == prompt_id:
                    return place
        return "gone"

    def _stop(self, prompt_id: str) -> bool:
        """Stop one prompt of ours; whether that was done. Never raises: it runs while
        another error is on its way to the caller."""
        try:
            return self._stop_prompt(prompt_id)
        except Exception:
            log.exception("backend %s: could not stop prompt %s", self.spec.name, prompt_id)
            return False

    def _stop_prompt(self, prompt_id: str) -> bool:
        """A pending prompt is only deleted from the queue: /interrupt goes out only while it
        runs, since older ComfyUI ignores its prompt_id and would stop another client's. (That
        one may still finish between the look and the interrupt there: a narrow race only a
        newer ComfyUI closes.)"""
        deleted = False
        for _ in range(2):  # a prompt deleted while it started running is interrupted
            place = self._place(prompt_id)
            if place == "running":
                body = {"prompt_id": prompt_id}
                return self.client.control("POST", "/interrupt", body) is not None
            if place != "pending":  # gone (done, or deleted just now), or unknown
                return deleted
            if self.client.control("POST", "/queue", {"delete": [prompt_id]}) is None:
                return False
            deleted = True
        log.warning("backend %s: prompt %s stays queued", self.spec.name, prompt_id)
        return False

    def interrupt(self, task_id: str) -> bool:
        """Stop the generation of this task: its prompt running or queued now, and the images
        of its request not queued yet (other prompts, ours or anyone's, go on). False when it
        was not running here, or its prompt could not be stopped (ComfyUI refused, or did not
        answer)."""
        with self._lock:
            active = [a for a in self._active if a.task_id == task_id]
            prompt_ids = [a.prompt_id for a in active if a.prompt_id is not None]
            for one in active:
                one.interrupted.set()
        # Each in turn: one failure must not keep the others running.
        results = [self._stop(prompt_id) for prompt_id in prompt_ids]
        return bool(active) and all(results)
