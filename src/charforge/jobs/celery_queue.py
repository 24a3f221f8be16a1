"""Distributed mode: servers enqueue job ids through Celery (Redis broker); `charforge worker`
processes run them.

- One queue per route checkpoint (``charforge.ckpt.<name>``) plus ``charforge.other`` for a
  character's own model, so a worker started with ``--checkpoints`` keeps its model hot.
- Acks late and prefetch 1: a worker killed mid-job leaves its message to be delivered again,
  and never hoards messages another worker could run.
- The job row is the truth and the message only wakes a worker: a sweeper in every process
  re-queues jobs whose lease lapsed (a dead worker) and re-sends queued jobs whose message was
  lost; a duplicate message is harmless because claiming a job is a conditional update.
- Requests in flight per backend are limited across all workers by slots in Redis.
"""

from __future__ import annotations

import asyncio
import logging
import re
import threading
from collections.abc import Callable, Iterable
from datetime import timedelta
from typing import Any

from celery import Celery

from charforge.config import Settings
from charforge.db import dispatch, recovery
from charforge.db import repositories as repo
from charforge.db.models import utcnow
from charforge.domain.checkpoints import model_name
from charforge.domain.routes import RouteTable
from charforge.jobs.fleet_board import FleetBoard, RedisSlots
from charforge.jobs.fleet_dispatcher import FleetDispatcher
from charforge.jobs.heartbeat import Heartbeat, LiveWorker, known_workers, live_workers
from charforge.jobs.runner import RunnerContext
from charforge.jobs.tickets import JobTicket

log = logging.getLogger(__name__)

TASK_NAME = "charforge.run_job"
# A request never waits long on an unreachable broker: its job is committed and the sweeper
# sends the message later (kombu's default would retry for seconds more).
_PUBLISH_RETRY = {"max_retries": 1, "interval_start": 0, "interval_step": 0.5, "interval_max": 0.5}
OTHER_QUEUE = "charforge.other"
FINAL_STATES = ("succeeded", "failed", "cancelled")


def queue_for(checkpoint: str) -> str:
    slug = re.sub(r"[^a-z0-9_-]+", "-", model_name(checkpoint).lower()).strip("-") or "unnamed"
    return f"charforge.ckpt.{slug}"


def route_queue(table: RouteTable, checkpoint: str) -> str:
    """A route's checkpoint has its own queue; any other model goes to the shared one."""
    routed = {model_name(r.checkpoint) for r in table.routes.values()}
    return queue_for(checkpoint) if model_name(checkpoint) in routed else OTHER_QUEUE


def worker_queues(table: RouteTable, checkpoints: Iterable[str] | None) -> list[str]:
    """The queues a worker consumes: the named checkpoints', or all of them plus the shared
    one."""
    if checkpoints:
        return sorted({queue_for(c) for c in checkpoints})
    return [*sorted({queue_for(r.checkpoint) for r in table.routes.values()}), OTHER_QUEUE]


def make_celery(settings: Settings) -> Celery:
    app = Celery("charforge", broker=settings.broker_url, set_as_current=False)
    app.conf.update(
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        task_default_queue=OTHER_QUEUE,
        task_ignore_result=True,
        task_serializer="json",
        accept_content=["json"],
        broker_connection_retry_on_startup=True,
        worker_hijack_root_logger=False,
        # Our log handler writes to stderr; redirected into logging again it would loop.
        worker_redirect_stdouts=False,
        # A message is delivered again if unacknowledged this long; the lease sweeper usually
        # re-queues a dead worker's job much sooner.
        broker_transport_options={
            "visibility_timeout": max(3600, settings.backend_timeout * 4),
            "socket_connect_timeout": 2,
            # A broker that accepts the connection and never answers (hung, or a half-open
            # connection) would hold a publish for ever: a request must get its 202.
            "socket_timeout": 2,
        },
        broker_connection_timeout=2,
    )
    return app


class Sweeper:
    """Re-queues jobs whose lease lapsed and re-sends queued jobs whose message went missing."""

    def __init__(
        self,
        settings: Settings,
        ctx: RunnerContext,
        send: Callable[[list[JobTicket]], object],
        *,
        interval: float | None = None,
        slots: RedisSlots | None = None,
    ) -> None:
        self._settings, self._ctx, self._send = settings, ctx, send
        self._slots = slots
        # Often enough that a killed worker's jobs and slots are back within ~15 s.
        self._interval = interval or max(1.0, min(settings.job_lease / 2, 5.0))
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._silent: set[str] = set()  # holders without heartbeats, logged once each

    def start(self) -> None:
        self._stop.clear()
        self._thread = threading.Thread(target=self._loop, name="sweeper", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def _loop(self) -> None:
        while not self._stop.wait(self._interval):
            try:
                self.sweep()
            except Exception:  # the database or broker may be briefly away; try again later
                log.exception("sweep failed")

    def _dead_workers(self, session: Any) -> set[str]:
        """Workers holding jobs whose heartbeat is gone: killed, not just slow. A holder that
        never sent heartbeats (a CLI run without CHARFORGE_BROKER_URL) is left to its
        leases, which it renews while it runs."""
        from redis.exceptions import RedisError

        # Who holds work first, then who is alive: a process that starts in between (its
        # first heartbeat after the read) must not be taken for dead.
        holding = set(recovery.running_owners(session))
        url = str(self._settings.broker_url)
        try:
            live = {w.worker for w in live_workers(url)}
            known = known_workers(url, holding - live)
        except RedisError:
            return set()  # no heartbeats to read: leave it to the leases
        if self._slots is not None:
            freed = self._slots.free_dead(live)
            if freed:
                log.warning("freed %d backend slot(s) held by workers no longer alive", freed)
        silent = holding - live - known
        for holder in silent - self._silent:
            log.info(
                "%s holds jobs and sends no heartbeats (a command run without "
                "CHARFORGE_BROKER_URL?): its jobs are taken back only when their lease lapses",
                holder,
            )
        self._silent = silent
        return known

    def sweep(self) -> tuple[int, int]:
        now = utcnow()
        with self._ctx.db.session() as session:
            requeued, failed = recovery.requeue_abandoned(
                session, now, only_expired=True, max_attempts=self._ctx.retry.max_attempts
            )
            dead = self._dead_workers(session)
            if dead:
                more, gave_up = recovery.requeue_abandoned(
                    session,
                    now,
                    only_expired=False,
                    max_attempts=self._ctx.retry.max_attempts,
                    owners=dead,
                    reason="its worker stopped sending heartbeats (killed, or cut off)",
                )
                requeued += more
                failed += gave_up
                freed = dispatch.release_reservations_of(session, dead)
                log.warning(
                    "worker(s) %s stopped sending heartbeats: %d running job(s) taken back, "
                    "%d job(s) it had taken but not started freed",
                    ", ".join(sorted(dead)),
                    len(more) + len(gave_up),
                    freed,
                )
        if requeued or failed:
            log.warning(
                "%d job(s) lost their worker: %d re-queued, %d given up",
                len(requeued) + len(failed),
                len(requeued),
                len(failed),
            )
        stale_before = now - timedelta(seconds=self._settings.resend_after)
        with self._ctx.db.session() as session:
            # Re-queued jobs need a message again: their old one died with the worker.
            jobs = {j.id: j for j in repo.jobs_by_ids(session, requeued) if j.state == "queued"}
            stale = recovery.stale_queued(session, stale_before, now)
            for job in stale:
                if job.id not in jobs:
                    log.info(
                        "job %s sent again: %s",
                        job.id,
                        f"its reservation by {job.lease_owner} lapsed"
                        if job.lease_owner
                        else "its message was never sent or no worker took it",
                    )
            jobs.update((j.id, j) for j in stale)
            tickets = [JobTicket.of(j) for j in jobs.values()]
        self._send(tickets)
        return len(requeued), len(tickets)


def publish(app: Celery, ctx: RunnerContext, tickets: list[JobTicket]) -> int:
    """Send the jobs' wake-up messages, then record them sent in one commit; returns how
    many were sent. The first one the broker does not take ends the attempt: the others
    would wait as long (two seconds each on a broker that does not answer), and the sweeper
    sends every unsent job once the broker is back."""
    sent: list[str] = []
    for index, ticket in enumerate(tickets):
        try:
            app.send_task(
                TASK_NAME,
                args=[ticket.id],
                queue=route_queue(ctx.table, ticket.checkpoint),
                countdown=ticket.wait_seconds() or None,
                retry_policy=_PUBLISH_RETRY,
            )
        except Exception as exc:  # kombu's OperationalError, a refused or timed-out socket
            others = len(tickets) - index - 1
            log.warning(
                "job %s%s: the broker did not take its message (%s: %s); it stays queued and "
                "is sent when the broker at CHARFORGE_BROKER_URL answers again",
                ticket.id,
                f" and {others} more" if others else "",
                type(exc).__name__,
                exc,
            )
            break
        sent.append(ticket.id)
    if sent:
        with ctx.db.session() as session:
            recovery.mark_enqueued(session, sent, utcnow())
    return len(sent)


class CeleryJobQueue:
    """The server's side: send job ids to the checkpoint's queue, follow jobs in the database."""

    def __init__(self, settings: Settings, ctx: RunnerContext) -> None:
        self._settings, self._ctx = settings, ctx
        self._app = make_celery(settings)
        self._sweeper = Sweeper(settings, ctx, self.submit_many)

    def start(self) -> None:
        self._sweeper.start()

    def recover(self) -> int:
        # Other servers and workers may be alive: only lapsed leases are taken back (sweeper).
        moved, resent = self._sweeper.sweep()
        return moved + resent

    def submit(self, ticket: JobTicket) -> None:
        self.submit_many([ticket])

    def submit_many(self, tickets: list[JobTicket]) -> None:
        """The job rows are committed already (the outbox): when the broker cannot take
        the messages now, the jobs stay queued and unsent, and the sweeper sends them once
        the broker answers; the client has their ids either way."""
        publish(self._app, self._ctx, tickets)

    def forget(self, job_id: str) -> None:
        """Nothing to do: a worker that gets the message finds the job cancelled and skips."""

    async def wait_async(self, job_id: str, timeout: float) -> bool:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            state = await asyncio.to_thread(self._state, job_id)
            if state is None or state in FINAL_STATES:
                return True
            remaining = deadline - loop.time()
            if remaining <= 0:
                return False
            await asyncio.sleep(min(0.2, remaining))

    def _state(self, job_id: str) -> str | None:
        with self._ctx.db.session() as session:
            job = repo.job_any_owner(session, job_id)
            return job.state if job else None

    def stop(self, timeout: float = 30.0) -> bool:
        self._sweeper.stop()
        return True


def run_worker(
    settings: Settings,
    ctx: RunnerContext,
    *,
    checkpoints: list[str] | None,
    concurrency: int,
    slots: RedisSlots,
) -> None:
    """``charforge worker``: schedule and run the jobs of its queues until stopped. The
    broker's messages only wake its scheduler (jobs/fleet_dispatcher.py): jobs are taken
    from the database when a backend can run them, never held while one is busy."""
    app = make_celery(settings)
    queues = worker_queues(ctx.table, checkpoints)
    board = FleetBoard(str(settings.broker_url))
    dispatcher = FleetDispatcher(
        ctx,
        slots,
        board,
        queues=set(queues),
        route_queue=lambda checkpoint: route_queue(ctx.table, checkpoint),
        threads=concurrency,
    )

    def resend(tickets: list[JobTicket]) -> None:
        publish(app, ctx, tickets)

    @app.task(name=TASK_NAME)  # type: ignore[untyped-decorator]
    def run_job_task(job_id: str) -> str:
        # A wake-up: the job is a row in the database, taken when a backend can run it.
        dispatcher.wake()
        return job_id

    # A line per message received and per wake-up done says nothing about a job's fate (the
    # dispatcher logs each job it takes, naming it); failures are still logged.
    for noisy in ("celery.worker.strategy", "celery.app.trace"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    sweeper = Sweeper(settings, ctx, resend, slots=slots)
    ctx.pool.start_monitor()
    sweeper.start()
    log.info("worker %s consuming %s", ctx.worker, ", ".join(queues))
    # Servers read it: a route whose queue no live worker consumes is not ready (/readyz).
    heartbeat = Heartbeat(
        str(settings.broker_url), ctx.worker, queues, concurrency, metrics=ctx.metrics.render
    )
    heartbeat.start()
    dispatcher.start()
    try:
        app.worker_main(
            [
                "worker",
                "--pool=threads",
                "--concurrency=1",  # wake-ups only: the jobs run on the dispatcher's threads
                f"--queues={','.join(queues)}",
                f"--hostname=charforge-{ctx.worker}@%h",
                f"--loglevel={settings.log_level}",
                "--without-gossip",
                "--without-mingle",
            ]
        )
    finally:
        if not dispatcher.stop(timeout=30.0):
            log.warning(
                "worker %s stopped with %d job(s) still running; the fleet takes them back",
                ctx.worker,
                dispatcher.running(),
            )
        heartbeat.stop()
        sweeper.stop()
        board.close()
        ctx.pool.close()
        ctx.db.dispose()


def unserved_queues(table: RouteTable, workers: list[LiveWorker]) -> dict[str, list[str]]:
    """Each queue a server sends to that no live worker consumes, with the routes behind it
    (``charforge.other``: characters with a model of their own)."""
    consumed = {q for w in workers for q in w.queues}
    wanted: dict[str, list[str]] = {}
    for style, route in sorted(table.routes.items()):
        wanted.setdefault(queue_for(route.checkpoint), []).append(style)
    wanted.setdefault(OTHER_QUEUE, [])
    return {queue: styles for queue, styles in wanted.items() if queue not in consumed}
