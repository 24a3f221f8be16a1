"""A RunPod serverless endpoint on 127.0.0.1, speaking the real queue API under /v2/{id}.

Routes: POST /run, /runsync; GET /status/{job}; POST /cancel/{job}; GET /health. The bearer key
is checked on each (401 otherwise). A job answers IN_QUEUE, then IN_PROGRESS, then its end
(COMPLETED by default) over a few polls. The worker behind it is one of:

- ``a1111``: runpod-workers/worker-a1111, which hands ``input`` to A1111's txt2img as is; here
  the A1111 simulator's engine renders it, and its answer is returned unchanged: as in A1111,
  an unknown checkpoint silently keeps the model in memory, an unknown sampler or schedule
  type silently becomes the default, and ``info`` says what really ran (``sd_model_name``,
  ``sampler_name``, ``extra_generation_params["Schedule type"]``);
- ``comfyui``: runpod-workers/worker-comfyui 5.x, ``{"workflow": graph, "images"?: [{name,
  image}]}`` in, ``{"images": [{filename, type, data}]}`` out (base64 or an S3 link this server
  serves itself, or the pre-5.0 ``{"status": "success", "message": ...}``). ``input.images``
  are uploaded to the worker's ComfyUI first (``/upload/image`` with ``overwrite=true``, a
  data-URL prefix cut at the first comma; a bad one fails the job with "Failed to upload one
  or more input images"); ``LoadImage`` reads them (a missing file fails validation, a file
  that is not a picture fails execution) and, with ``ipadapter=True``, ``IPAdapterAdvanced``
  nodes on the sampler's model blend their image into the picture. An unknown ``ckpt_name``
  or a missing file fails the job with ComfyUI's validation error as the worker words it.

Every request is recorded (method, path, lower-case headers, JSON body) so tests can assert
what was really sent; ``faults`` injects 429s, 500s and FAILED / TIMED_OUT / CANCELLED /
stuck jobs.
"""

from __future__ import annotations

import base64
import binascii
import itertools
import json
import threading
import uuid
from dataclasses import dataclass, field
from typing import Any, Literal

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response

from charforge.simulator.app import error_body
from charforge.simulator.config import SimulatorSettings
from charforge.simulator.engine import SimulatorEngine
from charforge.simulator.render import Placeholder, png_bytes, render_placeholder
from charforge.simulator.txt2img import Txt2ImgRequest
from tests.fakes.comfy_identity import (
    IPADAPTER_NODES,
    InputFolder,
    Upload,
    blend_references,
    load_image_error,
    open_picture,
)
from tests.helpers import LiveServer

Worker = Literal["a1111", "comfyui"]
ComfyOutput = Literal["base64", "s3_url", "legacy"]
Ending = Literal["COMPLETED", "FAILED", "TIMED_OUT", "CANCELLED", "stuck"]


@dataclass
class RunPodFaults:
    """Mutable at any time; everything off by default."""

    rate_limit: int = 0  # answer 429 to this many of the next requests ...
    retry_after: str | None = None  # ... with this Retry-After header, when set
    server_error: int = 0  # answer 500 to this many of the next requests
    only: str = "/"  # ... whose path starts with this (e.g. "/status/")
    ending: Ending = "COMPLETED"  # how jobs submitted from now on end ("stuck": never)
    error: str = "simulated worker failure"  # the handler's exception message when FAILED


@dataclass(frozen=True)
class Seen:
    method: str
    path: str  # after /v2/{endpoint}, e.g. "/run", "/status/abc-u1"
    headers: dict[str, str]
    body: Any
    status: int  # the HTTP status answered
    state: str | None = None  # the job status answered by /run, /status and /cancel


@dataclass
class _Job:
    id: str
    input: Any
    ending: Ending
    error: str
    polls: int = 0
    state: str = "IN_QUEUE"
    final: dict[str, Any] = field(default_factory=dict)


class RunPodFake:
    def __init__(
        self,
        *,
        worker: Worker = "comfyui",
        models: tuple[str, ...] = ("cyberrealistic.safetensors", "other.safetensors"),
        api_key: str = "rp-test-key",
        endpoint_id: str = "ep-test",
        queue_polls: int = 1,
        progress_polls: int = 1,
        comfy_output: ComfyOutput = "base64",
        ipadapter: bool = False,  # the comfyui worker's ComfyUI has ComfyUI_IPAdapter_plus
        controlnet: bool = False,  # the a1111 worker's WebUI has sd-webui-controlnet
        controlnet_models: tuple[str, ...] = (),
    ) -> None:
        self.worker, self.models, self.api_key = worker, list(models), api_key
        self.endpoint_id = endpoint_id
        self.queue_polls, self.progress_polls = queue_polls, progress_polls
        self.comfy_output: ComfyOutput = comfy_output
        self.ipadapter = ipadapter
        self.faults = RunPodFaults()
        settings = SimulatorSettings(
            models=list(models),
            name="rp-a1111",
            controlnet=controlnet,
            controlnet_models=list(controlnet_models),
        )
        self._engine = SimulatorEngine(settings)
        self.comfy_folders = InputFolder()  # the comfyui worker's ComfyUI input folder
        self._jobs: dict[str, _Job] = {}
        self._seen: list[Seen] = []
        self._s3: dict[str, bytes] = {}
        self._files = itertools.count(1)
        self._lock = threading.Lock()
        self._server = LiveServer(self._app())

    # -- lifecycle and what happened -------------------------------------------------------

    def start(self) -> RunPodFake:
        self._server.start()
        return self

    def stop(self) -> None:
        self._server.stop()

    def __enter__(self) -> RunPodFake:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def url(self) -> str:
        return self._server.url

    @property
    def url_for_endpoint(self) -> str:
        """What a user configures: https://api.runpod.ai/v2/ENDPOINT_ID, here on loopback."""
        return f"{self.url}/v2/{self.endpoint_id}"

    @property
    def a1111(self) -> SimulatorEngine:
        """The A1111 behind the a1111 worker (its ``faults`` make txt2img fail)."""
        return self._engine

    @property
    def requests(self) -> list[Seen]:
        with self._lock:
            return list(self._seen)

    def inputs(self) -> list[Any]:
        """The ``input`` of every accepted /run, in order."""
        return [r.body["input"] for r in self.requests if r.path == "/run" and r.status == 200]

    def states(self) -> list[str]:
        """The job states answered to /status polls, in order."""
        return [r.state for r in self.requests if r.path.startswith("/status/") and r.state]

    def job_ids(self) -> list[str]:
        """The ids of the jobs accepted by /run, in order."""
        with self._lock:
            return list(self._jobs)

    def cancelled(self) -> list[str]:
        return [r.path.rsplit("/", 1)[1] for r in self.requests if r.path.startswith("/cancel/")]

    @property
    def comfy_uploads(self) -> list[Upload]:
        """The ``/upload/image`` calls the comfyui worker made to its ComfyUI, in order."""
        with self._lock:
            return list(self.comfy_folders.uploads)

    # -- HTTP ------------------------------------------------------------------------------

    def _app(self) -> FastAPI:
        app = FastAPI()

        @app.api_route("/v2/{endpoint}/{rest:path}", methods=["GET", "POST"])
        async def endpoint(endpoint: str, rest: str, request: Request) -> Response:
            raw = await request.body()
            try:
                body = json.loads(raw) if raw else None
            except ValueError:
                body = None
            with self._lock:
                key = request.headers.get("authorization", "")
                status, answer, extra = self._handle(
                    request.method, endpoint, f"/{rest}", body, key
                )
                state = answer.get("status") if isinstance(answer, dict) else None
                headers = {k.lower(): v for k, v in request.headers.items()}
                self._seen.append(Seen(request.method, f"/{rest}", headers, body, status, state))
            if isinstance(answer, str):
                return Response(answer, status_code=status, headers=extra)
            return JSONResponse(answer, status_code=status, headers=extra)

        @app.get("/_s3/{job}/{name}")
        async def bucket(job: str, name: str, request: Request) -> Response:
            data = self._s3.get(f"{job}/{name}")
            with self._lock:
                headers = {k.lower(): v for k, v in request.headers.items()}
                self._seen.append(
                    Seen("GET", request.url.path, headers, None, 200 if data else 404)
                )
            if data is None:
                return Response("<Error><Code>NoSuchKey</Code></Error>", status_code=404)
            return Response(data, media_type="image/png")

        return app

    def _handle(
        self, method: str, endpoint: str, path: str, body: Any, key: str
    ) -> tuple[int, Any, dict[str, str]]:
        if key not in (f"Bearer {self.api_key}", self.api_key):  # RunPod takes both
            return 401, "Unauthorized", {}
        hit = path.startswith(self.faults.only)
        if hit and self.faults.rate_limit > 0:
            self.faults.rate_limit -= 1
            after = self.faults.retry_after
            return 429, {"error": "Too Many Requests"}, {"Retry-After": after} if after else {}
        if hit and self.faults.server_error > 0:
            self.faults.server_error -= 1
            return 500, {"error": "Internal Server Error"}, {}
        if endpoint != self.endpoint_id:
            return 404, {"error": "endpoint not found"}, {}
        action, _, job_id = path.strip("/").partition("/")
        if method == "POST" and action in ("run", "runsync") and not job_id:
            return self._submit(body, sync=action == "runsync")
        if method == "GET" and action == "health" and not job_id:
            return 200, self._health(), {}
        job = self._jobs.get(job_id)
        if job is None or action not in ("status", "cancel"):
            return 404, {"error": "request does not exist"}, {}
        if method == "GET" and action == "status":
            return 200, self._poll(job), {}
        if method == "POST" and action == "cancel":
            if job.state not in ("COMPLETED", "FAILED", "TIMED_OUT", "CANCELLED"):
                job.state, job.final = "CANCELLED", {}
            return 200, {"id": job.id, "status": job.state}, {}
        return 405, {"error": "Method Not Allowed"}, {}

    def _submit(self, body: Any, *, sync: bool) -> tuple[int, Any, dict[str, str]]:
        if not isinstance(body, dict) or "input" not in body:
            return 400, {"error": "the request body needs an 'input' object"}, {}
        job = _Job(f"{uuid.uuid4()}-u1", body["input"], self.faults.ending, self.faults.error)
        self._jobs[job.id] = job
        if sync:
            while job.state not in ("COMPLETED", "FAILED", "TIMED_OUT", "CANCELLED"):
                self._poll(job)
                if job.ending == "stuck":
                    break
            return 200, self._answer(job), {}
        return 200, {"id": job.id, "status": "IN_QUEUE"}, {}

    def _poll(self, job: _Job) -> dict[str, Any]:
        job.polls += 1
        if job.state == "IN_QUEUE" and job.polls > self.queue_polls:
            job.state = "IN_PROGRESS"
        if (
            job.state == "IN_PROGRESS"
            and job.ending != "stuck"
            and job.polls > self.queue_polls + self.progress_polls
        ):
            self._finish(job)
        return self._answer(job)

    def _answer(self, job: _Job) -> dict[str, Any]:
        answer: dict[str, Any] = {"id": job.id, "status": job.state}
        if job.state == "IN_PROGRESS":
            answer.update(delayTime=812, workerId="fake-worker-1")
            if self.worker == "comfyui":  # worker-comfyui forwards ComfyUI's step progress
                answer["output"] = {"type": "progress", "value": 12, "max": 25, "percent": 48.0}
        answer.update(job.final)
        return answer

    def _health(self) -> dict[str, Any]:
        states = [job.state for job in self._jobs.values()]
        running = states.count("IN_PROGRESS")
        return {
            "jobs": {
                "completed": states.count("COMPLETED"),
                "failed": states.count("FAILED"),
                "inProgress": running,
                "inQueue": states.count("IN_QUEUE"),
                "retried": 0,
            },
            "workers": {"idle": 1 - min(running, 1), "running": min(running, 1)},
        }

    # -- the worker ------------------------------------------------------------------------

    def _finish(self, job: _Job) -> None:
        timing = {"delayTime": 812, "executionTime": 2345, "workerId": "fake-worker-1"}
        if job.ending in ("TIMED_OUT", "CANCELLED"):
            job.state, job.final = job.ending, {}
            return
        if job.ending == "FAILED":
            # runpod-python's wrapping of an exception raised by the handler
            wrapped = {
                "error_type": "<class 'RuntimeError'>",
                "error_message": job.error,
                "error_traceback": "Traceback (most recent call last):\n  ...\nRuntimeError",
                "hostname": "fake-worker-1",
                "worker_id": "fake-worker-1",
                "runpod_version": "1.7.9",
            }
            job.state, job.final = "FAILED", {**timing, "error": json.dumps(wrapped)}
            return
        returned = self._a1111(job.input) if self.worker == "a1111" else self._comfy(job)
        # runpod-python: an "error" key in the handler's dict makes the job FAILED.
        error = returned.pop("error", None)
        job.state = "FAILED" if error else "COMPLETED"
        job.final = {**timing, **({"error": error} if error else {})}
        if returned:
            job.final["output"] = returned

    def _a1111(self, job_input: Any) -> dict[str, Any]:
        # worker-a1111 returns A1111's answer as is: its info names what ran, not what was asked
        # alwayson_scripts (ControlNet units) go through untouched, like the rest of input
        outcome = self._engine.txt2img(Txt2ImgRequest.model_validate(job_input))
        if outcome.body is not None:
            return dict(outcome.body)
        error = outcome.error
        assert error is not None, outcome.kind
        return error_body("a1111", error.error, error.message, error.detail)  # A1111's answer

    def _comfy(self, job: _Job) -> dict[str, Any]:
        job_input = job.input
        graph = job_input.get("workflow") if isinstance(job_input, dict) else None
        if not isinstance(graph, dict):
            return {"error": "Missing 'workflow' parameter"}
        images = job_input.get("images")
        if images is not None and (
            not isinstance(images, list)
            or not all(isinstance(i, dict) and "name" in i and "image" in i for i in images)
        ):
            return {"error": "'images' must be a list of objects with 'name' and 'image' keys"}
        failures = [problem for image in images or [] if (problem := self._upload(image))]
        if failures:
            return {"error": "Failed to upload one or more input images", "details": failures}
        unknown = self._validation_error(graph)
        if unknown:
            return {"error": unknown}
        try:
            data = _render_graph(graph, self._adapters(graph))
        except _LoadFailed as exc:
            return {"error": "Job processing failed", "details": [str(exc)]}
        name = f"ComfyUI_{next(self._files):05d}_.png"
        if self.comfy_output == "legacy":
            return {"status": "success", "message": base64.b64encode(data).decode()}
        if self.comfy_output == "s3_url":
            self._s3[f"{job.id}/{name}"] = data
            link = f"{self.url}/_s3/{job.id}/{name}?X-Amz-Signature=fake"
            return {"images": [{"filename": name, "type": "s3_url", "data": link}]}
        encoded = base64.b64encode(data).decode()
        return {"images": [{"filename": name, "type": "base64", "data": encoded}]}

    def _upload(self, image: dict[str, Any]) -> str | None:
        """worker-comfyui's ``upload_images`` for one entry: the error it collects, or None."""
        name = image["name"]
        try:
            text = image["image"]
            payload = text.split(",", 1)[1] if "," in text else text
            blob = base64.b64decode(payload)
        except binascii.Error as exc:
            return f"Error decoding base64 for {name}: {exc}"
        except Exception as exc:  # the worker's catch-all
            return f"Unexpected error uploading {name}: {exc}"
        try:
            self.comfy_folders.upload(blob, str(name), overwrite="true")
        except (ValueError, KeyError):  # ComfyUI answered 400; raise_for_status()
            url = "http://127.0.0.1:8188/upload/image"
            return f"Error uploading {name}: 400 Client Error: Bad Request for url: {url}"
        return None

    def _adapters(self, graph: dict[str, Any]) -> list[dict[str, Any]]:
        """The IPAdapterAdvanced nodes on the KSampler's model, from the checkpoint outwards,
        with their pictures (``_LoadFailed`` when LoadImage cannot open one)."""
        samplers = [n for n in graph.values() if n.get("class_type") == "KSampler"]
        link = samplers[0].get("inputs", {}).get("model") if samplers else None
        found: list[dict[str, Any]] = []
        while isinstance(link, list) and str(link[0]) in graph:
            node = graph[str(link[0])]
            inputs = node.get("inputs", {})
            if node.get("class_type") == "IPAdapterAdvanced":
                picture = self._load_image(graph, inputs.get("image"))
                found.insert(0, {**inputs, "picture": picture})
            link = inputs.get("model")
        return found

    def _load_image(self, graph: dict[str, Any], link: Any) -> Any:
        node_id = str(link[0]) if isinstance(link, list) and link else ""
        node = graph.get(node_id, {})
        if node.get("class_type") != "LoadImage":
            return None  # an image this fake does not make: the adapter is not blended
        name = str(node.get("inputs", {}).get("image"))
        try:
            return open_picture(self.comfy_folders.resolve(name) or b"", name, "/comfyui/input")
        except ValueError as exc:
            raise _LoadFailed(
                "Workflow execution error: Node Type: LoadImage, "
                f"Node ID: {node_id}, Message: {exc}"
            ) from exc

    def _validation_error(self, graph: dict[str, Any]) -> str | None:
        """ComfyUI's /prompt 400 for what this fake checks (an IPAdapter node without the pack,
        a ``ckpt_name`` it does not have, a ``LoadImage`` file that is not there), formatted
        as worker-comfyui's queue_workflow words it."""
        for node_id, node in graph.items():
            kind = node.get("class_type")
            if kind in IPADAPTER_NODES and not self.ipadapter:
                message = f"Cannot execute because node {kind} does not exist."
                error = {"type": "invalid_prompt", "message": message}
                error.update(details=f"Node ID '#{node_id}'", extra_info={})
                raw = json.dumps({"error": error, "node_errors": {}})
                return f"{message}. Raw response: {raw}"
        lines, checkpoints = [], False
        saves = [n for n, node in graph.items() if node.get("class_type") == "SaveImage"]
        for node_id, node in graph.items():
            inputs = node.get("inputs", {})
            wanted = inputs.get("ckpt_name")
            if wanted is not None and wanted not in self.models:
                checkpoints = True
                error = {
                    "type": "value_not_in_list",
                    "message": "Value not in list",
                    "details": f"ckpt_name: '{wanted}' not in {self.models}",
                    "extra_info": {"input_name": "ckpt_name", "received_value": wanted},
                }
                dependents = ["9"]
            elif node.get("class_type") == "LoadImage" and (
                self.comfy_folders.resolve(inputs.get("image")) is None
            ):
                error, dependents = load_image_error(str(inputs.get("image"))), saves
            else:
                continue
            node_errors = {"errors": [error], "dependent_outputs": dependents}
            node_errors["class_type"] = node.get("class_type")
            lines += [f"• Node {node_id} ({kind}): {msg}" for kind, msg in node_errors.items()]
        if not lines:
            return None
        message = "Workflow validation failed:\n" + "\n".join(lines)
        if checkpoints:
            message += f"\n\nAvailable checkpoint models: {', '.join(self.models)}"
        return message


class _LoadFailed(Exception):
    """LoadImage could not open its file: the worker's execution_error."""


def _render_graph(graph: dict[str, Any], adapters: list[dict[str, Any]] | None = None) -> bytes:
    """A placeholder of the size the graph would produce (its LatentUpscaleBy included)."""

    def first(kind: str) -> dict[str, Any]:
        found = [n["inputs"] for n in graph.values() if n.get("class_type") == kind]
        return found[0] if found else {}

    latent, sampler = first("EmptyLatentImage"), first("KSampler")
    width, height = int(latent.get("width", 512)), int(latent.get("height", 512))
    scale = float(first("LatentUpscaleBy").get("scale_by", 1.0))
    out_w, out_h = round(width / 8 * scale) * 8, round(height / 8 * scale) * 8
    loader = first("CheckpointLoaderSimple")
    spec = Placeholder(
        width=out_w,
        height=out_h,
        seed=int(sampler.get("seed", 0)),
        checkpoint=str(loader.get("ckpt_name", "?")),
        sampler=str(sampler.get("sampler_name", "?")),
        steps=int(sampler.get("steps", 20)),
        cfg_scale=float(sampler.get("cfg", 7.0)),
        prompt=str(first("CLIPTextEncode").get("text", "")),
        first_pass=(width, height) if scale != 1.0 else None,
    )
    return png_bytes(blend_references(render_placeholder(spec), adapters or []), None)
