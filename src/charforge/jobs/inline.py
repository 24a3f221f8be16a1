"""Embedded mode's queue: a dispatcher thread inside the server process hands queued jobs to
free backends (jobs/scheduler.py decides which), and a thread per backend slot runs them.

The job row is the truth; this queue only holds ids. On start, jobs a crashed process left
running go back to queued (with their attempt count), and every queued job is taken up again.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace

from charforge.db import recovery
from charforge.db import repositories as repo
from charforge.db.models import utcnow
from charforge.domain.requirements import capable_backends
from charforge.jobs.runner import RunnerContext, run_on_slot
from charforge.jobs.scheduler import (
    Fairness,
    FreeBackend,
    Policy,
    QueuedJob,
    plan,
    split_backends,
)
from charforge.jobs.tickets import JobTicket

log = logging.getLogger(__name__)

Planner = Callable[
    [list[QueuedJob], list[FreeBackend], list[tuple[str, str | None]], float],
    list[tuple[QueuedJob, str]],
]


class InlineJobQueue:
    def __init__(
        self,
        ctx: RunnerContext,
        *,
        policy: Policy | None = None,
        planner: Planner | None = None,
    ) -> None:
        self._ctx = ctx
        self._policy = policy or Policy()
        self._fairness = Fairness()
        self._planner = planner or self._plan
        self._queued: dict[str, QueuedJob] = {}
        self._running: set[str] = set()
        self._done: dict[str, threading.Event] = {}
        self._callbacks: dict[str, list[Callable[[], None]]] = {}
        self._lock = threading.Condition()
        self._stopping = threading.Event()
        self._dispatcher: threading.Thread | None = None
        # A thread per backend slot: with pipelining, one generating and one waiting at the door.
        slots = max(1, sum(s.limit for s in ctx.pool.statuses()))
        self._executor = ThreadPoolExecutor(max_workers=slots, thread_name_prefix="charforge-job")
        ctx.pool.on_change(self._wake)

    # -- the JobQueue protocol ---------------------------------------------------------------

    def start(self) -> None:
        self._stopping.clear()
        self._dispatcher = threading.Thread(target=self._loop, name="dispatcher", daemon=True)
        self._dispatcher.start()

    def recover(self) -> int:
        """Take up what an earlier process left behind; returns how many jobs are queued."""
        with self._ctx.db.session() as session:
            requeued, failed = recovery.requeue_abandoned(
                session,
                utcnow(),
                only_expired=False,
                max_attempts=self._ctx.retry.max_attempts,
            )
            repo.release_reservations(session)
        if requeued or failed:
            log.warning(
                "an earlier process left %d job(s) running: %d re-queued, %d given up",
                len(requeued) + len(failed),
                len(requeued),
                len(failed),
            )
        with self._ctx.db.session() as session:
            tickets = [JobTicket.of(job) for job in repo.queued_jobs(session)]
            avoid = {t.id: repo.failed_backends(session, t.id) for t in tickets}
        for ticket in tickets:
            self.submit(ticket, avoid=avoid[ticket.id])
        return len(tickets)

    def submit(self, ticket: JobTicket, *, avoid: frozenset[str] = frozenset()) -> None:
        """Call only after the job's row is committed."""
        route = self._ctx.table.route(ticket.style)
        waited = max(0.0, (utcnow() - ticket.created_at).total_seconds())
        job = QueuedJob(
            ticket.id,
            ticket.owner_id,
            ticket.checkpoint,
            capable_backends(route, self._ctx.table, ticket.needs),
            queued_at=time.monotonic() - waited,
            not_before=time.monotonic() + ticket.wait_seconds(),
            avoid=avoid,
        )
        with self._lock:
            self._done.setdefault(ticket.id, threading.Event())
            self._queued[ticket.id] = job
            self._lock.notify_all()

    def submit_many(self, tickets: list[JobTicket]) -> None:
        for ticket in tickets:
            self.submit(ticket)

    def forget(self, job_id: str) -> None:
        """A cancelled job: drop it if it has not started (the row already says cancelled)."""
        with self._lock:
            dropped = self._queued.pop(job_id, None)
        if dropped is not None:
            self._finished(job_id)

    def wait(self, job_id: str, timeout: float) -> bool:
        """True once the job ended here (or is not this queue's); False on timeout."""
        with self._lock:
            event = self._done.get(job_id)
        return True if event is None else event.wait(timeout)

    async def wait_async(self, job_id: str, timeout: float) -> bool:
        """Like ``wait`` without holding a thread: the worker wakes this coroutine."""
        loop = asyncio.get_running_loop()
        finished: asyncio.Future[None] = loop.create_future()

        def resolve() -> None:
            if not finished.done():
                finished.set_result(None)

        def wake() -> None:
            loop.call_soon_threadsafe(resolve)

        with self._lock:
            if job_id not in self._done:
                return True
            self._callbacks.setdefault(job_id, []).append(wake)
        try:
            await asyncio.wait_for(finished, timeout)
        except TimeoutError:
            return False
        return True

    def stop(self, timeout: float = 30.0) -> bool:
        """Start no more jobs and let running ones finish; True when all of them ended.

        A job still running after ``timeout`` stays ``running`` in the database and is
        re-queued at the next start, instead of being failed here.
        """
        self._stopping.set()
        self._wake()
        if self._dispatcher is not None:
            self._dispatcher.join(timeout)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self._lock:
                if not self._running:
                    break
            time.sleep(0.05)
        self._executor.shutdown(wait=False, cancel_futures=True)
        with self._lock:
            return not self._running

    # -- dispatching ---------------------------------------------------------------------------

    def _wake(self) -> None:
        with self._lock:
            self._lock.notify_all()

    def _plan(
        self,
        queued: list[QueuedJob],
        free: list[FreeBackend],
        busy: list[tuple[str, str | None]],
        now: float,
    ) -> list[tuple[QueuedJob, str]]:
        healthy = {s.name for s in self._ctx.pool.statuses() if s.healthy}
        return plan(
            queued,
            free,
            busy,
            now=now,
            fairness=self._fairness,
            policy=self._policy,
            healthy=healthy,
        )

    def _loop(self) -> None:
        while not self._stopping.is_set():
            with self._lock:
                queued = list(self._queued.values())
            pause = 1.0
            if queued:
                free, busy = split_backends(self._ctx.pool.statuses(), queued)
                now = time.monotonic()
                for job, backend in self._planner(queued, free, busy, now):
                    self._launch(job, backend)
                waiting = [j.not_before - now for j in queued if j.not_before > now]
                pause = min([pause, *waiting]) if waiting else pause
            with self._lock:
                if not self._stopping.is_set():
                    self._lock.wait(max(0.01, pause))

    def _launch(self, job: QueuedJob, backend: str) -> None:
        if not self._ctx.pool.try_acquire(backend):
            self._fairness.running[job.owner_id] -= 1
            return
        self._ctx.pool.note_upcoming(backend, job.checkpoint)
        with self._lock:
            if self._queued.pop(job.id, None) is None:  # cancelled meanwhile
                self._ctx.pool.release(backend)
                self._fairness.running[job.owner_id] -= 1
                return
            self._running.add(job.id)
        self._executor.submit(self._execute, job, backend)

    def _execute(self, job: QueuedJob, backend: str) -> None:
        outcome = run_on_slot(self._ctx, job.id, backend)
        again = outcome.state == "retry" and not self._stopping.is_set()
        with self._lock:
            self._running.discard(job.id)
            self._fairness.running[job.owner_id] -= 1
            if again:  # back in line after its backoff, steering clear of this backend
                self._queued[job.id] = replace(
                    job,
                    not_before=time.monotonic() + outcome.retry_after,
                    avoid=job.avoid | {backend},
                )
                self._lock.notify_all()
        if not again:
            self._finished(job.id)

    def _finished(self, job_id: str) -> None:
        with self._lock:
            event = self._done.pop(job_id, None)
            callbacks = self._callbacks.pop(job_id, [])
        if event is not None:
            event.set()
        for wake in callbacks:
            try:
                wake()
            except RuntimeError:  # the waiting request's event loop is gone
                log.debug("no one is waiting for job %s any more", job_id)
