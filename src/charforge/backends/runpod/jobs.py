"""One RunPod serverless job: submitted, polled to its end, cancelled when given up on.

Facts (docs.runpod.io "Send API requests", "Job states"; runpod/runpod-python):
- ``POST /run`` answers ``{"id", "status": "IN_QUEUE"}`` at once and ``GET /status/{id}`` is
  polled until ``COMPLETED`` (``output``), ``FAILED`` (``error``), ``CANCELLED`` or
  ``TIMED_OUT``; ``/runsync`` gives up after 90 s, so it is not used;
- ``policy.executionTimeout`` (ms, > 5000) bounds a job's run on the worker;
- a handler that returns ``{"error": ...}`` or raises makes the job FAILED with that text
  (runpod-python wraps an exception as JSON with ``error_type`` and ``error_message``; the
  rest of a returned dict is the ``output``).
"""

from __future__ import annotations

import json
import logging
import re
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import httpx

from charforge.backends.base import BackendRequest
from charforge.backends.runpod.client import RunPodClient
from charforge.backends.transport import capitalized, looks_transient
from charforge.errors import (
    BackendBadResponse,
    BackendInterrupted,
    BackendRejected,
    BackendTimeout,
    CharforgeError,
    CheckpointMissing,
)

log = logging.getLogger(__name__)

FINAL_STATES = ("COMPLETED", "FAILED", "CANCELLED", "TIMED_OUT")
# ComfyUI's validation error for a combo value it does not have, as worker-comfyui passes it.
_CKPT_NOT_IN_LIST = re.compile(r"ckpt_name: '([^']*)' not in")
_AVAILABLE_CKPTS = re.compile(r"Available checkpoint models: ([^\n]*)")
_ERROR_TEXT_MAX = 600


@dataclass
class _Watched:
    """A submitted RunPod job and the last state its /status reported."""

    id: str
    state: str = "IN_QUEUE"


class JobRunner:
    def __init__(self, client: RunPodClient, *, worker: str) -> None:
        self.client = client
        self.spec = client.spec
        self.worker = worker
        # RunPod job id -> the charforge task it serves, for interrupt(task_id).
        self._jobs: dict[str, str] = {}
        self._jobs_lock = threading.Lock()

    def run(
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
        where = self.client.where(style)
        task = (request.task_id if request else None) or "-"
        if request is not None and request.cancelled is not None and request.cancelled.is_set():
            raise BackendInterrupted(f"{capitalized(where)} was told to stop.")
        # The worker stops at our deadline too, should our /cancel never arrive.
        budget_ms = max(5001, int((deadline - time.monotonic()) * 1000))
        body = {"input": job_input, "policy": {"executionTimeout": budget_ms}}
        response = self.client.call("POST", "/run", style=style, deadline=deadline, body=body)
        answer = self.client.json(response, where)
        job_id = answer.get("id") if isinstance(answer, dict) else None
        if not isinstance(job_id, str) or not job_id:
            raise BackendBadResponse(f"{capitalized(where)} accepted a job but sent no id.")
        log.info("backend %s: RunPod job %s submitted", self.spec.name, job_id)
        job = _Watched(job_id)
        with self._running(job_id, task):
            try:
                return self._await(job, style, deadline, on_output)
            except BaseException:
                # Whatever ends the wait (our deadline, failed polls, a bug, an interrupt of
                # this thread), a job RunPod still runs would keep a GPU busy and billed.
                if job.state not in FINAL_STATES:
                    self.cancel(job_id)
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

    def interrupt(self, task_id: str) -> bool:
        with self._jobs_lock:
            running = [job for job, task in self._jobs.items() if task == task_id]
        asked = False
        for job_id in running:
            asked = self.cancel(job_id) or asked
        return asked

    def _await(
        self,
        job: _Watched,
        style: str,
        deadline: float,
        on_output: Callable[[Any], None] | None,
    ) -> Any:
        """Poll /status with a growing pause until a final state, noting each state in
        ``job``; the caller cancels the job when this gives up on it."""
        pacing = self.client.pacing
        pause, failures = pacing.first_poll, 0
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise self._expired(style, job.state)
            time.sleep(min(pause, remaining))
            pause = min(pause * pacing.growth, pacing.longest_poll)
            try:
                response = self.client.call(
                    "GET", f"/status/{job.id}", style=style, deadline=deadline
                )
                status = self.client.json(response, self.client.where(style))
            except CharforgeError as exc:
                failures += 1
                if exc.retriable and failures < pacing.poll_failures:
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

    def cancel(self, job_id: str) -> bool:
        """Ask RunPod to stop a job (best effort: it has its own execution timeout)."""
        try:
            response = self.client.http.post(
                f"/cancel/{job_id}",
                headers=self.client.auth(),
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
        where = self.client.where(style)
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
        where = self.client.where(style)
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
        text = failure_text(status)
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


def text_of(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(value)
    return text[:_ERROR_TEXT_MAX]


def failure_text(status: dict[str, Any]) -> str:
    """The worker's words from a FAILED job: its ``error`` (runpod-python wraps a raised
    exception as JSON) plus what the handler returned beside it (A1111's ``errors``,
    worker-comfyui's ``details``)."""
    error = status.get("error")
    text = text_of(error) if error else "no error message"
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
            text = f"{text} ({'; '.join(text_of(item) for item in extra)})"
    return text[:_ERROR_TEXT_MAX]
