"""ComfyUI over its HTTP and websocket API.

Facts this adapter is built on (read in ComfyUI's server.py, execution.py and main.py):
- ``POST /prompt {"prompt", "client_id"}`` validates the whole graph before queueing it:
  ``400 {"error": {type, message, details, extra_info}, "node_errors": {node_id: {"errors":
  [{type, message, details, extra_info: {input_name, received_value}}], "class_type"}}}``;
  an unknown checkpoint is a ``value_not_in_list`` error on ``ckpt_name``;
- events go only to the websocket whose ``clientId`` is the prompt's ``client_id``, so the
  socket is opened before the prompt is queued; text frames are ``{"type", "data"}``, binary
  frames are previews; ``execution_interrupted`` is broadcast to every socket;
- ``execution_success`` is sent before the history entry is written, ``executing`` with
  ``node: null`` after it; ``GET /history/{id}`` is ``{}`` until then;
- the history entry's ``prompt`` is ``[number, prompt_id, graph, extra_data, outputs]``: the
  graph that ran, so the checkpoint reported is read from there;
- nodes are cached by their inputs: a prompt identical to an earlier one runs nothing, its
  SaveImage node only repeats its cached output and the history names the earlier file;
- ``/object_info`` lists combo values as ``[[...], {...}]`` (before 2025) or as
  ``["COMBO", {"options": [...]}]``; ComfyUI reports no checkpoint hashes;
- ``GET /queue`` is ``{"queue_running": [...], "queue_pending": [...]}``, each item
  ``[number, prompt_id, prompt, extra_data, outputs_to_execute]``; ``POST /queue {"delete":
  [prompt_id]}`` drops a pending prompt (a running one is not in the queue any more);
  ``POST /interrupt`` stops what runs now: ``{"prompt_id"}`` limits it to that prompt, but
  older versions ignore the body and stop whatever runs, another client's prompt included.
  So a prompt is stopped by looking it up first: pending is deleted, only running is
  interrupted.

What charforge does on top: every prompt it queued and gives up on (timeout, interrupt, any
error before its history entry is read) is stopped, else it runs on and the next prompt waits
behind it; a few failed history reads in a row are ridden out while the deadline allows. The
high-resolution pass is part of charforge's own graph (``comfyui_graph.build_graph``):
upscaler models are not loaded, a Lanczos pixel upscale stands in for them and the result's
info says what ran (``hires_upscaler_used``). A user's workflow has only the passes and
loaders it was drawn with: a request needing more (hires, LoRA tags) is refused, never
silently run without; its sampler and scheduler are required placeholders, checked by name
like charforge's own graph's.
"""

from __future__ import annotations

import base64
import contextlib
import json
import logging
import secrets
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import httpx
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidURI
from websockets.sync.client import ClientConnection, connect

from charforge.backends.base import (
    BackendRequest,
    BackendResult,
    CheckpointInfo,
    GeneratedImage,
    ProbeResult,
    Progress,
)
from charforge.backends.comfyui_graph import (
    IDS,
    Graph,
    WorkflowError,
    checkpoints_in,
    comfy_sampler,
    graph_for,
    hires_upscale,
    load_workflow,
    placeholder_inputs,
)
from charforge.backends.transport import (
    Hints,
    capitalized,
    out_of_memory,
    proxy_unavailable,
    read_json,
    send,
    timeout_of,
)
from charforge.domain.capabilities import CUSTOM_WORKFLOW_LACKS, lora_tags
from charforge.domain.checkpoints import find_checkpoint_named
from charforge.domain.params import seeds_for
from charforge.domain.requirements import require_capabilities
from charforge.domain.routes import BackendSpec
from charforge.errors import (
    BackendAuthFailed,
    BackendBadResponse,
    BackendError,
    BackendRejected,
    BackendTimeout,
    BackendUnavailable,
    CharforgeError,
    CheckpointMissing,
    InvalidInput,
    LoraMissing,
)

log = logging.getLogger(__name__)

# A checkpoint list is trusted this long; the check after generation catches one that vanished.
_CHECKPOINT_CACHE_SECONDS = 10.0
_NAME_CACHE_SECONDS = 60.0
_POLL_FIRST = 0.1  # polling /history: first pause, growing to _POLL_MAX
_POLL_MAX = 1.0
_STOP_SECONDS = 5.0  # each call that stops a prompt (/queue, /interrupt)
# What to tell a user whose request needs what this backend cannot do.
# A websocket that says nothing this long may sit behind a proxy that buffers: look at the
# history anyway, so a finished prompt is never missed.
_QUIET_SECONDS = 2.0
_WAKE_SECONDS = 0.25  # the longest a websocket read blocks before looking at the flags again
_WS_MAX_BYTES = 32 * 2**20  # previews are small; a larger frame ends the socket, polling goes on
# Failed history reads in a row (a dropped connection, a 5xx, a half-sent body) ridden out
# before giving up on a prompt; the prompt runs on regardless, the next read may get through.
_HISTORY_FAILURES = 5


def _short(text: object, limit: int = 300) -> str:
    flat = " ".join(str(text).split())
    return flat if len(flat) <= limit else flat[: limit - 1] + "…"


def combo_options(info: Any, node: str, name: str) -> list[str] | None:
    """A combo input's values from ``/object_info/{node}``, in the old and the new shape."""
    node_info = info.get(node) if isinstance(info, dict) else None
    inputs = node_info.get("input") if isinstance(node_info, dict) else None
    if not isinstance(inputs, dict):
        return None
    for section in ("required", "optional"):
        spec = inputs.get(section, {}).get(name) if isinstance(inputs.get(section), dict) else None
        if not isinstance(spec, list) or not spec:
            continue
        options: Any = spec[0]  # old: [["a", "b"], {...}]
        if spec[0] == "COMBO":  # new: ["COMBO", {"options": ["a", "b"]}]
            options = (
                spec[1].get("options") if len(spec) > 1 and isinstance(spec[1], dict) else None
            )
        if isinstance(options, list):
            return [str(option) for option in options]
    return None


def match_checkpoint(name: str, available: list[CheckpointInfo]) -> CheckpointInfo | None:
    """``name`` among ComfyUI's checkpoints, which may be in subfolders (``sd15/x.safetensors``)."""
    return find_checkpoint_named(name, available, lambda info: info.name)


def _validation_errors(body: Any) -> Iterator[tuple[str, dict[str, Any]]]:
    """``(node_id, error)`` from a 400's ``node_errors``; each error has the node's class_type."""
    node_errors = body.get("node_errors") if isinstance(body, dict) else None
    for node_id, info in (node_errors if isinstance(node_errors, dict) else {}).items():
        errors = info.get("errors") if isinstance(info, dict) else None
        for error in errors if isinstance(errors, list) else []:
            if isinstance(error, dict):
                yield str(node_id), {"class_type": info.get("class_type"), **error}


def _images(output: Any) -> list[Any]:
    images = output.get("images") if isinstance(output, dict) else None
    return images if isinstance(images, list) else []


def _websocket_url(base: str, client_id: str) -> str:
    scheme, rest = base.rstrip("/").split("://", 1)
    return f"{'wss' if scheme == 'https' else 'ws'}://{rest}/ws?clientId={client_id}"


def _sampling_passes(graph: Graph) -> int:
    """How many sampler nodes report steps (two with the high-resolution pass)."""
    return max(1, sum(isinstance(node["inputs"].get("steps"), int) for node in graph.values()))


@dataclass
class _Active:
    """One generate call: set ``interrupted`` to stop it, before or while a prompt runs."""

    task_id: str | None = None
    interrupted: threading.Event = field(default_factory=threading.Event)
    prompt_id: str | None = None


@dataclass
class _Strikes:
    """Failed history reads of one prompt in a row."""

    count: int = 0


@dataclass
class _Tracker:
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


class ComfyUIBackend:
    def __init__(
        self,
        spec: BackendSpec,
        *,
        probe_timeout: float = 3.0,
        quiet_seconds: float = _QUIET_SECONDS,
    ) -> None:
        self.spec = spec
        self._probe_timeout = probe_timeout
        self._quiet = quiet_seconds  # websocket silence after which the history is read
        self._template: Graph | None = None
        # Where the graph that ran names its checkpoint.
        self._checkpoint_inputs = [(IDS.checkpoint_loader, "ckpt_name")]
        self._capabilities = spec.capabilities
        if spec.workflow is not None:
            try:
                self._template = load_workflow(spec.workflow)
            except WorkflowError as exc:
                raise ValueError(f"{spec.source}: {exc}") from exc
            self._checkpoint_inputs = placeholder_inputs(self._template, "checkpoint")
            # Whatever the spec says: charforge cannot add passes or loaders to a workflow.
            self._capabilities = spec.capabilities - CUSTOM_WORKFLOW_LACKS
        self._client = httpx.Client(
            base_url=spec.url,
            auth=httpx.BasicAuth(*spec.auth) if spec.auth else None,
            timeout=httpx.Timeout(spec.timeout, connect=spec.connect_timeout),
            headers={"User-Agent": "charforge"},
        )
        self._info: dict[str, tuple[float, Any]] = {}
        self._listed: tuple[float, list[CheckpointInfo]] | None = None
        self._lock = threading.Lock()
        self._active: list[_Active] = []

    def close(self) -> None:
        self._client.close()

    # -- transport -------------------------------------------------------------------------

    def _where(self, style: str | None) -> str:
        # No URL: messages reach every user, and a pod URL is access to the GPU.
        what = f"the {style} style's ComfyUI backend" if style else "ComfyUI backend"
        return f"{what} '{self.spec.name}'"

    def _reach_hint(self) -> str:
        return (
            f"Check that ComfyUI is running and that the url of {self.spec.source} points at "
            "it; GET /api/styles shows which backends answer."
        )

    def _call(
        self,
        method: str,
        path: str,
        *,
        style: str | None,
        json_body: Any = None,
        params: dict[str, str] | None = None,
        timeout: float | None = None,
        accept: tuple[int, ...] = (),
    ) -> httpx.Response:
        """One request; an HTTP status in ``accept`` is returned instead of raised."""
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
                stuck=f"Check that the ComfyUI behind {self.spec.source} is not stuck.",
            ),
            json=json_body,
            params=params,
            timeout=timeout_of(timeout, self.spec.connect_timeout) or httpx.USE_CLIENT_DEFAULT,
        )
        if response.status_code >= 400 and response.status_code not in accept:
            self._raise_for_status(response, where, path)
        return response

    def _raise_for_status(self, response: httpx.Response, where: str, path: str) -> None:
        status = response.status_code
        if status in (401, 403):
            raise BackendAuthFailed(
                f"{capitalized(where)} refused charforge's credentials (HTTP {status}).",
                hint=(
                    f"Set auth of {self.spec.source} to the user:password of the proxy in "
                    "front of ComfyUI."
                ),
            )
        down = proxy_unavailable(response, where, server="ComfyUI", hint=self._reach_hint())
        if down is not None:
            raise down
        if status == 404:
            raise BackendRejected(
                f"{capitalized(where)} has no route {path} (HTTP 404); is it a ComfyUI server?",
                hint=self._reach_hint(),
            )
        raise BackendRejected(
            f"{capitalized(where)} failed on {path} (HTTP {status}): "
            f"{_short(response.text) or '-'}",
            hint="This is ComfyUI's own answer; its console shows the details.",
            retriable=status >= 500,  # a server fault may pass, or another backend may do it
        )

    @staticmethod
    def _json(response: httpx.Response, where: str) -> Any:
        return read_json(response, where, expected="ComfyUI")

    # -- what the server has ---------------------------------------------------------------

    def _object_info(
        self, node: str, *, style: str | None, max_age: float, timeout: float | None = None
    ) -> Any:
        with self._lock:
            cached = self._info.get(node)
        if cached and time.monotonic() - cached[0] < max_age:
            return cached[1]
        response = self._call("GET", f"/object_info/{node}", style=style, timeout=timeout)
        info = self._json(response, self._where(style))
        with self._lock:
            self._info[node] = (time.monotonic(), info)
        return info

    def list_checkpoints(
        self, *, style: str | None = None, timeout: float | None = None
    ) -> list[CheckpointInfo]:
        info = self._object_info(
            "CheckpointLoaderSimple", style=style, max_age=0.0, timeout=timeout
        )
        names = combo_options(info, "CheckpointLoaderSimple", "ckpt_name")
        if names is None:
            raise BackendBadResponse(
                f"{capitalized(self._where(style))} did not list its checkpoints "
                "(/object_info/CheckpointLoaderSimple has no ckpt_name).",
                hint="Something other than ComfyUI may be listening on that URL.",
            )
        listed = [CheckpointInfo(name, name, None) for name in names]
        self._listed = (time.monotonic(), listed)
        return listed

    def find_checkpoint(self, name: str, *, style: str) -> CheckpointInfo:
        cached = self._listed
        if cached and time.monotonic() - cached[0] < _CHECKPOINT_CACHE_SECONDS:
            found = match_checkpoint(name, cached[1])
            if found is not None:
                return found
        # ComfyUI rescans its folders on every listing: a new file shows up without a refresh.
        available = self.list_checkpoints(style=style)
        found = match_checkpoint(name, available)
        if found is None:
            names = ", ".join(c.name for c in available) or "none"
            raise CheckpointMissing(
                f"Checkpoint '{name}' for the {style} style is not on ComfyUI backend "
                f"'{self.spec.name}'. That backend has: {names}.",
                hint=self._missing_hint(name, style),
            )
        return found

    def _missing_hint(self, name: str, style: str) -> str:
        return (
            f"Put {name} into ComfyUI's models/checkpoints folder, or point {self.spec.source} "
            f"at a backend that has it, or change the route with [routes.{style}] checkpoint "
            "in CHARFORGE_CONFIG."
        )

    def _check_name(self, value: str, asked: str, input_name: str, field: str, style: str) -> None:
        info = self._object_info("KSampler", style=style, max_age=_NAME_CACHE_SECONDS)
        names = combo_options(info, "KSampler", input_name)
        if names is None or value in names:
            return  # a ComfyUI without KSampler info validates the prompt itself
        shown = f"'{asked}'" if asked == value else f"'{asked}' (ComfyUI: '{value}')"
        raise InvalidInput(
            f"{field.capitalize()} {shown} is not known to ComfyUI backend '{self.spec.name}'. "
            f"Known: {', '.join(names)}.",
            field=field,
            hint=f"Pick one of the {field}s listed, or leave {field} out for the default.",
        )

    # -- generation ------------------------------------------------------------------------

    def graph(
        self, request: BackendRequest, seed: int, loras: dict[str, str] | None = None
    ) -> Graph:
        """The API-format graph for one image of ``request``."""
        return graph_for(
            self._template, request.params, request.checkpoint.title, seed, loras=loras
        )

    def lora_files(self, prompt: str, style: str) -> dict[str, str]:
        """The file LoraLoader lists for each ``<lora:name>`` tag (a subfolder or extension
        may be left out of the tag); LoraMissing naming what ComfyUI has otherwise, before
        anything is queued."""
        wanted = [name for name, _ in lora_tags(prompt)]
        if not wanted:
            return {}
        info = self._object_info("LoraLoader", style=style, max_age=0.0)
        listed = combo_options(info, "LoraLoader", "lora_name") or []
        found: dict[str, str] = {}
        for name in wanted:
            match = find_checkpoint_named(name, listed, lambda file: file)
            if match is None:
                raise LoraMissing(
                    f"LoRA '{name}' is not on ComfyUI backend '{self.spec.name}'. That backend "
                    f"has: {', '.join(listed) or 'none'}.",
                    field="prompt",
                    hint="Put the file into ComfyUI's models/loras folder, or fix the "
                    "<lora:name:weight> tag in the prompt or the character's description.",
                    extra={"loras": listed},
                )
            found[name] = match
        return found

    def generate(self, request: BackendRequest) -> BackendResult:
        p = request.params
        require_capabilities(
            self.spec, request.params, request.style, capabilities=self._capabilities
        )
        # Both are placeholders every workflow must have, like charforge's own graph.
        sampler, scheduler = comfy_sampler(p.sampler, p.scheduler)
        self._check_name(sampler, p.sampler, "sampler_name", "sampler", request.style)
        self._check_name(scheduler, p.scheduler, "scheduler", "scheduler", request.style)
        loras = self.lora_files(p.prompt, request.style) if self._template is None else {}
        seeds = seeds_for(p.seed, request.count, pick=secrets.randbelow)
        deadline = time.monotonic() + self.spec.timeout
        tracker = _Tracker(request.on_progress, request.count)
        active = _Active(request.task_id, request.cancelled or threading.Event())
        images: list[GeneratedImage] = []
        reported: list[str | None] = []
        prompt_ids: list[str] = []
        with self._lock:
            self._active.append(active)
        try:
            for index, seed in enumerate(seeds):
                graph = self.graph(request, seed, loras)
                tracker.start(index, _sampling_passes(graph))
                prompt_id, entry = self._run(graph, request.style, tracker, deadline, active)
                data, checkpoint = self._collect(entry, graph, request.style)
                images.append(GeneratedImage(data, seed))
                reported.append(checkpoint)
                prompt_ids.append(prompt_id)
                tracker.finished()
        finally:
            with self._lock:
                self._active.remove(active)
        # One image made with another model must not hide behind the others.
        odd = [c for c in reported if c != request.checkpoint.title]
        info: dict[str, Any] = {"prompt_ids": prompt_ids, "seeds": [image.seed for image in images]}
        if p.hires and self._template is None:
            upscale = hires_upscale(p.hires_upscaler)
            info["hires_upscaler_used"] = upscale.label
            info["hires_upscaler_asked"] = p.hires_upscaler
        return BackendResult(
            images=images,
            checkpoint=odd[0] if odd else reported[0],
            checkpoint_hash=None,  # ComfyUI reports none
            info=info,
        )

    def _run(
        self, graph: Graph, style: str, tracker: _Tracker, deadline: float, active: _Active
    ) -> tuple[str, dict[str, Any]]:
        """Queue one graph and wait for its history entry."""
        interrupted = active.interrupted
        self._check_time(deadline, interrupted, style)
        client_id = uuid.uuid4().hex
        with contextlib.ExitStack() as stack:
            # Opened before queueing: events sent before a client connects are lost.
            socket = self._open_socket(client_id, stack)
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

    def _open_socket(self, client_id: str, stack: contextlib.ExitStack) -> ClientConnection | None:
        headers = {}
        if self.spec.auth:
            token = base64.b64encode(":".join(self.spec.auth).encode()).decode()
            headers["Authorization"] = f"Basic {token}"
        try:
            # As a context manager: websockets 17.1 deprecates a bare connect().
            return stack.enter_context(
                connect(
                    _websocket_url(self.spec.url, client_id),
                    additional_headers=headers,
                    user_agent_header="charforge",
                    open_timeout=self.spec.connect_timeout,
                    close_timeout=1.0,
                    max_size=_WS_MAX_BYTES,
                )
            )
        except (OSError, TimeoutError, InvalidHandshake, InvalidURI) as exc:
            # A proxy without websocket support: the history still tells when it is done.
            log.info("backend %s: no websocket (%s); polling instead", self.spec.name, exc)
            return None

    def _queue(self, graph: Graph, client_id: str, style: str) -> str:
        where = self._where(style)
        response = self._call(
            "POST",
            "/prompt",
            style=style,
            json_body={"prompt": graph, "client_id": client_id},
            accept=(400,),
        )
        body = self._json(response, where)
        if response.status_code == 400:
            raise self._refusal(body, graph, style)
        prompt_id = body.get("prompt_id") if isinstance(body, dict) else None
        if not isinstance(prompt_id, str) or not prompt_id:
            raise BackendBadResponse(
                f"{capitalized(where)} queued the prompt but sent no prompt_id."
            )
        return prompt_id

    def _refusal(self, body: Any, graph: Graph, style: str) -> BackendError:
        """ComfyUI's 400 as the error a user can act on."""
        problems: list[str] = []
        for node_id, error in _validation_errors(body):
            extra = error.get("extra_info")
            extra = extra if isinstance(extra, dict) else {}
            name = extra.get("input_name")
            if error.get("type") == "value_not_in_list" and name == "ckpt_name":
                self._listed = None  # the list it was found in is out of date
                checkpoint = str(extra.get("received_value", "?"))
                return CheckpointMissing(
                    f"Checkpoint '{checkpoint}' for the {style} style is not on ComfyUI backend "
                    f"'{self.spec.name}': ComfyUI refused the prompt "
                    f"({_short(error.get('details', ''))}).",
                    hint=self._missing_hint(checkpoint, style),
                )
            class_type = error.get("class_type") or graph.get(node_id, {}).get("class_type")
            what = f"{class_type} (node {node_id})" + (f" input {name}" if name else "")
            detail = error.get("details")
            problems.append(
                f"{what}: {error.get('message', 'invalid')}" + (f" ({detail})" if detail else "")
            )
        if not problems:  # a graph-wide error: unknown node type, no output node
            top = body.get("error") if isinstance(body, dict) else body
            if isinstance(top, dict):
                detail = top.get("details")
                top = str(top.get("message", "invalid prompt")) + (f": {detail}" if detail else "")
            problems.append(str(top))
        return BackendRejected(
            f"{capitalized(self._where(style))} refused the prompt: "
            f"{_short('; '.join(problems), 600)}",
            hint=(
                "This is ComfyUI's own validation message: a missing model or LoRA file goes "
                "into ComfyUI's models folder; a custom workflow may need its nodes installed."
            ),
            retriable=False,  # the same graph is refused the same way every time
        )

    def _follow(
        self,
        socket: ClientConnection,
        prompt_id: str,
        tracker: _Tracker,
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
                raise self._failure(kind, data, style)
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
        if interrupted.is_set():
            raise BackendRejected(
                f"The generation on {self._where(style)} was interrupted.", retriable=True
            )
        if time.monotonic() >= deadline:
            raise BackendTimeout(
                f"{capitalized(self._where(style))} did not finish within {self.spec.timeout:g}s; "
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
        where = self._where(style)
        response = self._call("GET", f"/history/{prompt_id}", style=style)
        body = self._json(response, where)
        if not isinstance(body, dict):
            raise BackendBadResponse(f"{capitalized(where)} sent a malformed history.")
        entry = body.get(prompt_id)
        return entry if isinstance(entry, dict) else None

    def _failure(self, kind: str, data: dict[str, Any], style: str) -> BackendRejected:
        where = self._where(style)
        node = f"node {data.get('node_id', '?')} ({data.get('node_type', '?')})"
        if kind == "execution_interrupted":
            return BackendRejected(
                f"The generation on {where} was interrupted at {node}.",
                hint="Someone or something interrupted ComfyUI; the job is tried again.",
                retriable=True,
            )
        exception = f"{data.get('exception_type', 'error')}: {data.get('exception_message', '')}"
        # Out of GPU memory passes, or another backend has more; any other node error would
        # fail the same way again.
        oom = out_of_memory(exception)
        return BackendRejected(
            f"{capitalized(where)} failed while running {node}: {_short(exception)}",
            hint=(
                "ComfyUI ran out of GPU memory: lower width/height or turn hires off."
                if oom
                else "This is ComfyUI's own error; its console shows the traceback."
            ),
            retriable=oom,
        )

    def _collect(self, entry: dict[str, Any], graph: Graph, style: str) -> tuple[bytes, str | None]:
        """The saved image and the checkpoint that really ran, from a history entry."""
        where = self._where(style)
        self._raise_if_failed(entry, style)
        item = entry.get("prompt")
        ran = item[2] if isinstance(item, list) and len(item) > 2 else None
        ran_graph: Graph = ran if isinstance(ran, dict) else {}
        outputs = entry.get("outputs") if isinstance(entry.get("outputs"), dict) else {}
        assert isinstance(outputs, dict)
        saves = [
            node_id
            for node_id, node in (ran_graph or graph).items()
            if isinstance(node, dict) and node.get("class_type") == "SaveImage"
        ]
        files = [
            image
            for node_id in saves + sorted(set(outputs) - set(saves))  # SaveImage first
            for image in _images(outputs.get(node_id))
            if isinstance(image, dict) and image.get("type", "output") == "output"
        ]
        if not files:
            raise BackendBadResponse(
                f"{capitalized(where)} finished the prompt but saved no image."
            )
        return self._download(files[0], style), self._ran_checkpoint(ran_graph)

    def _raise_if_failed(self, entry: dict[str, Any], style: str) -> None:
        """A history entry of a failed prompt (seen when polling) raises what the websocket
        would have said: its status keeps the execution_error / _interrupted message."""
        status = entry.get("status")
        if not isinstance(status, dict) or status.get("status_str") != "error":
            return
        for message in status.get("messages") or []:
            kind, data = message if isinstance(message, list) and len(message) == 2 else (0, 0)
            if kind in ("execution_error", "execution_interrupted") and isinstance(data, dict):
                raise self._failure(kind, data, style)
        raise BackendRejected(
            f"{capitalized(self._where(style))} reported an error without details."
        )

    def _ran_checkpoint(self, ran: Graph) -> str | None:
        for node_id, name in self._checkpoint_inputs:
            node = ran.get(node_id)
            inputs = node.get("inputs") if isinstance(node, dict) else None
            value = inputs.get(name) if isinstance(inputs, dict) else None
            if isinstance(value, str):
                return value
        found = checkpoints_in(ran)
        return found[0] if found else None

    def _download(self, image: dict[str, Any], style: str) -> bytes:
        where = self._where(style)
        params = {
            "filename": str(image.get("filename", "")),
            "subfolder": str(image.get("subfolder", "")),
            "type": str(image.get("type", "output")),
        }
        response = self._call("GET", "/view", style=style, params=params, accept=(400, 403, 404))
        if response.status_code != 200 or not response.content:
            raise BackendBadResponse(
                f"{capitalized(where)} listed {params['filename']} as its output but did not "
                "send it "
                f"(HTTP {response.status_code}).",
                hint="ComfyUI's output folder may have been cleaned meanwhile.",
            )
        return response.content

    # -- control ---------------------------------------------------------------------------

    def _control(self, method: str, path: str, body: Any = None) -> httpx.Response | None:
        """One short call of ``_stop``; None (logged) when it failed or was refused."""
        try:
            response = send(
                self._client,
                method,
                path,
                where=self._where(None),
                connect_timeout=self.spec.connect_timeout,
                limit=_STOP_SECONDS,
                hints=Hints(reach=self._reach_hint(), stuck=""),
                json=body,
                timeout=timeout_of(_STOP_SECONDS, self.spec.connect_timeout),
            )
        except CharforgeError as exc:
            log.warning("backend %s: %s %s failed: %s", self.spec.name, method, path, exc.message)
            return None
        if response.status_code >= 400:
            log.warning(
                "backend %s: %s %s answered HTTP %d: %s",
                self.spec.name,
                method,
                path,
                response.status_code,
                _short(response.text, 200),
            )
            return None
        return response

    def _place(self, prompt_id: str) -> str | None:
        """Where the prompt is: "running", "pending", "gone" (done, or never there), or None
        when the queue could not be read."""
        response = self._control("GET", "/queue")
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
                return self._control("POST", "/interrupt", {"prompt_id": prompt_id}) is not None
            if place != "pending":  # gone (done, or deleted just now), or unknown
                return deleted
            if self._control("POST", "/queue", {"delete": [prompt_id]}) is None:
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

    def loaded_checkpoint(self) -> str | None:
        return None  # ComfyUI does not say; the pool remembers what it last ran

    def probe(self) -> ProbeResult:
        started = time.perf_counter()
        try:
            checkpoints = self.list_checkpoints(timeout=self._probe_timeout)
        except Exception as exc:  # any failure means "does not answer properly"
            message = getattr(exc, "message", None) or str(exc) or type(exc).__name__
            return ProbeResult(False, None, message)
        latency = (time.perf_counter() - started) * 1000
        return ProbeResult(True, latency, None, checkpoints, None)
