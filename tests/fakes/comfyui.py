"""A fake ComfyUI on a real 127.0.0.1 socket: HTTP routes and the ``/ws`` websocket.

It follows ComfyUI's server.py / execution.py / main.py where charforge depends on them:
- ``POST /prompt`` validates like ``validate_prompt`` (unknown node type, missing input,
  wrong link type, numbers out of range, a combo value not in its list) and answers 400 with
  ``{"error", "node_errors"}``, else queues it and answers ``{"prompt_id", "number",
  "node_errors"}``;
- one worker thread runs the queue and sends events only to the websocket of the prompt's
  ``client_id``: execution_start, execution_cached, executing, progress (+ a binary preview),
  executed, execution_success | execution_error | execution_interrupted, then
  ``executing {node: null}`` after the history entry is written;
- outputs are cached by node inputs as ComfyUI's classic cache does (only entries of the
  prompt now running are kept): an identical prompt runs nothing, its SaveImage node repeats
  its cached output in ``executed`` and the history names the earlier file;
- ``GET /queue`` lists ``queue_running`` / ``queue_pending`` items as ``[number, prompt_id,
  prompt, extra_data, outputs_to_execute]``; ``POST /queue {"delete"}`` drops pending ones;
  ``POST /interrupt {"prompt_id"}`` stops only that prompt, and only while it runs (older
  ComfyUI, ``interrupt_ignores_prompt_id``, stops whatever runs);
- the nodes of charforge's graphs: the latent hires pass (``LatentUpscaleBy``) and the pixel
  one (``VAEDecode`` -> ``ImageScaleBy`` -> ``VAEEncode``), each scaling the image it renders;
- identity conditioning (see ``comfy_identity``): ``POST /upload/image`` (multipart ``image``,
  ``type``, ``subfolder``, ``overwrite``; a clash is renamed ``x (1).png``), ``LoadImage``, and
  with ``ipadapter=True`` the ``IPAdapterUnifiedLoader`` / ``IPAdapterAdvanced`` nodes, whose
  reference blends into the saved picture by weight (without the pack they are unknown nodes).
It records every request (and websocket) it receives and can be told to fail: ``faults``.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import io
import json
import operator
import struct
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from fastapi import FastAPI, Request, Response, WebSocket, WebSocketDisconnect
from fastapi.responses import JSONResponse
from PIL import Image
from PIL.PngImagePlugin import PngInfo
from starlette.datastructures import UploadFile as StarletteUpload

from charforge.simulator.render import Placeholder, render_placeholder
from tests.fakes.comfy_identity import (
    IPADAPTER_NODES,
    InputFolder,
    Upload,
    blend_references,
    load_image_error,
    open_picture,
    spec_inputs,
)
from tests.helpers import LiveServer

SAMPLERS = ["euler", "euler_ancestral", "heun", "dpm_2", "dpmpp_2m", "dpmpp_sde", "ddim", "uni_pc"]
SCHEDULERS = ["normal", "karras", "exponential", "sgm_uniform", "simple", "ddim_uniform", "beta"]
UPSCALE_METHODS = ["nearest-exact", "bilinear", "area", "bicubic", "bislerp"]  # LatentUpscaleBy
IMAGE_UPSCALE_METHODS = ["nearest-exact", "bilinear", "area", "bicubic", "lanczos"]  # ImageScaleBy
OUTPUT_NODES = {"SaveImage"}
RETURNS: dict[str, tuple[str, ...]] = {
    "CheckpointLoaderSimple": ("MODEL", "CLIP", "VAE"),
    "LoraLoader": ("MODEL", "CLIP"),
    "CLIPSetLastLayer": ("CLIP",),
    "CLIPTextEncode": ("CONDITIONING",),
    "EmptyLatentImage": ("LATENT",),
    "KSampler": ("LATENT",),
    "LatentUpscaleBy": ("LATENT",),
    "VAEDecode": ("IMAGE",),
    "ImageScaleBy": ("IMAGE",),
    "VAEEncode": ("LATENT",),
    "LoadImage": ("IMAGE", "MASK"),
    "SaveImage": (),
}
IPADAPTER_RETURNS: dict[str, tuple[str, ...]] = {
    name: tuple(spec["output"]) for name, spec in IPADAPTER_NODES.items()
}
_VALUE_TYPES = {"INT", "FLOAT", "STRING", "COMBO", "UPLOAD"}


# A user's own API-format workflow: one pass, charforge fills the placeholders.
USER_WORKFLOW: dict[str, Any] = {
    "ckpt": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "{{checkpoint}}"}},
    "pos": {"class_type": "CLIPTextEncode", "inputs": {"text": "{{prompt}}", "clip": ["ckpt", 1]}},
    "neg": {
        "class_type": "CLIPTextEncode",
        "inputs": {"text": "{{negative_prompt}}", "clip": ["ckpt", 1]},
    },
    "latent": {
        "class_type": "EmptyLatentImage",
        "inputs": {"width": "{{width}}", "height": "{{height}}", "batch_size": 1},
    },
    "sample": {
        "class_type": "KSampler",
        "inputs": {
            "model": ["ckpt", 0],
            "seed": "{{seed}}",
            "steps": "{{steps}}",
            "cfg": "{{cfg}}",
            "sampler_name": "{{sampler}}",
            "scheduler": "{{scheduler}}",
            "positive": ["pos", 0],
            "negative": ["neg", 0],
            "latent_image": ["latent", 0],
            "denoise": 1.0,
        },
    },
    "decode": {"class_type": "VAEDecode", "inputs": {"samples": ["sample", 0], "vae": ["ckpt", 2]}},
    "save": {
        "class_type": "SaveImage",
        "inputs": {"images": ["decode", 0], "filename_prefix": "mine"},
    },
}


@dataclass
class ComfyFaults:
    prompt_status: int | None = None  # answer POST /prompt with this HTTP status
    hang: bool = False  # samplers never finish, until interrupted
    drop_websocket: bool = False  # close a prompt's websocket when it starts running
    refuse_websocket: bool = False  # refuse the websocket handshake (HTTP 403)
    execution_error: tuple[str, str] | None = None  # (exception_type, message) from KSampler
    missing_view: bool = False  # /view answers 404
    step_delay: float = 0.0  # seconds per sampling step
    history_failures: int = 0  # the next this many GET /history/{id} fail ...
    history_failure: str = "500"  # ... with HTTP 500 ("500") or a 200 that is not JSON ("json")
    interrupt_status: int | None = None  # answer POST /interrupt with this HTTP status
    queue_status: int | None = None  # answer GET and POST /queue with this HTTP status
    interrupt_ignores_prompt_id: bool = False  # ComfyUI before 2025: stops whatever runs


@dataclass(frozen=True)
class Recorded:
    method: str  # "WS" for a websocket
    path: str
    query: dict[str, str]
    body: Any
    headers: dict[str, str]


class _Interrupted(Exception):
    pass


class _NodeFailed(Exception):
    def __init__(self, exception_type: str, message: str) -> None:
        super().__init__(message)
        self.exception_type, self.message = exception_type, message


def _reason(kind: str, message: str, details: str, **extra: Any) -> dict[str, Any]:
    return {"type": kind, "message": message, "details": details, "extra_info": extra}


@dataclass
class _Run:
    """One prompt being executed."""

    number: float
    prompt_id: str
    prompt: dict[str, Any]
    extra: dict[str, Any]
    outputs: list[str]
    signatures: dict[str, str] = field(default_factory=dict)
    values: dict[str, tuple[Any, ...]] = field(default_factory=dict)
    executed: list[str] = field(default_factory=list)
    messages: list[list[Any]] = field(default_factory=list)

    @property
    def item(self) -> list[Any]:
        return [self.number, self.prompt_id, self.prompt, self.extra, self.outputs]


class FakeComfyUI:
    def __init__(
        self,
        checkpoints: list[str] | None = None,
        *,
        loras: list[str] | None = None,
        object_info_shape: str = "new",  # "old": [[...], {}]; "new": ["COMBO", {"options"}]
        auth: tuple[str, str] | None = None,
        ipadapter: bool = False,  # cubiq/ComfyUI_IPAdapter_plus installed
    ) -> None:
        self.checkpoints = checkpoints or ["diving.safetensors", "sd15/other.safetensors"]
        self.loras = loras or ["detail.safetensors"]
        self.object_info_shape = object_info_shape
        self.auth = auth
        self.ipadapter = ipadapter
        self.folders = InputFolder()  # input / temp / output files that were uploaded
        self.faults = ComfyFaults()
        self.requests: list[Recorded] = []
        self.files: dict[tuple[str, str], bytes] = {}
        self.history: dict[str, dict[str, Any]] = {}
        self.saves = 0  # SaveImage nodes that really ran (a cached one does not)
        self._queue: list[_Run] = []
        self._running: _Run | None = None
        self._cache: dict[str, tuple[tuple[Any, ...], dict[str, Any] | None]] = {}
        self._sockets: dict[str, tuple[WebSocket, asyncio.AbstractEventLoop]] = {}
        self._number = 0
        self._cond = threading.Condition()
        self._interrupt = threading.Event()
        self._current: str | None = None  # the node executing now
        self._stopping = False
        self._worker = threading.Thread(target=self._work, name="fake-comfyui", daemon=True)
        self._server = LiveServer(self._app())

    def start(self) -> FakeComfyUI:
        self._worker.start()
        self._server.start()
        return self

    def stop(self) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        self._interrupt.set()
        self._server.stop()
        self._worker.join(5)

    def __enter__(self) -> FakeComfyUI:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def url(self) -> str:
        return self._server.url

    def prompts(self) -> list[dict[str, Any]]:
        """The graphs POSTed to /prompt, in order."""
        return [r.body["prompt"] for r in self.requests if r.path == "/prompt" and r.body]

    def posted(self, path: str) -> list[Any]:
        return [r.body for r in self.requests if r.method == "POST" and r.path == path]

    @property
    def uploads(self) -> list[Upload]:
        """Every ``POST /upload/image`` that stored (or deduplicated) a file, in order."""
        return list(self.folders.uploads)

    def input_file(self, name: str, subfolder: str = "") -> bytes | None:
        """An uploaded input file as ComfyUI would read it."""
        return self.folders.get("input", subfolder, name)

    def _returns(self) -> dict[str, tuple[str, ...]]:
        """The node classes this ComfyUI has and what each returns."""
        return {**RETURNS, **(IPADAPTER_RETURNS if self.ipadapter else {})}

    # -- nodes ------------------------------------------------------------------------------

    def _inputs(self) -> dict[str, dict[str, tuple[str, Any]]]:
        """Each node's required inputs: (type, combo options or number limits)."""
        number = {"min": -100.0, "max": 100.0}
        size = {"min": 16, "max": 16384}
        return {
            "CheckpointLoaderSimple": {"ckpt_name": ("COMBO", self.checkpoints)},
            "LoraLoader": {
                "model": ("MODEL", None),
                "clip": ("CLIP", None),
                "lora_name": ("COMBO", self.loras),
                "strength_model": ("FLOAT", number),
                "strength_clip": ("FLOAT", number),
            },
            "CLIPSetLastLayer": {
                "clip": ("CLIP", None),
                "stop_at_clip_layer": ("INT", {"min": -24, "max": -1}),
            },
            "CLIPTextEncode": {"text": ("STRING", {"multiline": True}), "clip": ("CLIP", None)},
            "EmptyLatentImage": {
                "width": ("INT", size),
                "height": ("INT", size),
                "batch_size": ("INT", {"min": 1, "max": 4096}),
            },
            "KSampler": {
                "model": ("MODEL", None),
                "seed": ("INT", {"min": 0, "max": 2**64 - 1}),
                "steps": ("INT", {"min": 1, "max": 10000}),
                "cfg": ("FLOAT", {"min": 0.0, "max": 100.0}),
                "sampler_name": ("COMBO", SAMPLERS),
                "scheduler": ("COMBO", SCHEDULERS),
                "positive": ("CONDITIONING", None),
                "negative": ("CONDITIONING", None),
                "latent_image": ("LATENT", None),
                "denoise": ("FLOAT", {"min": 0.0, "max": 1.0}),
            },
            "LatentUpscaleBy": {
                "samples": ("LATENT", None),
                "upscale_method": ("COMBO", UPSCALE_METHODS),
                "scale_by": ("FLOAT", {"min": 0.01, "max": 8.0}),
            },
            "VAEDecode": {"samples": ("LATENT", None), "vae": ("VAE", None)},
            "ImageScaleBy": {
                "image": ("IMAGE", None),
                "upscale_method": ("COMBO", IMAGE_UPSCALE_METHODS),
                "scale_by": ("FLOAT", {"min": 0.01, "max": 8.0}),
            },
            "VAEEncode": {"pixels": ("IMAGE", None), "vae": ("VAE", None)},
            "LoadImage": {"image": ("UPLOAD", self.folders.listing())},
            "SaveImage": {"images": ("IMAGE", None), "filename_prefix": ("STRING", {})},
            **{
                name: spec_inputs(spec["input"]["required"])
                for name, spec in IPADAPTER_NODES.items()
                if self.ipadapter
            },
        }

    def _optional_inputs(self, name: str) -> dict[str, tuple[str, Any]]:
        spec = IPADAPTER_NODES.get(name) if self.ipadapter else None
        return spec_inputs(spec["input"].get("optional", {})) if spec else {}

    def node_info(self, name: str) -> dict[str, Any]:
        if name in IPADAPTER_NODES:
            return self._v1_node_info(name)
        required: dict[str, list[Any]] = {}
        for key, (kind, options) in self._inputs()[name].items():
            if kind == "UPLOAD":  # nodes.py LoadImage: (sorted(files), {"image_upload": True})
                required[key] = [list(options), {"image_upload": True}]
            elif kind == "COMBO" and self.object_info_shape == "old":
                required[key] = [list(options), {}]
            elif kind == "COMBO":
                required[key] = ["COMBO", {"options": list(options), "multiselect": False}]
            else:
                required[key] = [kind, options] if options else [kind]
        returns = list(RETURNS[name])
        return {
            "input": {"required": required},
            "input_order": {"required": list(required)},
            "output": returns,
            "output_is_list": [False] * len(returns),
            "output_name": returns,
            "name": name,
            "display_name": name,
            "description": "",
            "python_module": "nodes",
            "category": "image" if name == "LoadImage" else "sampling",
            "output_node": name in OUTPUT_NODES,
        }

    def _v1_node_info(self, name: str) -> dict[str, Any]:
        """A custom node's entry: its INPUT_TYPES as declared (combos as bare lists)."""
        spec = IPADAPTER_NODES[name]
        inputs = spec["input"]
        return {
            "input": inputs,
            "input_order": {key: list(value) for key, value in inputs.items()},
            "output": list(spec["output"]),
            "output_is_list": [False] * len(spec["output"]),
            "output_name": list(spec["output_name"]),
            "name": name,
            "display_name": name,
            "description": "",
            "python_module": "custom_nodes.ComfyUI_IPAdapter_plus",
            "category": "ipadapter",
            "output_node": False,
        }

    # -- validation (execution.validate_prompt) ---------------------------------------------

    def validate(self, prompt: Any) -> tuple[dict[str, Any] | None, list[str], dict[str, Any]]:
        """(error, good outputs, node_errors); error None when the prompt may be queued."""
        if not isinstance(prompt, dict):
            return _reason("invalid_prompt", "Prompt is not a dict", ""), [], {}
        for node_id, node in prompt.items():
            if not isinstance(node, dict) or "class_type" not in node:
                message = "Cannot execute because a node is missing the class_type property."
                return _reason("invalid_prompt", message, f"Node ID '#{node_id}'"), [], {}
            if node["class_type"] not in self._returns():
                message = f"Cannot execute because node {node['class_type']} does not exist."
                return _reason("invalid_prompt", message, f"Node ID '#{node_id}'"), [], {}
        outputs = [n for n, node in prompt.items() if node["class_type"] in OUTPUT_NODES]
        if not outputs:
            return _reason("prompt_no_outputs", "Prompt has no outputs", ""), [], {}
        validated: dict[str, tuple[bool, list[dict[str, Any]]]] = {}
        good, node_errors, lines = [], {}, []
        for output in outputs:
            if self._validate_node(prompt, output, validated):
                good.append(output)
                continue
            lines += [f"{r['message']}: {r['details']}" for r in validated[output][1]]
            for node_id, (ok, reasons) in validated.items():
                if not ok and reasons:  # nodes downstream of a bad one carry no reasons
                    entry = {"errors": reasons, "dependent_outputs": []}
                    entry = node_errors.setdefault(node_id, entry)
                    entry["class_type"] = prompt[node_id]["class_type"]
                    entry["dependent_outputs"].append(output)
        if not good:
            message, details = "Prompt outputs failed validation", "\n".join(lines)
            return _reason("prompt_outputs_failed_validation", message, details), [], node_errors
        return None, good, node_errors

    def _validate_node(
        self, prompt: dict[str, Any], node_id: str, validated: dict[str, Any]
    ) -> bool:
        if node_id in validated:
            return bool(validated[node_id][0])
        node = prompt[node_id]
        given = node.setdefault("inputs", {})
        errors: list[dict[str, Any]] = []
        valid = True
        optional = self._optional_inputs(node["class_type"])
        present = {name: spec for name, spec in optional.items() if name in given}
        for name, (kind, options) in {**self._inputs()[node["class_type"]], **present}.items():
            config = [kind, options]
            if name not in given:
                errors.append(
                    _reason(
                        "required_input_missing", "Required input is missing", name, input_name=name
                    )
                )
                continue
            value = given[name]
            if kind == "UPLOAD" and not isinstance(value, list):
                # LoadImage.VALIDATE_INPUTS(image) replaces the combo check
                if self.folders.resolve(value) is None:
                    errors.append(load_image_error(str(value)))
                continue
            if kind not in _VALUE_TYPES or isinstance(value, list):
                problem = self._check_link(prompt, name, kind, value, self._returns())
                if problem is not None:
                    errors.append(problem)
                elif not self._validate_node(prompt, str(value[0]), validated):
                    valid = False
                continue
            problem = self._check_value(given, name, kind, options, config)
            if problem is not None:
                errors.append(problem)
        validated[node_id] = (valid and not errors, errors)
        return valid and not errors

    @staticmethod
    def _check_link(
        prompt: dict[str, Any],
        name: str,
        kind: str,
        value: Any,
        node_returns: dict[str, tuple[str, ...]],
    ) -> dict[str, Any] | None:
        if not isinstance(value, list) or len(value) != 2 or str(value[0]) not in prompt:
            message = "Bad linked input, must be a length-2 list of [node_id, slot_index]"
            return _reason("bad_linked_input", message, name, input_name=name, received_value=value)
        returns = node_returns[prompt[str(value[0])]["class_type"]]
        received = (
            returns[value[1]] if isinstance(value[1], int) and value[1] < len(returns) else "?"
        )
        if received != kind:
            return _reason(
                "return_type_mismatch",
                "Return type mismatch between linked nodes",
                f"{name}, {received} != {kind}",
                input_name=name,
                linked_node=value,
            )
        return None

    @staticmethod
    def _check_value(
        given: dict[str, Any], name: str, kind: str, options: Any, config: list[Any]
    ) -> dict[str, Any] | None:
        value = given[name]
        try:  # ComfyUI converts in place: the history shows the converted value
            converters: dict[str, Any] = {"INT": int, "FLOAT": float, "STRING": str}
            if kind in converters:
                value = given[name] = converters[kind](value)
        except (TypeError, ValueError) as exc:
            return _reason(
                "invalid_input_type",
                f"Failed to convert an input value to a {kind} value",
                f"{name}, {value}, {exc}",
                input_name=name,
                received_value=value,
            )
        if kind == "COMBO":
            if value in options:
                return None
            shown = f"(list of length {len(options)})" if len(options) > 20 else str(options)
            return _reason(
                "value_not_in_list",
                "Value not in list",
                f"{name}: '{value}' not in {shown}",
                input_name=name,
                input_config=None if len(options) > 20 else config,
                received_value=value,
            )
        limits = options or {}
        for bound, kind_, word, beyond in (
            ("min", "value_smaller_than_min", "smaller", operator.lt),
            ("max", "value_bigger_than_max", "bigger", operator.gt),
        ):
            if bound in limits and beyond(value, limits[bound]):
                message = f"Value {value} {word} than {bound} of {limits[bound]}"
                return _reason(kind_, message, name, input_name=name, received_value=value)
        return None

    # -- execution (execution.PromptExecutor, main.prompt_worker) ---------------------------

    def _work(self) -> None:
        while True:
            with self._cond:
                while not self._queue and not self._stopping:
                    self._cond.wait()
                if self._stopping:
                    return
                self._queue.sort(key=lambda r: r.number)
                run = self._running = self._queue.pop(0)
                self._interrupt.clear()  # under the lock /interrupt looks at what runs
            try:
                self._execute(run)
            finally:
                with self._cond:
                    self._running = None

    def _execute(self, run: _Run) -> None:
        client = run.extra.get("client_id")
        self._current = None
        memo: dict[str, str] = {}
        run.signatures = {n: self._signature(run.prompt, n, memo) for n in run.prompt}
        # The classic cache keeps only what the prompt now running can use.
        self._cache = {s: v for s, v in self._cache.items() if s in run.signatures.values()}
        cached = [n for n in run.prompt if run.signatures[n] in self._cache]
        self._status(run, client, "execution_start", {"prompt_id": run.prompt_id})
        self._status(run, client, "execution_cached", {"nodes": cached, "prompt_id": run.prompt_id})
        success = False
        try:
            for output in run.outputs:
                self._run_node(run, client, output)
            success = True
            self._status(run, client, "execution_success", {"prompt_id": run.prompt_id})
        except _Interrupted:
            self._status(run, client, "execution_interrupted", self._where_failed(run))
        except _NodeFailed as exc:
            data = {
                **self._where_failed(run),
                "exception_message": exc.message,
                "exception_type": exc.exception_type,
                "traceback": ['  File "nodes.py", line 1, in sample\n'],
                "current_inputs": {},
                "current_outputs": cached,
            }
            self._status(run, client, "execution_error", data)
        outputs = {}
        for node_id in run.prompt:
            ui = self._cache.get(run.signatures[node_id], ((), None))[1]
            if ui:
                outputs[node_id] = ui
        self.history[run.prompt_id] = {
            "prompt": run.item,
            "outputs": outputs,
            "status": {
                "status_str": "success" if success else "error",
                "completed": success,
                "messages": run.messages,
            },
            "meta": {n: {"node_id": n, "display_node": n, "parent_node": None} for n in outputs},
        }
        self._send(client, "executing", {"node": None, "prompt_id": run.prompt_id})

    def _where_failed(self, run: _Run) -> dict[str, Any]:
        node_id = self._current or run.outputs[0]
        return {
            "prompt_id": run.prompt_id,
            "node_id": node_id,
            "node_type": run.prompt[node_id]["class_type"],
            "executed": list(run.executed),
        }

    def _status(self, run: _Run, client: str | None, event: str, data: dict[str, Any]) -> None:
        data = {**data, "timestamp": int(time.time() * 1000)}
        run.messages.append([event, data])
        self._send(client, event, data)

    def _signature(self, prompt: dict[str, Any], node_id: str, memo: dict[str, str]) -> str:
        if node_id not in memo:
            node = prompt[node_id]
            inputs = {
                key: ["link", self._signature(prompt, str(v[0]), memo), v[1]]
                if isinstance(v, list) and len(v) == 2 and str(v[0]) in prompt
                else v
                for key, v in node["inputs"].items()
            }
            if node["class_type"] == "LoadImage":  # IS_CHANGED: the file's sha256
                data = self.folders.resolve(node["inputs"].get("image")) or b""
                inputs = {**inputs, "__is_changed": hashlib.sha256(data).hexdigest()}
            text = json.dumps([node["class_type"], inputs], sort_keys=True)
            memo[node_id] = hashlib.sha256(text.encode()).hexdigest()
        return memo[node_id]

    def _run_node(self, run: _Run, client: str | None, node_id: str) -> tuple[Any, ...]:
        if node_id in run.values:
            return run.values[node_id]
        node = run.prompt[node_id]
        hit = self._cache.get(run.signatures[node_id])
        if hit is not None:
            if node["class_type"] in OUTPUT_NODES:  # staged although cached: repeats its output
                data = {"node": node_id, "display_node": node_id, "output": hit[1]}
                self._send(client, "executed", {**data, "prompt_id": run.prompt_id})
            run.values[node_id] = hit[0]
            return hit[0]
        args = {
            key: self._run_node(run, client, str(v[0]))[v[1]] if isinstance(v, list) else v
            for key, v in node["inputs"].items()
        }
        self._current = node_id
        self._send(
            client,
            "executing",
            {"node": node_id, "display_node": node_id, "prompt_id": run.prompt_id},
        )
        value, ui = self._compute(run, client, node_id, node["class_type"], args)
        self._cache[run.signatures[node_id]] = (value, ui)
        run.values[node_id] = value
        run.executed.append(node_id)
        if ui:
            data = {"node": node_id, "display_node": node_id, "output": ui}
            self._send(client, "executed", {**data, "prompt_id": run.prompt_id})
        return value

    def _compute(
        self, run: _Run, client: str | None, node_id: str, kind: str, a: dict[str, Any]
    ) -> tuple[tuple[Any, ...], dict[str, Any] | None]:
        if kind == "CheckpointLoaderSimple":
            model = {"checkpoint": a["ckpt_name"], "loras": []}
            return (model, {"clip": True}, {"vae": True}), None
        if kind == "LoraLoader":
            loras = [*a["model"]["loras"], (a["lora_name"], a["strength_model"])]
            return ({**a["model"], "loras": loras}, a["clip"]), None
        if kind == "CLIPSetLastLayer":
            return ({**a["clip"], "stop_at_clip_layer": a["stop_at_clip_layer"]},), None
        if kind == "CLIPTextEncode":
            return ({"text": a["text"]},), None
        if kind == "EmptyLatentImage":
            return ({"width": a["width"], "height": a["height"], "first": None},), None
        if kind == "LatentUpscaleBy":
            latent = a["samples"]
            width, height = (round(latent[k] / 8 * a["scale_by"]) * 8 for k in ("width", "height"))
            first = (latent["width"], latent["height"])
            return ({**latent, "width": width, "height": height, "first": first},), None
        if kind == "KSampler":
            self._sample(run, client, node_id, a["steps"])
            latent = {
                **a["latent_image"],
                "seed": a["seed"],
                "steps": a["steps"],
                "cfg": a["cfg"],
                "sampler": a["sampler_name"],
                "model": a["model"],
                "prompt": a["positive"]["text"],
            }
            return (latent,), None
        if kind == "VAEDecode":
            return (a["samples"],), None
        if kind == "ImageScaleBy":  # ComfyUI: round(width * scale_by), in pixels
            image = a["image"]
            width, height = (round(image[k] * a["scale_by"]) for k in ("width", "height"))
            first = (image["width"], image["height"])
            scaled = {"upscale_method": a["upscale_method"], "first": first}
            return ({**image, "width": width, "height": height, **scaled},), None
        if kind == "VAEEncode":  # crops the pixels to a multiple of 8
            pixels = a["pixels"]
            return (
                {**pixels, "width": pixels["width"] // 8 * 8, "height": pixels["height"] // 8 * 8},
            ), None
        if kind in ("LoadImage", "IPAdapterUnifiedLoader", "IPAdapterAdvanced"):
            return self._identity_node(kind, a), None
        return (), self._save(run, a["images"], str(a["filename_prefix"]))

    def _identity_node(self, kind: str, a: dict[str, Any]) -> tuple[Any, ...]:
        if kind == "LoadImage":
            data = self.folders.resolve(a["image"]) or b""
            try:
                picture = open_picture(data, str(a["image"]))
            except ValueError as exc:
                raise _NodeFailed("PIL.UnidentifiedImageError", str(exc)) from exc
            image = {"picture": picture, "width": picture.width, "height": picture.height}
            return image, {"mask": a["image"]}
        if kind == "IPAdapterUnifiedLoader":
            return a["model"], {"preset": a["preset"]}
        adapter = {
            "picture": a["image"]["picture"],
            "weight": a["weight"],
            "start_at": a["start_at"],
            "end_at": a["end_at"],
            "weight_type": a["weight_type"],
            "preset": a["ipadapter"]["preset"],
        }
        model = a["model"]
        return ({**model, "ipadapters": [*model.get("ipadapters", []), adapter]},)

    def _sample(self, run: _Run, client: str | None, node_id: str, steps: int) -> None:
        for step in range(1, steps + 1):
            while self.faults.hang and not self._interrupt.wait(0.02):
                pass
            if self._interrupt.is_set() or self._stopping:
                raise _Interrupted
            if self.faults.execution_error is not None:
                raise _NodeFailed(*self.faults.execution_error)
            time.sleep(self.faults.step_delay)
            progress = {"value": step, "max": steps, "prompt_id": run.prompt_id, "node": node_id}
            self._send(client, "progress", progress)
            if step == 1:  # previews are binary frames: event 1, image type 1 (JPEG)
                self._send_bytes(client, struct.pack(">II", 1, 1) + _preview())

    def _save(self, run: _Run, image: dict[str, Any], prefix: str) -> dict[str, Any]:
        self.saves += 1
        subfolder, _, name = prefix.rpartition("/")
        filename = f"{name}_{self.saves:05}_.png"
        size = (image["width"], image["height"])
        if "seed" not in image:  # pixels straight from LoadImage (maybe scaled)
            picture = image["picture"].resize(size)
        else:
            placeholder = Placeholder(
                width=image["width"],
                height=image["height"],
                seed=image["seed"],
                checkpoint=image["model"]["checkpoint"],
                sampler=image["sampler"],
                steps=image["steps"],
                cfg_scale=image["cfg"],
                prompt=image["prompt"],
                first_pass=image.get("first"),
            )
            adapters = image["model"].get("ipadapters", [])
            picture = blend_references(render_placeholder(placeholder), adapters)
        info = PngInfo()  # SaveImage writes the graph as the "prompt" text chunk
        info.add_text("prompt", json.dumps(run.prompt))
        out = io.BytesIO()
        picture.save(out, format="PNG", pnginfo=info, compress_level=1)
        self.files[(subfolder, filename)] = out.getvalue()
        return {"images": [{"filename": filename, "subfolder": subfolder, "type": "output"}]}

    # -- websocket --------------------------------------------------------------------------

    def _send(self, client: str | None, event: str, data: dict[str, Any]) -> None:
        self._deliver(client, {"text": json.dumps({"type": event, "data": data})})

    def _send_bytes(self, client: str | None, data: bytes) -> None:
        self._deliver(client, {"bytes": data})

    def _deliver(self, client: str | None, frame: dict[str, Any]) -> None:
        targets = [client] if client is not None else list(self._sockets)
        for sid in targets:
            found = self._sockets.get(sid) if sid is not None else None
            if found is None:
                continue  # ComfyUI drops events for a client that is not connected
            socket, loop = found
            if self.faults.drop_websocket:
                self._sockets.pop(sid, None)
                sending = socket.close(code=1011)
            else:
                sending = socket.send({"type": "websocket.send", **frame})
            with contextlib.suppress(Exception):  # like ComfyUI: a send error is only logged
                asyncio.run_coroutine_threadsafe(sending, loop).result(5)

    def _authorized(self, headers: Any) -> bool:
        if self.auth is None:
            return True
        token = base64.b64encode(":".join(self.auth).encode()).decode()
        return bool(headers.get("authorization") == f"Basic {token}")

    # -- HTTP -------------------------------------------------------------------------------

    def _app(self) -> FastAPI:
        app = FastAPI()

        @app.middleware("http")
        async def record(request: Request, call_next: Any) -> Response:
            raw = await request.body()
            try:
                body = json.loads(raw) if raw else None
            except ValueError:
                body = raw
            self.requests.append(
                Recorded(
                    request.method,
                    request.url.path,
                    dict(request.query_params),
                    body,
                    dict(request.headers),
                )
            )
            if not self._authorized(request.headers):
                return Response(status_code=401, headers={"WWW-Authenticate": "Basic"})
            response: Response = await call_next(request)
            return response

        @app.websocket("/ws")
        async def websocket(socket: WebSocket, clientId: str = "") -> None:
            self.requests.append(
                Recorded("WS", "/ws", dict(socket.query_params), None, dict(socket.headers))
            )
            if self.faults.refuse_websocket or not self._authorized(socket.headers):
                await socket.close(code=1008)  # before accept: the handshake gets HTTP 403
                return
            await socket.accept()
            sid = clientId or uuid.uuid4().hex
            self._sockets[sid] = (socket, asyncio.get_running_loop())
            status = {"status": {"exec_info": {"queue_remaining": len(self._queue)}}, "sid": sid}
            await socket.send_json({"type": "status", "data": status})
            try:
                while True:
                    await socket.receive_text()
            except WebSocketDisconnect:
                pass
            finally:
                if self._sockets.get(sid, (None,))[0] is socket:
                    self._sockets.pop(sid, None)

        @app.post("/prompt")
        async def post_prompt(request: Request) -> Response:
            if self.faults.prompt_status is not None:
                text = "500 Internal Server Error\n\nServer got itself in trouble"
                return Response(text, status_code=self.faults.prompt_status)
            body = await request.json()
            if "prompt" not in body:
                error = _reason("no_prompt", "No prompt provided", "No prompt provided")
                return JSONResponse({"error": error, "node_errors": {}}, status_code=400)
            prompt = body["prompt"]
            error, good, node_errors = self.validate(prompt)
            if error is not None:
                return JSONResponse({"error": error, "node_errors": node_errors}, status_code=400)
            extra = dict(body.get("extra_data") or {})
            if "client_id" in body:
                extra["client_id"] = body["client_id"]
            with self._cond:
                number, self._number = self._number, self._number + 1
                prompt_id = str(uuid.uuid4())
                self._queue.append(_Run(number, prompt_id, prompt, extra, good))
                self._cond.notify_all()
            return JSONResponse(
                {"prompt_id": prompt_id, "number": number, "node_errors": node_errors}
            )

        @app.get("/history/{prompt_id}")
        async def history(prompt_id: str) -> Response:
            if self.faults.history_failures > 0:
                self.faults.history_failures -= 1
                if self.faults.history_failure == "json":
                    return Response("<html>proxy error</html>", media_type="text/html")
                return Response("500 Internal Server Error", status_code=500)
            entry = self.history.get(prompt_id)
            return JSONResponse({prompt_id: entry} if entry is not None else {})

        @app.post("/upload/image")
        async def upload_image(request: Request) -> Response:
            async with request.form() as form:  # closes the spooled files
                image = form.get("image")
                if not isinstance(image, StarletteUpload):
                    return Response(status_code=400)
                data, filename = await image.read(), image.filename or ""
                kind, subfolder = form.get("type"), form.get("subfolder", "")
                overwrite = form.get("overwrite")
            try:
                answer = self.folders.upload(
                    data,
                    filename,
                    type_=kind if isinstance(kind, str) else "input",
                    subfolder=subfolder if isinstance(subfolder, str) else "",
                    overwrite=overwrite if isinstance(overwrite, str) else None,
                )
            except ValueError:
                return Response(status_code=400)
            except KeyError:  # get_dir_by_type leaves type_dir unbound
                text = "500 Internal Server Error\n\nServer got itself in trouble"
                return Response(text, status_code=500)
            return JSONResponse(answer)

        @app.get("/view")
        async def view(filename: str, subfolder: str = "", type: str = "output") -> Response:
            data = self.files.get((subfolder, filename)) if type == "output" else None
            data = data or self.folders.get(type, subfolder, filename)
            if data is None or self.faults.missing_view:
                return Response(status_code=404)
            headers = {"Content-Disposition": f'filename="{filename}"'}
            return Response(data, media_type="image/png", headers=headers)

        @app.get("/object_info")
        async def object_info() -> dict[str, Any]:
            return {name: self.node_info(name) for name in self._returns()}

        @app.get("/object_info/{node}")
        async def object_info_node(node: str) -> dict[str, Any]:
            return {node: self.node_info(node)} if node in self._returns() else {}

        @app.get("/system_stats")
        async def system_stats() -> dict[str, Any]:
            system = {"os": "posix", "comfyui_version": "0.3.40", "python_version": "3.11"}
            device = {"name": "cpu", "type": "cpu", "index": None, "vram_total": 0}
            return {"system": system, "devices": [device]}

        @app.post("/interrupt")
        async def interrupt(request: Request) -> Response:
            if self.faults.interrupt_status is not None:
                return Response("refused", status_code=self.faults.interrupt_status)
            body = json.loads(await request.body() or b"{}")
            wanted = body.get("prompt_id") if isinstance(body, dict) else None
            if self.faults.interrupt_ignores_prompt_id:
                wanted = None
            with self._cond:  # server.py: interrupt_running looks under the queue's lock
                running = self._running
                if running is not None and wanted in (None, running.prompt_id):
                    self._interrupt.set()
            return Response(status_code=200)

        @app.post("/queue")
        async def post_queue(request: Request) -> Response:
            if self.faults.queue_status is not None:
                return Response("refused", status_code=self.faults.queue_status)
            body = await request.json()
            with self._cond:
                if body.get("clear"):
                    self._queue.clear()
                deleted = set(body.get("delete") or [])
                self._queue = [r for r in self._queue if r.prompt_id not in deleted]
            return Response(status_code=200)

        @app.get("/queue")
        async def get_queue() -> Response:
            # server.py: items are [number, prompt_id, prompt, extra_data, outputs_to_execute]
            if self.faults.queue_status is not None:
                return Response("refused", status_code=self.faults.queue_status)
            with self._cond:
                running = [self._running.item] if self._running else []
                pending = [r.item for r in sorted(self._queue, key=lambda r: r.number)]
                return JSONResponse({"queue_running": running, "queue_pending": pending})

        return app


_PREVIEW: list[bytes] = []


def _preview() -> bytes:
    if not _PREVIEW:
        out = io.BytesIO()
        Image.new("RGB", (8, 8), (90, 90, 90)).save(out, format="JPEG")
        _PREVIEW.append(out.getvalue())
    return _PREVIEW[0]
