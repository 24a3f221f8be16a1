"""A1111's ``shared.state`` and ``modules/progress.py`` task tracking, plus the step clock.

One ``WebUIState`` per simulated WebUI. It reproduces, field for field:

- ``State.begin()``: resets the step counter, ``job_count=-1``, ``job_no``, the interrupted and
  skipped flags, the start time and the job timestamp, but *not* ``sampling_steps``: the last
  job's value lingers until the new job's sampler starts.
- ``State.end()``: ``job=""``, ``job_count=0``; everything else stays as the job left it.
- ``interrupt()`` / ``skip()``: set a flag on whatever runs (a queued task's ``begin()`` clears it).
- ``progress.py``: ``pending_tasks`` (id -> arrival), ``current_task``, ``finished_tasks`` (the last
  16) and ``POST /internal/progress``.

Sampling is simulated step by step: ``Faults.delay_seconds`` is spread over every sampling step
of the request, and the interrupted/skipped flags are checked before each step like A1111's
``CFGDenoiser`` does.
"""

from __future__ import annotations

import secrets
import string
import threading
import time
from dataclasses import dataclass
from datetime import datetime
from typing import Any

_TASK_ID_CHARS = string.ascii_uppercase + string.digits
_FINISHED_KEPT = 16  # progress.finish_task keeps this many
_RUNS_KEPT = 256
_POLL = 0.05


def create_task_id(task_type: str) -> str:
    """``progress.create_task_id``: ``task(txt2img-AB12CD3)``."""
    suffix = "".join(secrets.choice(_TASK_ID_CHARS) for _ in range(7))
    return f"task({task_type}-{suffix})"


@dataclass
class SharedState:
    """The fields of A1111's ``shared.state`` that the API shows."""

    skipped: bool = False
    interrupted: bool = False
    job: str = ""
    job_no: int = 0
    job_count: int = 0
    job_timestamp: str = "0"
    sampling_step: int = 0
    sampling_steps: int = 0
    time_start: float | None = None
    textinfo: str | None = None

    def begin(self, job: str) -> None:
        self.sampling_step = 0
        self.time_start = time.monotonic()
        self.job_count = -1
        self.job_no = 0
        self.job_timestamp = datetime.now().strftime("%Y%m%d%H%M%S")
        self.skipped = False
        self.interrupted = False
        self.textinfo = None
        self.job = job

    def end(self) -> None:
        self.job = ""
        self.job_count = 0

    def nextjob(self) -> None:
        self.job_no += 1
        self.sampling_step = 0

    def as_dict(self) -> dict[str, Any]:
        return {
            "skipped": self.skipped,
            "interrupted": self.interrupted,
            "stopping_generation": False,
            "job": self.job,
            "job_count": self.job_count,
            "job_timestamp": self.job_timestamp,
            "job_no": self.job_no,
            "sampling_step": self.sampling_step,
            "sampling_steps": self.sampling_steps,
        }


@dataclass(frozen=True)
class PassResult:
    """One sampling pass (first pass or hires pass) of one batch."""

    done: int
    total: int
    stopped_by: str | None = None
    """``"interrupted"``, ``"skipped"`` or ``"shutdown"`` when cut short."""


@dataclass(frozen=True)
class IterationResult:
    """One batch (``n_iter`` loop turn): its first pass and its hires pass, if one ran."""

    first: PassResult
    hires: PassResult | None


class InternalProgressError(Exception):
    """``/internal/progress`` crashing like A1111's (a TypeError before any job ever ran)."""


class WebUIState:
    """``shared.state`` + ``modules/progress.py`` of one simulated WebUI; thread-safe."""

    def __init__(self) -> None:
        self._lock = threading.RLock()
        self._wake = threading.Event()  # set by interrupt, skip and shutdown
        self._shutting_down = False
        self.state = SharedState()
        self._pending: dict[str, float] = {}
        self._current: str | None = None
        self._finished: list[str] = []
        self._interrupted: list[dict[str, Any]] = []
        self._skipped: list[dict[str, Any]] = []
        self._runs: dict[str, dict[str, Any]] = {}

    def reset(self) -> None:
        """Fresh state and history; requests still waiting in the queue stay pending."""
        with self._lock:
            self.state = SharedState()
            self._current = None
            self._finished.clear()
            self._interrupted.clear()
            self._skipped.clear()
            self._runs.clear()
            if not self._shutting_down:
                self._wake.clear()

    # ------------------------------------------------------------------ tasks (progress.py)

    def add_pending(self, task_id: str) -> None:
        with self._lock:
            self._pending[task_id] = time.time()

    def start_task(self, task_id: str) -> None:
        with self._lock:
            self._current = task_id
            self._pending.pop(task_id, None)

    def finish_task(self, task_id: str) -> None:
        with self._lock:
            if self._current == task_id:
                self._current = None
            self._finished.append(task_id)
            del self._finished[:-_FINISHED_KEPT]

    @property
    def current_task(self) -> str | None:
        with self._lock:
            return self._current

    @property
    def pending_tasks(self) -> list[str]:
        with self._lock:
            return sorted(self._pending, key=self._pending.__getitem__)

    @property
    def finished_tasks(self) -> list[str]:
        with self._lock:
            return list(self._finished)

    @property
    def interrupted_tasks(self) -> list[dict[str, Any]]:
        with self._lock:
            return [dict(item) for item in self._interrupted]

    @property
    def skipped_tasks(self) -> list[dict[str, Any]]:
        with self._lock:
            return [dict(item) for item in self._skipped]

    @property
    def task_runs(self) -> dict[str, dict[str, Any]]:
        with self._lock:
            return {task: dict(run) for task, run in self._runs.items()}

    def record_run(self, task_id: str, run: dict[str, Any]) -> None:
        with self._lock:
            self._runs.pop(task_id, None)
            self._runs[task_id] = run
            while len(self._runs) > _RUNS_KEPT:
                del self._runs[next(iter(self._runs))]

    # ------------------------------------------------------------------ shared.state

    def begin(self, job: str) -> None:
        with self._lock:
            self.state.begin(job)

    def end(self) -> None:
        with self._lock:
            self.state.end()

    def interrupt(self) -> None:
        with self._lock:
            self.state.interrupted = True
        self._wake.set()

    def skip(self) -> None:
        with self._lock:
            self.state.skipped = True
        self._wake.set()

    def shutdown(self) -> None:
        with self._lock:
            self._shutting_down = True
        self._wake.set()

    def resume(self) -> None:
        with self._lock:
            self._shutting_down = False
            self._wake.clear()

    @property
    def job_timestamp(self) -> str:
        with self._lock:
            return self.state.job_timestamp

    # ------------------------------------------------------------------ progress routes

    def sdapi_progress(self) -> dict[str, Any]:
        """``GET /sdapi/v1/progress`` as ``Api.progressapi`` computes it.

        ``current_task`` is always null: A1111 1.10's api.py imports the *value* of
        ``progress.current_task`` (None) at start, so the route never sees a task.
        """
        with self._lock:
            s = self.state
            answer: dict[str, Any] = {
                "progress": 0.0,
                "eta_relative": 0.0,
                "state": s.as_dict(),
                "current_image": None,
                "textinfo": s.textinfo,
                "current_task": None,
            }
            if s.job_count == 0:
                return answer
            progress = 0.01
            if s.job_count > 0:
                progress += s.job_no / s.job_count
            if s.sampling_steps > 0:
                progress += 1 / s.job_count * s.sampling_step / s.sampling_steps
            elapsed = time.monotonic() - (s.time_start or 0.0)
            answer["eta_relative"] = elapsed / progress - elapsed
            answer["progress"] = min(progress, 1.0)
            return answer

    def internal_progress(self, id_task: str | None, id_live_preview: int) -> dict[str, Any]:
        """``POST /internal/progress`` (``progress.progressapi``)."""
        with self._lock:
            active = id_task == self._current
            queued = id_task in self._pending
            completed = id_task in self._finished
            answer: dict[str, Any] = {
                "active": active,
                "queued": queued,
                "completed": completed,
                "progress": None,
                "eta": None,
                "live_preview": None,
                "id_live_preview": -1,
                "textinfo": "Waiting...",
            }
            if not active:
                if id_task is not None and queued:
                    order = sorted(self._pending, key=self._pending.__getitem__)
                    answer["textinfo"] = f"In queue: {order.index(id_task) + 1}/{len(order)}"
                return answer
            s = self.state
            progress = 0.0
            if s.job_count > 0:
                progress += s.job_no / s.job_count
            if s.sampling_steps > 0 and s.job_count > 0:
                progress += 1 / s.job_count * s.sampling_step / s.sampling_steps
            progress = min(progress, 1.0)
            if s.time_start is None:  # no id_task and no job since start: A1111 crashes here
                raise InternalProgressError(
                    "unsupported operand type(s) for -: 'float' and 'NoneType'"
                )
            elapsed = time.monotonic() - s.time_start
            eta = elapsed / progress - elapsed if progress > 0 else None
            answer.update(
                progress=progress,
                eta=eta,
                id_live_preview=id_live_preview,
                textinfo=s.textinfo,
            )
            return answer

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            return {
                "current_task": self._current,
                "pending_tasks": self.pending_tasks,
                "finished_tasks": list(self._finished),
                "interrupted_tasks": self.interrupted_tasks,
                "skipped_tasks": self.skipped_tasks,
                "task_runs": self.task_runs,
                "shared_state": self.state.as_dict(),
            }

    # ------------------------------------------------------------------ the step clock

    def pause(self, seconds: float, *, interruptible: bool = True) -> None:
        """Sleep ``seconds``; wake early on shutdown, and on interrupt/skip if interruptible."""
        if seconds <= 0:
            return
        deadline = time.monotonic() + seconds
        while True:
            reason = self._stop_reason()
            if reason == "shutdown" or (interruptible and reason is not None):
                return
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return
            if self._wake.wait(min(remaining, _POLL)):
                with self._lock:
                    if not self._shutting_down:
                        self._wake.clear()  # the flags say why; a stale wake is dropped

    def _stop_reason(self) -> str | None:
        with self._lock:
            if self._shutting_down:
                return "shutdown"
            if self.state.interrupted:
                return "interrupted"
            if self.state.skipped:
                return "skipped"
            return None

    def sample(
        self,
        task_id: str,
        *,
        n_iter: int,
        steps: int,
        hires_steps: int | None,
        seconds: float,
        fail_first_step: Exception | None = None,
    ) -> list[IterationResult]:
        """``process_images_inner``'s batch loop; returns the batches that started.

        Raises ``fail_first_step`` (a NaN check) after the first step of the first pass.
        """
        passes = 2 if hires_steps else 1
        total_steps = n_iter * (steps + (hires_steps or 0))
        per_step = seconds / total_steps if seconds > 0 and total_steps > 0 else 0.0
        with self._lock:
            if self.state.job_count == -1:
                self.state.job_count = n_iter * passes
        results: list[IterationResult] = []
        for n in range(n_iter):
            with self._lock:
                self.state.skipped = False
                if self.state.interrupted or self._shutting_down:
                    if self.state.interrupted:
                        self._note_stop(task_id, "interrupted", 0, steps, "first")
                    break
                if n_iter > 1:
                    self.state.job = f"Batch {n + 1} out of {n_iter}"
            first = self._sample_pass(task_id, steps, per_step, "first", fail_first_step)
            hires: PassResult | None = None
            if hires_steps:
                with self._lock:
                    # sample_hr_pass returns the first-pass latent when interrupted
                    run_hires = not (self.state.interrupted or self._shutting_down)
                    if run_hires:
                        self.state.nextjob()
                if run_hires:
                    quiet = first.stopped_by == "skipped"  # one skip cuts both passes
                    hires = self._sample_pass(task_id, hires_steps, per_step, "hires", None, quiet)
            results.append(IterationResult(first, hires))
            with self._lock:
                self.state.nextjob()
        return results

    def _sample_pass(
        self,
        task_id: str,
        steps: int,
        per_step: float,
        name: str,
        fail: Exception | None,
        quiet: bool = False,
    ) -> PassResult:
        with self._lock:
            self.state.sampling_steps = steps
            self.state.sampling_step = 0
        for step in range(steps):
            reason = self._stop_reason()
            if reason is None:
                self.pause(per_step)
                if fail is not None:
                    raise fail
                reason = self._stop_reason()
            if reason is not None:
                if not quiet:
                    self._note_stop(task_id, reason, step, steps, name)
                return PassResult(step, steps, reason)
            with self._lock:
                self.state.sampling_step = step + 1
        return PassResult(steps, steps)

    def _note_stop(self, task_id: str, reason: str, step: int, steps: int, name: str) -> None:
        with self._lock:
            record = {
                "task": task_id,
                "step": step,
                "steps": steps,
                "job_no": self.state.job_no,
                "pass": name,
            }
            if reason == "interrupted":
                if not any(item["task"] == task_id for item in self._interrupted):
                    self._interrupted.append(record)
            elif reason == "skipped":
                self._skipped.append(record)
