"""Distributed mode's scheduler: each ``charforge worker`` plans like embedded mode's
dispatcher, over the whole fleet.

A worker takes a job only when it can run it now: a free slot (counted across every worker
in Redis) on a healthy backend able to run it. Which job goes where is jobs/scheduler.py's
``plan``, the same model-aware, fair policy as embedded mode, fed with the fleet's view:

- the queued jobs are rows in the database (db/dispatch.py), read oldest first;
- the slots held, what each backend has (or is about to have) loaded and when each user was
  last served are shared in Redis (jobs/fleet_board.py); the jobs each user has running now
  are counted in the database;
- one worker at a time plans and takes (a lock held for milliseconds), taking the planned
  jobs with ``FOR UPDATE SKIP LOCKED``; it then runs them on its own threads.

The broker's messages only wake the schedulers (a job was submitted); a freed slot wakes
them through Redis; and each looks on its own every second. No job is ever held by a worker
waiting for a busy backend, so another worker's idle backend is never starved.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from datetime import UTC, datetime, timedelta

from redis.exceptions import RedisError

from charforge.db import dispatch
from charforge.db.models import utcnow
from charforge.domain.params import GenerationParams
from charforge.domain.requirements import capable_backends, needs_of
from charforge.jobs.fleet_board import CHANGED, FREED, TOOK, FleetBoard, RedisSlots
from charforge.jobs.heartbeat import live_workers
from charforge.jobs.runner import RunnerContext, run_on_slot
from charforge.jobs.scheduler import Fairness, Policy, QueuedJob, plan, split_backends

log = logging.getLogger(__name__)

# How many queued jobs one plan looks at: the oldest of each checkpoint and user (enough to
# group by checkpoint and to be fair), few enough that a plan stays a few milliseconds
# however long the queue.
WINDOW = 1000
PER_GROUP = 50
_LIVE_EVERY = 2.0  # seconds between reads of which queues live workers consume


def _epoch(moment: datetime) -> float:
    """Seconds since the epoch of a naive UTC time: one clock for every worker's plan."""
    return moment.replace(tzinfo=UTC).timestamp()


class FleetDispatcher:
    def __init__(
        self,
        ctx: RunnerContext,
        slots: RedisSlots,
        board: FleetBoard,
        *,
        queues: set[str],
        route_queue: Callable[[str], str],
        threads: int,
        policy: Policy | None = None,
        look_every: float = 1.0,
    ) -> None:
        self._ctx, self._slots, self._board = ctx, slots, board
        self._queues = queues
        # Each backend's identity, the name its slots and records have in Redis.
        self._keys = {name: spec.key for name, spec in ctx.table.backends.items()}
        self._route_queue = route_queue  # checkpoint -> the queue its jobs are sent to
        self._queues_of: dict[str, str] = {}
        self._threads = threads
        self._policy = policy or Policy()
        self._look_every = look_every
        self._executor = ThreadPoolExecutor(threads, thread_name_prefix="charforge-job")
        self._running: set[str] = set()
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        # (job id, attempts) -> the job as the planner sees it: its pool and the backends
        # it failed on change only with a new attempt.
        self._known: dict[tuple[str, int], QueuedJob] = {}
        self._live: set[str] = set()
        # The other live workers: how many jobs each can run at once, and its queues.
        self._others: dict[str, tuple[int, frozenset[str]]] = {}
        self._live_read = float("-inf")
        self._woken: set[tuple[str, str]] = set()
        self._unreadable: set[str] = set()  # logged once each, then left to other workers
        # The queue as last read, kept between looks while nothing but this worker's own
        # slots changed: a freed slot here needs a new plan, not a new read of the queue.
        self._cache: tuple[list[QueuedJob], set[str], Counter[int]] | None = None
        self._read_at = float("-inf")
        self._stale = True
        self._gone: set[str] = set()  # taken by other workers since the cache was read
        ctx.pool.on_change(self._freed)

    # -- life --------------------------------------------------------------------------------

    def start(self) -> None:
        self._stop.clear()
        subscribed = threading.Event()
        self._board.listen(self._ctx.worker, self._heard, self._stop, subscribed)
        # The first look comes after the subscription, so a wake-up another worker sends in
        # between is not lost (it would cost up to a second of an idle backend); a Redis that
        # is slow to answer delays the start by two seconds at most.
        subscribed.wait(2.0)
        self._thread = threading.Thread(target=self._loop, name="fleet-dispatcher", daemon=True)
        self._thread.start()

    def wake(self) -> None:
        """Look again now, at the queue too (a job was submitted, or another worker took
        jobs or freed a slot)."""
        self._stale = True
        self._wake.set()

    def _heard(self, news: str, job_ids: list[str]) -> None:
        """Another worker's news: jobs it took leave the cached queue; a slot it freed (or
        work it planned for this one) needs a new plan; anything else, a new read too."""
        if news == TOOK:  # nothing freed: no new plan needed, only a smaller queue
            with self._lock:
                self._gone.update(job_ids)
            return
        if news != FREED:
            self._stale = True
        self._wake.set()

    def running(self) -> int:
        with self._lock:
            return len(self._running)

    def stop(self, timeout: float = 30.0) -> bool:
        """Take no more jobs and let running ones end; True when all of them did. A job
        still running after ``timeout`` is taken back by the fleet's sweepers once this
        worker's heartbeat is gone."""
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)
        deadline = time.monotonic() + timeout
        while self.running() and time.monotonic() < deadline:
            time.sleep(0.05)
        self._executor.shutdown(wait=False, cancel_futures=True)
        return not self.running()

    def _ended(self, job_id: str) -> None:
        with self._lock:
            self._running.discard(job_id)

    def _freed(self) -> None:
        self._wake.set()
        self._board.wake_all(self._ctx.worker)

    def _loop(self) -> None:
        while not self._stop.is_set():
            self._wake.clear()
            try:
                pause = self.tick()
            except RedisError as exc:
                log.warning("scheduling paused: Redis at CHARFORGE_BROKER_URL failed (%s)", exc)
                pause = self._look_every
            except Exception:  # the database may be away a moment; look again soon
                log.exception("scheduling failed; trying again")
                pause = self._look_every
            self._wake.wait(pause)

    # -- one look ----------------------------------------------------------------------------

    def tick(self) -> float:
        """Plan and take what this worker can run now; returns how long to wait at most
        before looking again."""
        capacity = self._threads - self.running()
        if capacity <= 0 or self._stop.is_set():
            return self._look_every
        keys = self._keys
        statuses = self._ctx.pool.statuses()
        with self._board.planning() as planning:
            if not planning:
                return 0.05
            fleet = self._board.look({keys[s.name]: s.limit for s in statuses})
            view = [
                replace(
                    s,
                    in_flight=fleet.held[keys[s.name]],
                    # What it will have loaded: the last job given to it while one is there,
                    # else the last it rendered (else this worker's own probe).
                    upcoming=(
                        fleet.planned.get(keys[s.name])
                        if fleet.held[keys[s.name]]
                        else fleet.loaded.get(keys[s.name])
                    ),
                )
                for s in statuses
            ]
            if not any(s.idle_slots for s in view):
                return self._look_every  # a freed slot wakes us
            queued, mine, owners = self._waiting()
            if not mine:
                return self._look_every
            full = self._queues_without_takers(fleet.held_by)
            if full:  # planned there, a free backend would wait for a busy worker
                queued = [j for j in queued if self._queue_of(j.checkpoint) not in full]
            now = time.time()
            free, busy = split_backends(view, queued)
            fairness = Fairness(last_served=fleet.served, running=owners)
            healthy = {s.name for s in view if s.healthy}
            # The whole fleet's plan: this worker takes its share of it, and leaves the rest
            # (other queues' jobs) to the workers that consume them, whom it wakes.
            assignments = plan(
                queued,
                free,
                busy,
                now=now,
                fairness=fairness,
                policy=self._policy,
                healthy=healthy,
            )
            ours = [(job, backend) for job, backend in assignments if job.id in mine]
            self._take(ours[:capacity])
            planned_ids = {(job.id, backend) for job, backend in assignments}
            self._wake_others(planned_ids - {(job.id, backend) for job, backend in ours})
        due = [j.not_before - now for j in queued if j.id in mine and j.not_before > now]
        return max(0.01, min([self._look_every, *due]))

    def _waiting(self) -> tuple[list[QueuedJob], set[str], Counter[int]]:
        """The fleet's queued jobs (those of queues some live worker consumes: a job no one
        can take must not hold a backend in the plan), which of them are this worker's to
        take, and each user's jobs running now. Read again when something else changed it,
        and at least every ``look_every`` seconds (other processes' cancels, say)."""
        if (
            self._cache is not None
            and not self._stale
            and time.monotonic() - self._read_at < self._look_every
        ):
            with self._lock:
                gone, self._gone = self._gone, set()
            if gone:
                self._drop(gone)
            return self._cache
        with self._lock:
            self._gone.clear()
        self._stale = False
        self._read_at = time.monotonic()
        self._cache = self._read_waiting()
        return self._cache

    def _taken(self, jobs: list[QueuedJob], complete: bool) -> None:
        """Jobs this worker just took leave the cached queue (and the others are told); a
        take that got fewer than it asked for (another worker was quicker) makes the next
        look read the queue."""
        if jobs:
            self._board.wake_all(self._ctx.worker, TOOK, [job.id for job in jobs])
        if self._cache is not None:
            for job in jobs:
                self._cache[2][job.owner_id] += 1
            self._drop({job.id for job in jobs})
        if not complete:
            self._stale = True

    def _drop(self, gone: set[str]) -> None:
        if self._cache is not None:
            queued, mine, owners = self._cache
            self._cache = ([j for j in queued if j.id not in gone], mine - gone, owners)

    def _read_waiting(self) -> tuple[list[QueuedJob], set[str], Counter[int]]:
        now = utcnow()
        served = self._live_queues() | self._queues
        with self._ctx.db.session() as session:
            rows = [
                (w, queue)
                for w in dispatch.waiting_jobs(session, now, WINDOW, PER_GROUP)
                if (queue := self._queue_of(w.checkpoint)) in served
            ]
            new = [w for w, _ in rows if (w.id, w.attempts) not in self._known]
            params = dispatch.params_of(session, [w.id for w in new])
            failed = dispatch.failed_backends_of(session, [w.id for w in new if w.attempts])
            owners = dispatch.busy_owners(session, now)
        known: dict[tuple[str, int], QueuedJob] = {}
        for w, _ in rows:
            job = self._known.get((w.id, w.attempts))
            if job is None:
                if w.id not in params:
                    continue  # deleted since the first read
                try:
                    needs = needs_of(GenerationParams.from_json(params[w.id]))
                except (TypeError, ValueError) as exc:  # written by a newer server, say
                    if w.id not in self._unreadable:
                        self._unreadable.add(w.id)
                        log.error("job %s: its parameters cannot be read here (%s)", w.id, exc)
                    continue
                route = self._ctx.table.route(w.style)
                job = QueuedJob(
                    w.id,
                    w.owner_id,
                    w.checkpoint,
                    capable_backends(route, self._ctx.table, needs),
                    queued_at=_epoch(w.created_at),
                    avoid=failed.get(w.id, frozenset()),
                )
            # The backoff of a retry can change without a new attempt (a re-queue).
            due = _epoch(w.not_before) if w.not_before is not None else 0.0
            known[(w.id, w.attempts)] = (
                job if job.not_before == due else replace(job, not_before=due)
            )
        self._known = known  # forget the ones gone from the queue
        mine = {w.id for w, queue in rows if queue in self._queues}
        return list(known.values()), mine, owners

    def _queue_of(self, checkpoint: str) -> str:
        queue = self._queues_of.get(checkpoint)
        if queue is None:
            queue = self._queues_of[checkpoint] = self._route_queue(checkpoint)
        return queue

    def _live_queues(self) -> set[str]:
        """The queues live workers consume (their heartbeats), read every few seconds."""
        if time.monotonic() - self._live_read > _LIVE_EVERY:
            workers = live_workers(self._board.url)
            self._live = {q for w in workers for q in w.queues}
            self._others = {
                w.worker: (w.concurrency, frozenset(w.queues))
                for w in workers
                if w.worker != self._ctx.worker
            }
            self._live_read = time.monotonic()
        return self._live

    def _queues_without_takers(self, held_by: Counter[str]) -> set[str]:
        """Other workers' queues whose every worker is running all the jobs it can (its
        slots held): a backend the plan gave to their jobs would stay idle until one of
        them ends, while this worker's jobs could use it now."""
        self._live_queues()
        able: set[str] = set(self._queues)
        waiting: set[str] = set()
        for worker, (threads, queues) in self._others.items():
            if threads <= 0 or held_by[worker] < threads:  # 0: not said
                able |= queues
            else:
                waiting |= queues
        return waiting - able

    def _wake_others(self, theirs: set[tuple[str, str]]) -> None:
        """The plan gave free backends to other workers' jobs: tell them, once per change
        (two workers that both cannot take what the plan says must not wake each other in
        a loop)."""
        if theirs and theirs != self._woken:
            self._board.wake_all(self._ctx.worker)
        self._woken = theirs

    def _take(self, assignments: list[tuple[QueuedJob, str]]) -> None:
        pool = self._ctx.pool
        held: list[tuple[QueuedJob, str]] = []
        started: set[str] = set()
        try:
            for job, backend in assignments:
                if pool.try_acquire(backend):
                    held.append((job, backend))
            if not held:
                return
            now = utcnow()
            with self._ctx.db.session() as session:
                taken = dispatch.take(
                    session,
                    [job.id for job, _ in held],
                    self._ctx.worker,
                    now,
                    now + timedelta(seconds=self._ctx.lease),
                )
            self._taken([job for job, _ in held if job.id in taken], len(taken) == len(held))
            planned: dict[str, str] = {}
            served: dict[int, float] = {}
            for job, backend in held:
                if job.id not in taken or self._stop.is_set():
                    continue  # another worker took it meanwhile, or this one is stopping
                with self._lock:
                    self._running.add(job.id)
                self._executor.submit(self._execute, job, backend)
                started.add(job.id)
                pool.note_upcoming(backend, job.checkpoint)
                planned[self._keys[backend]] = job.checkpoint
                served[job.owner_id] = time.time()
                log.info("job %s taken for backend %s", job.id, backend)
            self._board.note(planned, served)
        finally:
            # Whatever failed on the way (the database, Redis, a stopped executor), a slot
            # taken for a job that does not run here is given back at once.
            for job, backend in held:
                if job.id not in started:
                    with self._lock:
                        self._running.discard(job.id)
                    pool.release(backend)

    def _execute(self, job: QueuedJob, backend: str) -> None:
        # The freed slot wakes every scheduler of the fleet, this one included.
        outcome = run_on_slot(self._ctx, job.id, backend, ended=lambda: self._ended(job.id))
        if outcome.state != "succeeded":  # back in the queue, or not run: read it again
            self._stale = True
            self._wake.set()
            self._board.wake_all(self._ctx.worker, CHANGED)
        if outcome.state in ("failed", "skipped") and outcome.backend is None:
            # Not run (a crash before its claim, or not ours after all): a reservation it
            # still holds would hide it from every plan until its lease lapsed.
            try:
                with self._ctx.db.session() as session:
                    dispatch.release_reservation(session, job.id, self._ctx.worker)
            except Exception:  # the lease lapses on its own
                log.exception("could not give back job %s", job.id)
        if outcome.state == "retry":
            log.info("job %s back in the queue for %.1fs (backoff)", job.id, outcome.retry_after)
