"""One A1111 task followed on its own, although the WebUI's state is global.

A1111 (modules/progress.py, shared_state.py) runs one task at a time and keeps one state:
``/sdapi/v1/progress`` and ``/sdapi/v1/interrupt`` are about whatever runs now, the
interrupted flag is cleared only when the next task begins, and ``sampling_steps`` keeps the
previous task's value until the new task's sampler starts. A task named by ``force_task_id``
can be told apart by ``POST /internal/progress {id_task}``: active, queued or completed. That
route exists only when the WebUI's UI is mounted (not with ``--nowebui``), and the
``current_task`` field of ``/sdapi/v1/progress`` is always null in A1111 1.10 (bound once at
import), so where the route is missing a task counts as active while its own request is open
and the WebUI runs something (true unless another program shares that WebUI).

So a ``TaskWatch`` reports progress only while its task is the active one (and steps only
once its own sampler has started), interrupts the WebUI only while its task is the active
one, and remembers whether the WebUI was interrupted or told to skip while its task ran.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from charforge.backends.base import Progress
from charforge.observability import logs

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class WebUIState:
    """``GET /sdapi/v1/progress``, reduced to what a task needs."""

    current_task: str | None
    running: bool  # a task runs now (job_count != 0)
    interrupted: bool
    skipped: bool
    job_timestamp: str | None
    fraction: float | None
    step: int | None
    steps: int | None
    job_no: int | None = None  # passes finished in this task (A1111's state.nextjob())

    @classmethod
    def of(cls, data: Any) -> WebUIState | None:
        if not isinstance(data, dict) or not isinstance(data.get("state"), dict):
            return None
        state: dict[str, Any] = data["state"]
        fraction = data.get("progress")
        step, steps = state.get("sampling_step"), state.get("sampling_steps")
        current = data.get("current_task")
        return cls(
            current_task=current if isinstance(current, str) else None,
            running=bool(state.get("job_count")),
            interrupted=bool(state.get("interrupted")),
            skipped=bool(state.get("skipped")),
            job_timestamp=str(state["job_timestamp"]) if state.get("job_timestamp") else None,
            fraction=float(fraction) if isinstance(fraction, int | float) else None,
            step=step if isinstance(step, int) else None,
            steps=steps if isinstance(steps, int) and steps > 0 else None,
            job_no=state["job_no"] if isinstance(state.get("job_no"), int) else None,
        )


@dataclass(frozen=True)
class TaskStatus:
    """``POST /internal/progress``: where one task is."""

    active: bool
    queued: bool
    completed: bool


class TaskWatch:
    """One task while its txt2img call is open (and, once that call was given up, until the
    task can be stopped): progress, a pending cancel, interrupts seen. Passive: the adapter's
    one ``Watcher`` thread looks at the WebUI for all of its tasks (no thread per call)."""

    def __init__(
        self,
        task_id: str,
        *,
        steps: int,
        interrupt: Callable[[str], bool],
        report: Callable[[Progress], None] | None,
        cancel: threading.Event | None = None,
        passes: int = 1,
    ) -> None:
        self.task_id = task_id
        # Passes per image (2 with a hires pass): A1111 counts each in state.job_no.
        self.passes = passes
        # Whole images made when our own stop was sent (read just before it), if it was.
        self.made_before_stop: int | None = None
        self._steps = steps
        self._interrupt = interrupt  # stops this task if it is still the active one
        self._report = report
        self.done = False  # the call returned: report nothing more
        # Stop the task as soon as it is the active one (the attempt's own cancel, if given).
        self.cancel = cancel if cancel is not None else threading.Event()
        self.stopped_seen = False  # the WebUI was interrupted or skipped while it ran
        self._own_steps = False  # its sampler has started: sampling_steps are its own
        self._interrupt_sent = False
        self._reap_until = 0.0  # set when the call was given up (see reap)
        self._lock = threading.Lock()
        # Made in the job's thread: the watcher's looks at this task log with its job id.
        self.context = logs.CarriedContext()

    def interrupted_elsewhere(self) -> None:
        """The WebUI was already told to stop this task (it was active): not again."""
        with self._lock:
            self._interrupt_sent = True

    def reap(self, deadline: float) -> None:
        """The call was given up while the task may still run or wait in the WebUI's queue:
        keep watching until ``deadline`` and stop the task when it starts."""
        self._report = None
        self.cancel.set()
        self._reap_until = deadline

    @property
    def finished(self) -> bool:
        """Nothing more to watch for."""
        if not self.done:
            return False
        return self._reap_until == 0 or self._interrupt_sent or time.monotonic() > self._reap_until

    def active(self, status: TaskStatus | None, state: WebUIState | None) -> bool:
        """Whether this task is the one the WebUI runs now."""
        if status is not None:
            return status.active
        if state is None:
            return False
        if state.current_task is not None:  # a WebUI that fills it in (not A1111 1.10)
            return state.current_task == self.task_id
        return state.running  # no per-task route: while our request is open, it is ours

    def observe(self, state: WebUIState | None, active: bool) -> None:
        """One look at the WebUI while this task is (or is not) the active one."""
        if state is None or not active:
            return
        with self._lock:
            if state.interrupted or state.skipped:
                self.stopped_seen = True
            if state.steps == self._steps:
                self._own_steps = True
            wants_stop = self.cancel.is_set() and not self._interrupt_sent
            if wants_stop:
                self._interrupt_sent = True
        if wants_stop:
            log.info("interrupting A1111 task %s, which is running now", self.task_id)
            self._interrupt(self.task_id)

    def look(self, status: TaskStatus | None, state: WebUIState | None) -> None:
        """One tick of the watcher: note what the WebUI says, stop or report."""
        if self.done and not self._reap_until:
            return  # its call returned: whatever runs now is not this task
        if self._reap_until and status is not None and not (status.active or status.queued):
            self._reap_until = time.monotonic() - 1  # it ended before it could be stopped
            return
        active = self.active(status, state)
        self.observe(state, active)
        report = self._report
        if (
            report is None
            or self.done
            or state is None
            or not active
            or not state.running
            or state.fraction is None
        ):
            return
        own = self._own_steps
        report(
            Progress(
                min(max(state.fraction, 0.0), 1.0),
                state.step if own else None,
                state.steps if own else None,
            )
        )


class Watcher:
    """One thread per WebUI that looks, every ``interval``, at each task being followed: one
    read of the global state, and one per-task status each (``read_status``)."""

    def __init__(
        self,
        name: str,
        *,
        read_state: Callable[[], WebUIState | None],
        read_status: Callable[[str], TaskStatus | None],
        interval: float,
    ) -> None:
        self._name = name
        self._read_state = read_state
        self._read_status = read_status
        self._interval = interval
        self._watches: dict[str, TaskWatch] = {}
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._added = threading.Event()
        self._closed = False
        self._thread: threading.Thread | None = None

    def add(self, watch: TaskWatch) -> None:
        with self._lock:
            self._watches[watch.task_id] = watch
            if self._thread is None or not self._thread.is_alive():
                # Started once, and again only if it ever ended: not per call.
                self._thread = threading.Thread(
                    target=self._loop, name=f"a1111-watch-{self._name}", daemon=True
                )
                self._thread.start()
        self._added.set()  # an idle loop starts watching, one interval from now

    def get(self, task_id: str) -> TaskWatch | None:
        with self._lock:
            return self._watches.get(task_id)

    def release(self, watch: TaskWatch) -> None:
        """The call returned: forget the task unless it is still to be stopped."""
        watch.done = True
        if watch.finished:
            with self._lock:
                self._watches.pop(watch.task_id, None)

    def wake(self) -> None:
        """Look now (a cancel is pending)."""
        self._wake.set()

    def close(self) -> None:
        self._closed = True
        self._added.set()
        self._wake.set()

    @staticmethod
    def _safely(read: Callable[..., Any], *args: Any) -> Any:
        try:
            return read(*args)
        except Exception:  # progress is a nicety: the call itself decides the outcome
            return None

    @staticmethod
    def _look(watch: TaskWatch, status: TaskStatus | None, state: WebUIState | None) -> None:
        try:
            watch.look(status, state)
        except Exception:  # one task's trouble must not stop the others' watch
            log.exception("watching A1111 task %s failed", watch.task_id)

    def _loop(self) -> None:
        while not self._closed:
            with self._lock:
                for task_id in [t for t, w in self._watches.items() if w.finished]:
                    del self._watches[task_id]
                watches = list(self._watches.values())
            if not watches:
                self._added.wait(5.0)
                self._added.clear()
                # The first look one interval later: a short task is never polled at all.
                self._wake.wait(self._interval)
                self._wake.clear()
                continue
            # Which task is active first, then the state: a state read before a task began
            # could still carry the previous task's interrupted flag.
            statuses = {
                w.task_id: w.context.run(self._safely, self._read_status, w.task_id)
                for w in watches
            }
            state = self._safely(self._read_state)
            for watch in watches:
                watch.context.run(self._look, watch, statuses[watch.task_id], state)
            self._wake.wait(self._interval)
            self._wake.clear()
