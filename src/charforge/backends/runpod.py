"""RunPod serverless endpoints (``https://api.runpod.ai/v2/ENDPOINT_ID``) that run an A1111 or
a ComfyUI worker image.

Facts this adapter is built on (docs.runpod.io "Send API requests", "Job states";
runpod/runpod-python; runpod-workers/worker-a1111 and worker-comfyui):
- ``POST /run`` answers ``{"id", "status": "IN_QUEUE"}`` at once and ``GET /status/{id}`` is
  polled until ``COMPLETED`` (``output``), ``FAILED`` (``error``), ``CANCELLED`` or
  ``TIMED_OUT``; ``/runsync`` gives up after 90 s, so it is not used;
- the key goes in ``Authorization: Bearer``; HTTP 429 (queue full, rate limit) is to be backed
  off; ``policy.executionTimeout`` (ms, > 5000) bounds a job's run on the worker;
- a handler that returns ``{"error": ...}`` or raises makes the job FAILED with that text
  (runpod-python wraps an exception as JSON with ``error_type`` and ``error_message``);
- worker-a1111 hands ``input`` to ``/sdapi/v1/txt2img`` unchanged and returns A1111's answer;
- worker-comfyui takes ``{"workflow": graph}`` and returns ``{"images": [{filename, type:
  "base64" | "s3_url", data}]}`` (before 5.0: ``{"status": "success", "message": ...}``); its
  newer versions put ``{"value", "max"}`` step progress into ``output`` while IN_PROGRESS;
- nothing lists a worker's models, samplers or schedulers, so the checks after generation
  guard them: A1111 silently replaces a name it does not know, and its ``info`` says what ran
  (``sampler_name``; since 1.9 ``extra_generation_params["Schedule type"]``).
"""

from __future__ import annotations

import json
import logging
import os
import re
import secrets
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from email.utils import parsedate_to_datetime
from typing import Any

import httpx

from charforge.backends.a1111 import error_text, parse_txt2img, txt2img_payload
from charforge.backends.base import (
    BackendRequest,
    BackendResult,
    CheckpointInfo,
    GeneratedImage,
    ProbeResult,
    Progress,
)
from charforge.backends.comfyui_graph import (
    Graph,
    WorkflowError,
    checkpoints_in,
    graph_for,
    load_workflow,
)
from charforge.backends.transport import (
    Hints,
    capitalized,
    decode_image_base64,
    looks_transient,
    read_json,
    send,
    timeout_of,
)
from charforge.domain.checkpoints import strip_hash
from charforge.domain.params import GenerationParams, seeds_for
from charforge.domain.requirements import require_capabilities
from charforge.domain.routes import BackendSpec
from charforge.errors import (
    BackendAuthFailed,
    BackendBadResponse,
    BackendInterrupted,
    BackendRejected,
    BackendTimeout,
    BackendUnavailable,
    CharforgeError,
    CheckpointMissing,
    InvalidInput,
)

log = logging.getLogger(__name__)

FINAL_STATES = ("COMPLETED", "FAILED", "CANCELLED", "TIMED_OUT")
# ComfyUI's validation error for a combo value it does not have, as worker-comfyui passes it.
_CKPT_NOT_IN_LIST = re.compile(r"ckpt_name: '([^']*)' not in")
_AVAILABLE_CKPTS = re.compile(r"Available checkpoint models: ([^\n]*)")
_ERROR_TEXT_MAX = 600

# A1111 1.10's schedule types (modules/sd_schedulers.py): its txt2img takes a schedule's name,
# its label or an alias for the same one; every spelling, lowered, -> the label, lowered.
_SCHEDULES: dict[str, str] = {
    "automatic": "automatic",
    "uniform": "uniform",
    "karras": "karras",
    "exponential": "exponential",
    "polyexponential": "polyexponential",
    "sgm_uniform": "sgm uniform",
    "sgm uniform": "sgm uniform",
    "sgmuniform": "sgm uniform",
    "kl_optimal": "kl optimal",
    "kl optimal": "kl optimal",
    "align_your_steps": "align your steps",
    "align your steps": "align your steps",
    "simple": "simple",
    "normal": "normal",
    "ddim": "ddim",
    "beta": "beta",
}
# Longest first, so "SGM Uniform" is not read as "Uniform".
_SCHEDULE_SUFFIXES = sorted(_SCHEDULES, key=len, reverse=True)
# A1111's aliases of its samplers (modules/sd_samplers_*.py), lowered -> the name it reports.
_SAMPLER_ALIASES: dict[str, str] = {
    "k_dpmpp_2m": "dpm++ 2m",
    "k_dpmpp_sde": "dpm++ sde",
    "k_dpmpp_2m_sde": "dpm++ 2m sde",
    "k_dpmpp_2m_sde_heun": "dpm++ 2m sde heun",
    "k_dpmpp_2s_a": "dpm++ 2s a",
    "k_dpmpp_3m_sde": "dpm++ 3m sde",
    "k_euler_a": "euler a",
    "k_euler_ancestral": "euler a",
    "k_euler": "euler",
    "k_lms": "lms",
    "k_heun": "heun",
    "k_dpm_2": "dpm2",
    "k_dpm_2_a": "dpm2 a",
    "k_dpm_fast": "dpm fast",
    "k_dpm_ad": "dpm adaptive",
    "k_lcm": "lcm",
    "ddim_cfgpp": "ddim cfg++",
}


@dataclass(frozen=True)
class Pacing:
    """How often and how long to wait; tests shrink it."""

    first_poll: float = 0.5  # seconds from /run to the first /status
    growth: float = 1.5  # each pause is this much longer than the one before ...
    longest_poll: float = 4.0  # ... up to this
    rate_limited: float = 1.0  # first pause after a 429 without Retry-After; doubles
    longest_rate_limited: float = 30.0
    call_timeout: float = 30.0  # one HTTP call; the whole job is bounded by spec.timeout
    poll_failures: int = 5  # failed polls in a row (5xx, dropped connection) before giving up


DEFAULT_PACING = Pacing()


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
        # No credentials on the client: the key is read from the environment per call, and
        # an absolute URL (a worker's S3 link) must never receive it.
        self._client = httpx.Client(
            base_url=spec.url,
            timeout=httpx.Timeout(self.pacing.call_timeout, connect=spec.connect_timeout),
            headers={"User-Agent": "charforge"},
        )
        # RunPod job id -> the charforge task it serves, for interrupt(task_id).
        self._jobs: dict[str, str] = {}
        self._jobs_lock = threading.Lock()

    @property
    def worker(self) -> str:
        return self.spec.worker or "a1111"

    @property
    def key_var(self) -> str:
        return self.spec.api_key_env or "RUNPOD_API_KEY"

    def close(self) -> None:
        self._client.close()

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
            return self._generate_comfyui(request, deadline)
        payload = txt2img_payload(request)
        payload.pop("force_task_id", None)  # the worker's WebUI is its own; ids mean nothing
        output = self._run_job(payload, request.style, deadline, request=request)
        result = parse_txt2img(output, self._where(request.style))
        self._check_sampling(result.info, request.params, request.style)
        return result

    def interrupt(self, task_id: str) -> bool:
        with self._jobs_lock:
            running = [job for job, task in self._jobs.items() if task == task_id]
        asked = False
        for job_id in running:
            asked = self._cancel(job_id) or asked
        return asked

    def probe(self) -> ProbeResult:
        started = time.perf_counter()
        try:
            response = self._client.get(
                "/health",
                headers=self._auth(),
                timeout=httpx.Timeout(
                    self._probe_timeout, connect=min(self._probe_timeout, self.spec.connect_timeout)
                ),
            )
            latency = (time.perf_counter() - started) * 1000
            if response.status_code != 429:  # throttled still means "answers"
                self._raise_for_status(response, "/health", None)
                body = self._json(response, self._where(None))
                if not isinstance(body, dict) or "workers" not in body:
                    raise BackendBadResponse(
                        f"{capitalized(self._where(None))} sent a malformed /health."
                    )
        except CharforgeError as exc:
            return ProbeResult(False, None, exc.message)
        except httpx.HTTPError as exc:
            return ProbeResult(False, None, f"Could not reach RunPod: {exc or type(exc).__name__}")
        return ProbeResult(True, latency, None, [], None)

    # -- the A1111 worker ------------------------------------------------------------------

    def _check_sampling(self, info: Any, p: GenerationParams, style: str) -> None:
        """A1111 silently runs its default for a sampler or schedule type it does not know,
        and RunPod cannot list the worker's names first: compare what ran (``info``) with
        what was asked, and discard the images when they differ."""
        if not isinstance(info, dict):
            return
        sampler, suffix = _split_schedule(p.sampler)
        ran_sampler = info.get("sampler_name")
        if (
            isinstance(ran_sampler, str)
            and ran_sampler
            and sampler  # none asked: A1111's default is what was asked for
            and not (_same_sampler(p.sampler, ran_sampler) or _same_sampler(sampler, ran_sampler))
        ):
            raise self._not_what_ran("sampler", p.sampler, ran_sampler, style)
        # A suffix of an old combined name ("DPM++ 2M Karras") wins over the scheduler field,
        # in A1111 as here; "Automatic" (or none) asks for the sampler's own default.
        # Before 1.9 (and for samplers without a schedule) no "Schedule type" is reported.
        asked = suffix or p.scheduler
        extra = info.get("extra_generation_params")
        ran_schedule = extra.get("Schedule type") if isinstance(extra, dict) else None
        if (
            isinstance(ran_schedule, str)
            and ran_schedule
            and _schedule_key(asked) not in ("", "automatic")
            and _schedule_key(asked) != _schedule_key(ran_schedule)
        ):
            raise self._not_what_ran("scheduler", asked, ran_schedule, style)

    def _not_what_ran(self, field: str, asked: str, ran: str, style: str) -> InvalidInput:
        return InvalidInput(
            f"{field.capitalize()} '{asked}' is not known to {self._where(style)}: its A1111 "
            f"worker silently ran '{ran}' instead, so the images were discarded.",
            field=field,
            hint=f"Use a {field} name that A1111 lists (/sdapi/v1/{field}s), e.g. '{ran}', or "
            f"leave {field} out for the default.",
        )

    # -- the ComfyUI worker ----------------------------------------------------------------

    def _generate_comfyui(self, request: BackendRequest, deadline: float) -> BackendResult:
        checkpoint = request.checkpoint.title
        # ComfyUI has no "random": one is picked here, so every image's seed is known.
        seeds = seeds_for(request.params.seed, request.count, pick=secrets.randbelow)
        images: list[GeneratedImage] = []
        graph: Graph = {}
        for index, seed in enumerate(seeds):
            graph = graph_for(self._template, request.params, checkpoint, seed)
            report = self._progress_reporter(request, index)
            output = self._run_job(
                {"workflow": graph}, request.style, deadline, report, request=request
            )
            images.append(GeneratedImage(self._comfy_image(output, request.style), seed))
            if request.on_progress is not None:
                self._report(request.on_progress, Progress((index + 1) / request.count))
        # The worker's output names no model, and ComfyUI refuses an unknown ckpt_name when it
        # validates the graph instead of substituting one (that is a FAILED job, mapped to
        # CheckpointMissing): a COMPLETED job ran exactly the ckpt_name charforge sent.
        ran = checkpoint if checkpoint in checkpoints_in(graph) else None
        return BackendResult(
            images=images,
            checkpoint=ran,
            checkpoint_hash=None,
            info={"worker": "comfyui", "seeds": [image.seed for image in images]},
        )

    def _progress_reporter(
        self, request: BackendRequest, index: int
    ) -> Callable[[Any], None] | None:
        """Turns worker-comfyui's ``{"value", "max"}`` progress into the request's fraction."""
        report = request.on_progress
        if report is None:
            return None

        def on_output(output: Any) -> None:
            if not isinstance(output, dict):
                return
            value, most = output.get("value"), output.get("max")
            if isinstance(value, int) and isinstance(most, int) and most > 0:
                inner = min(max(value / most, 0.0), 1.0)
                self._report(report, Progress((index + inner) / request.count, value, most))

        return on_output

    def _report(self, report: Callable[[Progress], None], update: Progress) -> None:
        try:
            report(update)
        except Exception:  # progress is a nicety (the runner writes it to the database):
            # a failing report must never end a generation, or leave its job running
            log.exception("backend %s: progress callback failed", self.spec.name)

    def _comfy_image(self, output: Any, style: str) -> bytes:
        where = self._where(style)
        if not isinstance(output, dict):
            raise BackendBadResponse(f"{capitalized(where)} sent no output for a finished job.")
        if output.get("status") == "error":  # older workers report failures as output
            raise BackendRejected(
                f"{capitalized(where)}'s ComfyUI worker failed: {_text(output.get('message'))}",
                hint="This is the worker's own message; the endpoint's logs show the details.",
            )
        items = output.get("images")
        if isinstance(items, list) and items and isinstance(items[0], dict):
            # Extra images (a batch, a second SaveImage) belong to no seed of ours.
            first = items[0]
            if first.get("type") == "s3_url":
                return self._download(first.get("data"), where)
            return decode_image_base64(first.get("data"), where)
        message = output.get("message")  # worker-comfyui before 5.0
        if isinstance(message, list) and message and isinstance(message[0], dict):
            kind, message = message[0].get("imageType"), message[0].get("image")
            if kind == "url":
                return self._download(message, where)
        if isinstance(message, str) and message:
            if message.startswith(("http://", "https://")):
                return self._download(message, where)
            return decode_image_base64(message, where)
        problems = output.get("errors") or output.get("status")
        raise BackendBadResponse(
            f"{capitalized(where)}'s ComfyUI worker returned no image"
            + (f" ({_text(problems)})." if problems else "."),
            hint="Check that the workflow ends in a SaveImage node.",
            retriable=False,  # the same graph gives the same nothing
        )

    def _download(self, url: Any, where: str) -> bytes:
        """A worker's image in its S3 bucket: a plain GET of a pre-signed URL, never with the
        RunPod key (it would go to the bucket's host), and never shown (it is a credential)."""
        if not isinstance(url, str) or not url.startswith(("http://", "https://")):
            raise BackendBadResponse(f"{capitalized(where)} sent an image link that is not a URL.")
        try:
            response = self._client.get(url, timeout=self.pacing.call_timeout)
        except httpx.HTTPError as exc:
            raise BackendUnavailable(
                f"Could not download the image {where} stored in its bucket: "
                f"{exc or type(exc).__name__}.",
                hint="Check the worker's BUCKET_ENDPOINT_URL and that the bucket is reachable.",
            ) from exc
        if response.status_code != 200:
            raise BackendBadResponse(
                f"The bucket of {where} answered HTTP {response.status_code} for an image.",
                hint="Check the worker's bucket settings (BUCKET_ENDPOINT_URL and its keys).",
            )
        return response.content

    # -- one RunPod job --------------------------------------------------------------------

    def _run_job(
        self,
        job_input: dict[str, Any],
        style: str,
        deadline: float,
        on_output: Callable[[Any], None] | None = None,
        *,
        request: BackendRequest | None = None,
    ) -> Any:
        """Submit one job and wait for its output (the handler's return value); nothing is
        submitted once the attempt was told to stop (a ComfyUI worker request is one job per
        image)."""
        task = (request.task_id if request else None) or "-"
        if request is not None and request.cancelled is not None and request.cancelled.is_set():
            raise BackendInterrupted(f"{capitalized(self._where(style))} was told to stop.")
        # The worker stops at our deadline too, should our /cancel never arrive.
        budget_ms = max(5001, int((deadline - time.monotonic()) * 1000))
        body = {"input": job_input, "policy": {"executionTimeout": budget_ms}}
        response = self._call("POST", "/run", style=style, deadline=deadline, body=body)
        answer = self._json(response, self._where(style))
        job_id = answer.get("id") if isinstance(answer, dict) else None
        if not isinstance(job_id, str) or not job_id:
            raise BackendBadResponse(
                f"{capitalized(self._where(style))} accepted a job but sent no id."
            )
        log.info("backend %s: RunPod job %s submitted", self.spec.name, job_id)
        job = _Watched(job_id)
        with self._running(job_id, task):
            try:
                return self._await(job, style, deadline, on_output)
            except BaseException:
                # Whatever ends the wait (our deadline, failed polls, a bug, an interrupt of
                # this thread), a job RunPod still runs would keep a GPU busy and billed.
                if job.state not in FINAL_STATES:
                    self._cancel(job_id)
                raise

    @contextmanager
    def _running(self, job_id: str, task_id: str) -> Iterator[None]:
        with self._jobs_lock:
            self._jobs[job_id] = task_id
        try:
            yield
        finally:
            with self._jobs_lock:
                self._jobs.pop(job_id, None)

    def _await(
        self,
        job: _Watched,
        style: str,
        deadline: float,
        on_output: Callable[[Any], None] | None,
    ) -> Any:
        """Poll /status with a growing pause until a final state, noting each state in
        ``job``; the caller cancels the job when this gives up on it."""
        pause, failures = self.pacing.first_poll, 0
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise self._expired(style, job.state)
            time.sleep(min(pause, remaining))
            pause = min(pause * self.pacing.growth, self.pacing.longest_poll)
            try:
                response = self._call("GET", f"/status/{job.id}", style=style, deadline=deadline)
                status = self._json(response, self._where(style))
            except CharforgeError as exc:
                failures += 1
                if exc.retriable and failures < self.pacing.poll_failures:
                    continue  # the job runs on regardless; the next poll may get through
                raise
            failures = 0
            job.state = str(status.get("status")) if isinstance(status, dict) else "?"
            if job.state == "COMPLETED":
                return status.get("output")
            if job.state in FINAL_STATES:
                raise self._final_error(status, style)
            if job.state == "IN_PROGRESS" and on_output is not None:
                try:
                    on_output(status.get("output"))
                except Exception:  # progress must not end the wait (see _report)
                    log.exception("backend %s: progress report failed", self.spec.name)

    def _cancel(self, job_id: str) -> bool:
        """Ask RunPod to stop a job (best effort: it has its own execution timeout)."""
        try:
            response = self._client.post(
                f"/cancel/{job_id}",
                headers=self._auth(),
                timeout=httpx.Timeout(
                    self.spec.connect_timeout * 2, connect=self.spec.connect_timeout
                ),
            )
        except Exception as exc:  # best effort, and it runs while another error unwinds
            log.warning(
                "backend %s: could not cancel RunPod job %s: %s", self.spec.name, job_id, exc
            )
            return False
        if response.status_code >= 400:
            log.warning(
                "backend %s: cancelling RunPod job %s got HTTP %d",
                self.spec.name,
                job_id,
                response.status_code,
            )
            return False
        log.info("backend %s: RunPod job %s cancelled", self.spec.name, job_id)
        return True

    def _expired(self, style: str, state: str) -> BackendTimeout:
        where = self._where(style)
        doing = (
            "still waiting in RunPod's queue (no free worker: a cold start, or the endpoint's "
            "max workers are busy)"
            if state == "IN_QUEUE"
            else "still running"
        )
        return BackendTimeout(
            f"{capitalized(where)} did not finish within {self.spec.timeout:g}s: the RunPod "
            f"job was {doing}, so charforge cancelled it.",
            hint=(
                f"Raise timeout_seconds of {self.spec.source} (or CHARFORGE_BACKEND_TIMEOUT), "
                "or give the endpoint more (active) workers in the RunPod console."
            ),
        )

    def _final_error(self, status: dict[str, Any], style: str) -> CharforgeError:
        where = self._where(style)
        state = status.get("status")
        if state == "CANCELLED":
            return BackendRejected(
                f"The RunPod job of {where} was cancelled before it finished (by charforge when "
                "its job was cancelled, or in the RunPod console or API).",
                hint="Generate again if it was not meant to be cancelled.",
            )
        if state == "TIMED_OUT":
            return BackendTimeout(
                f"RunPod timed out the job of {where}: it waited in the queue past its time to "
                "live, or ran past the endpoint's execution timeout.",
                hint=(
                    "Raise the endpoint's execution timeout or add workers in the RunPod "
                    f"console (endpoint of {self.spec.source}), or lower steps or size."
                ),
            )
        text = _failure_text(status)
        missing = _CKPT_NOT_IN_LIST.search(text) if self.worker == "comfyui" else None
        if missing is not None:
            return self._checkpoint_missing(missing.group(1), text, style)
        return BackendRejected(
            f"{capitalized(where)}'s RunPod worker failed: {text}",
            hint="This is the worker's own message; the endpoint's logs in the RunPod console "
            "show the details.",
            retriable=looks_transient(text),
        )

    def _checkpoint_missing(self, name: str, text: str, style: str) -> CheckpointMissing:
        found = _AVAILABLE_CKPTS.search(text)
        has = f" That backend has: {found.group(1).strip()}." if found else ""
        return CheckpointMissing(
            f"Checkpoint '{name}' for the {style} style is not on backend '{self.spec.name}': "
            f"its ComfyUI worker refused the workflow (value not in its list).{has}",
            hint=(
                f"Put {name} into the worker's models/checkpoints (image or network volume), or "
                f"point {self.spec.source} at an endpoint that has it, or change the route with "
                f"[routes.{style}] checkpoint in CHARFORGE_CONFIG."
            ),
        )

    # -- transport -------------------------------------------------------------------------

    def _where(self, style: str | None) -> str:
        # No URL: messages reach every user.
        what = f"the {style} style's backend" if style else "backend"
        return f"{what} '{self.spec.name}'"

    def _auth(self) -> dict[str, str]:
        """The bearer header, from the environment at call time (never from a file)."""
        key = os.environ.get(self.key_var, "").strip()
        if not key:
            raise BackendAuthFailed(
                f"Backend '{self.spec.name}' has no RunPod API key: the environment variable "
                f"{self.key_var} is not set.",
                hint=(
                    f"Set {self.key_var} in the environment of the charforge server and workers "
                    "(the key is read only from the environment), or name another variable "
                    f"with api_key_env in {self.spec.source}."
                ),
            )
        return {"Authorization": f"Bearer {key}"}

    def _call(
        self, method: str, path: str, *, style: str, deadline: float, body: Any = None
    ) -> httpx.Response:
        """One API call. A 429 is waited out (Retry-After when given, else a doubling pause)
        and tried again as long as the deadline allows."""
        pause = self.pacing.rate_limited
        while True:
            response = self._send(method, path, style=style, deadline=deadline, body=body)
            if response.status_code != 429:
                self._raise_for_status(response, path, style)
                return response
            wait = _retry_after(response)
            if wait is None:
                wait = pause
            pause = min(pause * 2, self.pacing.longest_rate_limited)
            if time.monotonic() + wait >= deadline:
                raise BackendTimeout(
                    f"RunPod kept answering HTTP 429 (too many requests) for {self._where(style)} "
                    f"until its {self.spec.timeout:g}s were up.",
                    hint="The endpoint's queue is full or its rate limit reached: add workers, "
                    "or send fewer jobs at once.",
                )
            log.info("backend %s: HTTP 429 on %s, waiting %.1fs", self.spec.name, path, wait)
            time.sleep(wait)

    def _send(
        self, method: str, path: str, *, style: str, deadline: float, body: Any
    ) -> httpx.Response:
        where = self._where(style)
        limit = max(min(self.pacing.call_timeout, deadline - time.monotonic()), 0.1)
        return send(
            self._client,
            method,
            path,
            where=where,
            connect_timeout=self.spec.connect_timeout,
            limit=limit,
            hints=Hints(reach=self._reach_hint(), stuck=self._reach_hint()),
            json=body,
            headers=self._auth(),
            timeout=timeout_of(limit, self.spec.connect_timeout),
        )

    def _reach_hint(self) -> str:
        return (
            f"Check network access to RunPod and that {self.spec.source} has the endpoint's "
            "URL (https://api.runpod.ai/v2/ENDPOINT_ID); GET /api/styles shows which backends "
            "answer."
        )

    def _raise_for_status(self, response: httpx.Response, path: str, style: str | None) -> None:
        status = response.status_code
        if status < 400:
            return
        where = self._where(style)
        if status in (401, 403):
            raise BackendAuthFailed(
                f"RunPod refused the API key in {self.key_var} for {where} (HTTP {status}).",
                hint=f"Put a current RunPod API key with access to this endpoint into "
                f"{self.key_var} (RunPod console: Settings, API Keys).",
            )
        if status == 404 and path.startswith("/status/"):
            raise BackendRejected(
                f"RunPod no longer knows the job of {where} (HTTP 404); its result may have "
                "expired.",
                retriable=True,  # submitting it again may work
            )
        if status == 404:
            raise BackendRejected(
                f"RunPod has no endpoint behind {where} (HTTP 404 on {path}).",
                hint=f"Check the endpoint ID in the url of {self.spec.source} "
                "(https://api.runpod.ai/v2/ENDPOINT_ID).",
            )
        raise BackendRejected(
            f"RunPod answered HTTP {status} on {path} for {where}: {error_text(response)}",
            hint="RunPod's status page and the endpoint's logs in the console show more.",
            retriable=status >= 500,  # RunPod's own fault may pass
        )

    @staticmethod
    def _json(response: httpx.Response, where: str) -> Any:
        return read_json(response, where, expected="the RunPod API")


def _text(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(value)
    return text[:_ERROR_TEXT_MAX]


def _failure_text(status: dict[str, Any]) -> str:
    """The worker's words from a FAILED job: its ``error`` (runpod-python wraps a raised
    exception as JSON) plus what the handler returned beside it (A1111's ``errors``,
    worker-comfyui's ``details``)."""
    error = status.get("error")
    text = _text(error) if error else "no error message"
    if isinstance(error, str) and error.startswith("{"):
        try:
            wrapped = json.loads(error)
        except ValueError:
            wrapped = None
        if isinstance(wrapped, dict) and wrapped.get("error_message"):
            kind = re.sub(r"^<class '(.*)'>$", r"\1", str(wrapped.get("error_type") or ""))
            message = str(wrapped["error_message"])
            text = f"{kind}: {message}" if kind else message
    output = status.get("output")
    if isinstance(output, dict):
        extra = [output[k] for k in ("errors", "detail", "details", "message") if output.get(k)]
        if extra:
            text = f"{text} ({'; '.join(_text(item) for item in extra)})"
    return text[:_ERROR_TEXT_MAX]


def _retry_after(response: httpx.Response) -> float | None:
    """Retry-After in seconds (a number or an HTTP date), when the answer has one."""
    value = response.headers.get("retry-after", "").strip()
    if not value:
        return None
    try:
        return max(float(value), 0.0)
    except ValueError:
        pass
    try:
        return max(parsedate_to_datetime(value).timestamp() - time.time(), 0.0)
    except (TypeError, ValueError):
        return None


@dataclass
class _Watched:
    """A submitted RunPod job and the last state its /status reported."""

    id: str
    state: str = "IN_QUEUE"


def _schedule_key(name: str) -> str:
    """A schedule type as A1111 compares them: its name, label or alias are the same one."""
    lowered = name.strip().lower()
    return _SCHEDULES.get(lowered, lowered)


def _split_schedule(sampler: str) -> tuple[str, str | None]:
    """A1111's reading of an old combined sampler name: "DPM++ 2M Karras" is the sampler
    "DPM++ 2M" with the schedule "Karras" (which wins over the scheduler field)."""
    name = sampler.strip()
    lowered = name.lower()
    for suffix in _SCHEDULE_SUFFIXES:
        if lowered.endswith(" " + suffix):
            return name[: -len(suffix) - 1].rstrip(), name[-len(suffix) :]
    return name, None


def _same_sampler(asked: str, ran: str) -> bool:
    """Whether A1111 reporting ``ran`` means it ran the sampler asked for: the same name in
    any case, or an alias of it (A1111 reports the sampler's own name)."""
    wanted, reported = asked.strip().lower(), ran.strip().lower()
    return wanted == reported or _SAMPLER_ALIASES.get(wanted) == reported
