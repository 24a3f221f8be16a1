"""Run one attempt of a job on one backend: prepare -> door -> claim -> generate -> verify ->
store -> finish.

Idempotent and safe against overlap: the claim is a conditional update that takes a lease
(renewed while the attempt runs), and the images are stored only while this attempt still
holds it, in the same transaction that marks the job succeeded; a unique (job, position)
index makes a second copy of an image impossible even then. Files are written before the
rows that name them are committed, so a row never points at a missing file.

Pipelining (BackendPool.door): an attempt finds its checkpoint while the backend's previous
job still runs, then waits at the backend's door as a queued job (a cancel then simply
drops it); it claims the job only once it is let in, right before it sends anything.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import timedelta

from charforge.backends.base import BackendRequest, BackendResult, CheckpointInfo, ReferenceImage
from charforge.db import repositories as repo
from charforge.db.models import utcnow
from charforge.domain.consistency import verify_checkpoint_ran
from charforge.domain.params import GenerationParams
from charforge.domain.requirements import capable_backends, needs_of
from charforge.errors import (
    BackendBadResponse,
    BackendInterrupted,
    CharforgeError,
    CheckpointUnloadable,
    ContentWithheld,
)
from charforge.jobs.attempt import JobSnapshot, LeaseKeeper
from charforge.jobs.context import RetryPolicy, RunnerContext, notice_cancel
from charforge.jobs.identity import Scored, generate_scored, load_references, score_result
from charforge.jobs.storing import Stored, store_images
from charforge.observability import logs

__all__ = [
    "Outcome",
    "RetryPolicy",
    "RunnerContext",
    "notice_cancel",
    "run_attempt",
    "run_on_slot",
]

log = logging.getLogger(__name__)
# How often an attempt waiting at a backend's door looks at its job in the database (a
# cancel made by another process; in distributed mode it also keeps its reservation).
_DOOR_CHECK_SECONDS = 2.0


@dataclass(frozen=True)
class Outcome:
    state: str  # succeeded | failed | cancelled | retry | skipped (not ours to run)
    retry_after: float = 0.0
    backend: str | None = None
    error: str | None = None


@dataclass
class _Ran:
    """What happened inside the door: the claimed attempt and its result or error."""

    job: JobSnapshot
    keeper: LeaseKeeper | None
    listed: CheckpointInfo | None
    result: BackendResult | None = None
    scored: Scored | None = None  # scored (and tried again) behind the door: identity.minScore
    references: tuple[ReferenceImage, ...] = ()
    error: CharforgeError | None = None
    crash: Exception | None = None
    seconds: float = 0.0


def run_attempt(ctx: RunnerContext, job_id: str, backend: str) -> Outcome:
    """Run the job on ``backend`` if it is still queued, holding a slot of that backend."""
    token = logs.job_id.set(job_id)
    try:
        return _run_attempt(ctx, job_id, backend)
    finally:
        logs.job_id.reset(token)


def run_on_slot(
    ctx: RunnerContext, job_id: str, backend: str, *, ended: Callable[[], None] | None = None
) -> Outcome:
    """``run_attempt`` on a slot of ``backend`` the caller took, which is given back after it
    (``ended`` is called just before: the freed slot wakes schedulers, who must see the
    thread free too). Never raises: a crash fails the attempt."""
    outcome = Outcome("failed")
    try:
        outcome = run_attempt(ctx, job_id, backend)
    except Exception:  # the runner records failures itself; this is a last guard
        log.exception("worker crashed on job %s", job_id)
    finally:
        if ended is not None:
            ended()
        ctx.pool.release(backend)
    return outcome


def _run_attempt(ctx: RunnerContext, job_id: str, name: str) -> Outcome:
    with ctx.db.session() as session:
        job = repo.job_any_owner(session, job_id)
        if job is None or job.state != "queued":
            return Outcome("skipped")
        draft = JobSnapshot.of(job, 0)
    cancelled = threading.Event()  # set by a cancel made here, or a lost lease
    ctx.attempts[job_id] = cancelled
    try:
        return _attempt(ctx, draft, name, cancelled)
    finally:
        ctx.attempts.pop(job_id, None)


def _attempt(
    ctx: RunnerContext, draft: JobSnapshot, name: str, cancelled: threading.Event
) -> Outcome:
    job_id = draft.id
    ran = _on_backend(ctx, draft, name, cancelled)
    if ran is None:
        return Outcome("skipped")
    try:
        if ran.crash is not None:
            raise ran.crash
        if ran.error is not None:
            raise ran.error
        assert ran.result is not None and ran.listed is not None
        written = _check_and_store(ctx, ran, name)
    except CharforgeError as error:
        return _after_failure(ctx, ran.job, name, error, ran.seconds)
    except Exception:  # a bug must fail the job visibly, not leave it running forever
        log.exception("job %s crashed", job_id)
        internal = CharforgeError(
            "charforge hit an internal error while running this job.",
            hint="The server log has the details; please report it.",
        )
        _finish_failed(ctx, ran.job, name, internal)
        return Outcome("failed", backend=name, error=internal.code)
    finally:
        if ran.keeper is not None:
            ran.keeper.stop()
    if written is None:
        log.info("job %s was cancelled or taken over while on %s; nothing stored", job_id, name)
        return Outcome("cancelled", backend=name)
    if written.withheld:
        log.warning(
            "job %s: %d image(s) withheld by the output screening (in quarantine)",
            job_id,
            written.withheld,
        )
    if not written.shown:
        ctx.metrics.jobs_finished.labels("failed").inc()
        return Outcome("failed", backend=name, error=ContentWithheld.code)
    ctx.metrics.jobs_finished.labels("succeeded").inc()
    log.info("job %s succeeded on %s with %d image(s)", job_id, name, written.shown)
    return Outcome("succeeded", backend=name)


def _claim(ctx: RunnerContext, draft: JobSnapshot, name: str) -> JobSnapshot | None:
    now = utcnow()
    with ctx.db.session() as session:
        number = repo.claim_job(
            session, draft.id, ctx.worker, name, now, now + timedelta(seconds=ctx.lease)
        )
    if number is None:
        return None
    return replace(draft, number=number)


def _on_backend(
    ctx: RunnerContext, draft: JobSnapshot, name: str, cancelled: threading.Event
) -> _Ran | None:
    """Prepare, wait at the door, claim and generate; None when the job was not ours to run
    (cancelled or taken meanwhile). Only the generation itself happens behind the door."""
    backend = ctx.pool.backends[name]
    try:
        references = load_references(ctx, draft.identity)
        listed = backend.find_checkpoint(draft.checkpoint, style=draft.style)
        if draft.checkpoint_hash and listed.hash:
            _verify(ctx, draft, name, listed.name, listed.hash)  # a replaced file, early
    except Exception as exc:  # recorded on a claimed attempt, like any other outcome
        claimed = _claim(ctx, draft, name)
        if claimed is None:
            return None
        if isinstance(exc, CharforgeError):
            return _Ran(claimed, None, None, error=exc)
        return _Ran(claimed, None, None, crash=exc)
    with ctx.pool.door(name, give_up=_DoorWatch(ctx, draft.id, name, cancelled)) as inside:
        if not inside:
            return None  # cancelled while it waited: nothing was sent
        job = _claim(ctx, draft, name)
        if job is None:
            return None
        keeper = LeaseKeeper(ctx, job, name, cancelled)
        keeper.start()
        ran = _Ran(job, keeper, listed, references=references)
        started = time.monotonic()
        try:
            if ctx.pool.status(name).loaded is None:
                # Not probed yet: ask, so that the switch this job may cause is counted.
                with contextlib.suppress(CharforgeError):
                    ctx.pool.note_loaded(name, backend.loaded_checkpoint())
            ctx.pool.note_rendering(name, listed.name)  # A1111 switches to it first
            request = BackendRequest(
                job.style,
                listed,
                job.params,
                job.count,
                on_progress=keeper.progress,
                task_id=keeper.task_id,
                cancelled=cancelled,
                references=references if job.params.identity_strength > 0 else (),
            )
            if job.identity and job.identity.get("minScore") is not None and references:
                ran.scored = generate_scored(backend.generate, request, job.identity, references)
                ran.result = ran.scored.result
            else:
                ran.result = backend.generate(request)
        except CharforgeError as error:
            ran.error = error
        except Exception as exc:  # handled outside the door, like any other outcome
            ran.crash = exc
        ran.seconds = time.monotonic() - started
    return ran


class _DoorWatch:
    """Whether an attempt waiting at a door should give up: cancelled here (at once), or no
    longer queued for us in the database (looked at every few seconds; the look also keeps a
    distributed worker's reservation)."""

    def __init__(
        self, ctx: RunnerContext, job_id: str, backend: str, cancelled: threading.Event
    ) -> None:
        self._ctx, self._job_id, self._backend = ctx, job_id, backend
        self._cancelled = cancelled
        self._next = time.monotonic() + min(_DOOR_CHECK_SECONDS, ctx.lease / 3)

    def __call__(self) -> bool:
        if self._cancelled.is_set():
            return True
        if time.monotonic() < self._next:
            return False
        self._next = time.monotonic() + min(_DOOR_CHECK_SECONDS, self._ctx.lease / 3)
        self._ctx.pool.renew(self._backend)  # the slot it holds, shared across processes
        return not reserve(self._ctx, self._job_id, self._ctx.lease)


def _verify(
    ctx: RunnerContext,
    job: JobSnapshot,
    name: str,
    reported: str | None,
    reported_hash: str | None,
) -> None:
    verify_checkpoint_ran(
        expected=job.checkpoint,
        expected_hash=job.checkpoint_hash,
        reported=reported,
        reported_hash=reported_hash,
        backend=name,
        kind=ctx.table.backends[name].kind,
    )


def _check_and_store(ctx: RunnerContext, ran: _Ran, name: str) -> Stored | None:
    job, result, listed = ran.job, ran.result, ran.listed
    assert result is not None and listed is not None
    _verify(ctx, job, name, result.checkpoint, result.checkpoint_hash)
    ctx.pool.record_success(name, ran.seconds, listed.name)
    simulated = ctx.table.backends[name].simulated
    if result.stopped_after is not None:
        # Cancelled while it ran: the images already whole are the owner's; the job stays
        # cancelled and says how many of how many.
        kept = store_images(ctx, job, name, simulated, result, listed.hash, ran.scored)
        log.info(
            "job %s was cancelled on %s after %d of %d images; %s",
            job.id,
            name,
            result.stopped_after,
            job.count,
            "those are kept" if kept else "nothing stored (it was not this attempt's cancel)",
        )
        return None
    if len(result.images) < job.count:
        raise BackendBadResponse(
            f"Backend '{name}' returned {len(result.images)} of the {job.count} images asked "
            "for (was it interrupted?); nothing was stored.",
            retriable=True,
        )
    scored = ran.scored
    if scored is None and job.identity:  # scored here, outside the door: the backend is free
        scored = score_result(ran.references, result, job.count)
    return store_images(ctx, job, name, simulated, result, listed.hash, scored)


def _after_failure(
    ctx: RunnerContext, job: JobSnapshot, backend: str, error: CharforgeError, seconds: float
) -> Outcome:
    if isinstance(error, CheckpointUnloadable):
        ctx.pool.note_load_failed(backend, job.checkpoint)
    # A fault that says something about the backend's health, not about the request (an
    # interrupt pressed by someone says nothing about it).
    if error.retriable and not isinstance(error, BackendInterrupted):
        ctx.pool.record_failure(backend, error.message, seconds)
    tried = _tried_backends(ctx, job.id) | {backend}
    route = ctx.table.route(job.style)
    eligible = capable_backends(route, ctx.table, needs_of(job.params))
    untried = [name for name in eligible if name not in tried]
    again = job.number < ctx.retry.max_attempts and (
        error.retriable or (error.backend_specific and bool(untried))
    )
    if again:
        delay = ctx.retry.delay(job.number)
        with ctx.db.session() as session:
            requeued = repo.requeue_for_retry(
                session, job.id, job.number, ctx.worker, utcnow() + timedelta(seconds=delay)
            )
            repo.finish_attempt(session, job.id, job.number, "retried", error.code, error.message)
        if requeued:
            ctx.metrics.retries.labels(error.code).inc()
            log.warning(
                "job %s attempt %d failed on %s (%s); retrying in %.1fs",
                job.id,
                job.number,
                backend,
                error.code,
                delay,
            )
            return Outcome("retry", retry_after=delay, backend=backend, error=error.code)
        return Outcome("cancelled", backend=backend)
    log.warning("job %s failed on %s: %s (%s)", job.id, backend, error.code, error.message)
    _finish_failed(ctx, job, backend, error)
    return Outcome("failed", backend=backend, error=error.code)


def _tried_backends(ctx: RunnerContext, job_id: str) -> set[str]:
    with ctx.db.session() as session:
        return {a.backend for a in repo.attempts_of(session, job_id)}


def _finish_failed(
    ctx: RunnerContext, job: JobSnapshot, backend: str, error: CharforgeError
) -> None:
    with ctx.db.session() as session:
        repo.finish_attempt(session, job.id, job.number, "failed", error.code, error.message)
        failed = repo.finish_failed(
            session,
            job.id,
            error,
            backend=backend,
            attempt=(job.number, ctx.worker),
        )
    if failed:
        ctx.metrics.jobs_finished.labels("failed").inc()


def run_here(ctx: RunnerContext, job_id: str, *, wait: float) -> Outcome:
    """One attempt of a job in this thread, on a backend the pool picks (no dispatcher: the
    CLI's generate and batch). Returns "skipped" when the job is not queued, or is reserved
    by another worker; "retry" when it is not due yet or no backend was free in time."""
    token = logs.job_id.set(job_id)  # the wait for a backend's lines name the job too
    try:
        return _run_here(ctx, job_id, wait=wait)
    finally:
        logs.job_id.reset(token)


def _run_here(ctx: RunnerContext, job_id: str, *, wait: float) -> Outcome:
    with ctx.db.session() as session:
        job = repo.job_any_owner(session, job_id)
        if job is None or job.state != "queued":
            return Outcome("skipped")
        if job.not_before is not None and job.not_before > utcnow():
            pause = (job.not_before - utcnow()).total_seconds()
            return Outcome("retry", retry_after=pause)
        avoid = repo.failed_backends(session, job_id)
        route, checkpoint = ctx.table.route(job.art_style), job.checkpoint
        needs = needs_of(GenerationParams.from_json(job.params))
    if not reserve(ctx, job_id, ctx.lease):
        return Outcome("skipped")
    last = time.monotonic()

    def still_waiting() -> None:
        nonlocal last
        if time.monotonic() - last > ctx.lease / 3:
            reserve(ctx, job_id, ctx.lease)
            last = time.monotonic()

    try:
        with ctx.pool.lease(
            route, checkpoint, wait=wait, avoid=avoid, needs=needs, waiting=still_waiting
        ) as backend:
            return run_attempt(ctx, job_id, backend.spec.name)
    except CharforgeError as exc:  # no backend free in time: the job stays queued
        return Outcome("retry", retry_after=ctx.retry.delay(1), error=exc.code)


def reserve(ctx: RunnerContext, job_id: str, seconds: float) -> bool:
    now = utcnow()
    with ctx.db.session() as session:
        return repo.reserve_job(session, job_id, ctx.worker, now, now + timedelta(seconds=seconds))


def run_to_end(ctx: RunnerContext, job_id: str, *, wait: float) -> str:
    """Attempt a job until it is final (retries included); returns the final state. Between
    attempts the job stays reserved, so a worker dying during a backoff loses nothing."""
    while True:
        outcome = run_here(ctx, job_id, wait=wait)
        if outcome.state != "retry" or not reserve(ctx, job_id, outcome.retry_after + ctx.lease):
            break
        time.sleep(outcome.retry_after)
    with ctx.db.session() as session:
        job = repo.job_any_owner(session, job_id)
        return job.state if job else "missing"
