"""RunPod serverless endpoints (``https://api.runpod.ai/v2/ENDPOINT_ID``) that run an A1111 or
a ComfyUI worker image.

Facts this adapter is built on (docs.runpod.io "Send API requests", "Job states";
runpod/runpod-python; runpod-workers/worker-a1111 and worker-comfyui): the API and its faults
are in client.py, one job's way in jobs.py, each worker's input and output in a1111.py and
comfy.py. Nothing lists a worker's models, samplers or schedulers, so the checks after
generation guard them.
"""

from __future__ import annotations

import time

import httpx

from charforge.backends.base import (
    BackendRequest,
    BackendResult,
    CheckpointInfo,
    ProbeResult,
)
from charforge.backends.comfyui.graph import Graph, WorkflowError, load_workflow
from charforge.backends.runpod.a1111 import A1111Worker
from charforge.backends.runpod.client import DEFAULT_PACING, Pacing, RunPodClient
from charforge.backends.runpod.comfy import ComfyWorker
from charforge.backends.runpod.identity import RunPodIdentity
from charforge.backends.runpod.jobs import JobRunner
from charforge.backends.transport import capitalized
from charforge.domain.checkpoints import strip_hash
from charforge.domain.requirements import require_capabilities
from charforge.domain.routes import BackendSpec
from charforge.errors import BackendBadResponse, CharforgeError


class RunPodBackend:
    def __init__(
        self, spec: BackendSpec, *, probe_timeout: float = 3.0, pacing: Pacing | None = None
    ) -> None:
        self.spec = spec
        self.pacing = pacing or DEFAULT_PACING
        self._probe_timeout = probe_timeout
        # The user's workflow is read and checked once, so a broken one fails at startup (and
        # in `charforge backends check`), not on every job.
        self._template: Graph | None = None
        if spec.workflow is not None:
            try:
                self._template = load_workflow(spec.workflow)
            except WorkflowError as exc:
                raise ValueError(f"{spec.source}: {exc}") from exc
        self._http = RunPodClient(spec, self.pacing)
        self._jobs = JobRunner(self._http, worker=self.worker)
        self.identity = RunPodIdentity(spec.name, self.worker, self._template)
        self._comfy = ComfyWorker(self._http, self._jobs, self._template, self.identity)
        self._a1111 = A1111Worker(self._http, self._jobs, self.identity)

    @property
    def worker(self) -> str:
        return self.spec.worker or "a1111"

    @property
    def key_var(self) -> str:
        return self._http.key_var

    def close(self) -> None:
        self._http.close()

    def _where(self, style: str | None) -> str:
        return self._http.where(style)

    # -- the ImageBackend protocol ---------------------------------------------------------

    def find_checkpoint(self, name: str, *, style: str) -> CheckpointInfo:
        # RunPod cannot list a worker's models. The a1111 worker reports the model that ran
        # (checked after generation); ComfyUI refuses an unknown one (CheckpointMissing).
        clean = strip_hash(name)
        return CheckpointInfo(clean, clean, None)

    def loaded_checkpoint(self) -> str | None:
        return None  # a serverless endpoint has many workers, and none of them says

    def generate(self, request: BackendRequest) -> BackendResult:
        require_capabilities(self.spec, request.params, request.style)
        deadline = time.monotonic() + self.spec.timeout
        if self.worker == "comfyui":
            return self._comfy.generate(request, deadline)
        return self._a1111.generate(request, deadline)

    def interrupt(self, task_id: str) -> bool:
        return self._jobs.interrupt(task_id)

    def probe(self) -> ProbeResult:
        started = time.perf_counter()
        try:
            response = self._http.http.get(
                "/health",
                headers=self._http.auth(),
                timeout=httpx.Timeout(
                    self._probe_timeout, connect=min(self._probe_timeout, self.spec.connect_timeout)
                ),
            )
            latency = (time.perf_counter() - started) * 1000
            if response.status_code != 429:  # throttled still means "answers"
                self._http.raise_for_status(response, "/health", None)
                body = self._http.json(response, self._where(None))
                if not isinstance(body, dict) or "workers" not in body:
                    raise BackendBadResponse(
                        f"{capitalized(self._where(None))} sent a malformed /health."
                    )
        except CharforgeError as exc:
            return ProbeResult(False, None, exc.message)
        except httpx.HTTPError as exc:
            return ProbeResult(False, None, f"Could not reach RunPod: {exc or type(exc).__name__}")
        lacking, method = self.identity.probed()
        return ProbeResult(True, latency, None, [], None, lacking=lacking, identity_method=method)
