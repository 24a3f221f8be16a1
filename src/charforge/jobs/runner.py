"""Run one attempt of a job on one backend: claim -> generate -> verify -> store -> finish.

Idempotent and safe against overlap: the claim is a conditional update that takes a lease
(renewed while the attempt runs), and the images are stored only while this attempt still
holds it, in the same transaction that marks the job succeeded; a unique (job, position)
index makes a second copy of an image impossible even then. Files are written before the
rows that name them are committed, so a row never points at a missing file.
"""

from __future__ import annotations

import contextlib
import logging
import random
import threading
import time
from dataclasses import dataclass
from datetime import timedelta

from sqlalchemy.exc import IntegrityError

from charforge import __version__
from charforge.backends.base import BackendRequest, BackendResult, Progress
from charforge.backends.pool import BackendPool
from charforge.db import repositories as repo
from charforge.db.engine import Database
from charforge.db.models import Image, Job, new_id, utcnow
from charforge.domain.checkpoints import file_stem, same_checkpoint
from charforge.domain.consistency import verify_checkpoint_ran
from charforge.domain.infotext import build_infotext
from charforge.domain.params import GenerationParams
from charforge.domain.requirements import capable_backends, needs_of
from charforge.domain.routes import RouteTable
from charforge.errors import BackendBadResponse, CharforgeError
from charforge.observability import logs
from charforge.observability.metrics import Metrics
from charforge.storage.files import ImageStore
from charforge.storage.png import NotAnImage, embed_infotext

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RetryPolicy:
    max_attempts: int = 3
    backoff: float = 1.0  # first pause; doubles per attempt, with jitter
    backoff_max: float = 30.0

    def delay(self, attempt: int) -> float:
        """Exponential backoff with "equal jitter": half fixed, half random, so retries of
        many jobs that failed together do not hit the pool together again."""
        ceiling = min(self.backoff_max, self.backoff * 2.0 ** max(0, attempt - 1))
        jitter: float = random.uniform(0, ceiling / 2)  # noqa: S311 - not cryptographic
        return ceiling / 2 + jitter


@dataclass
class RunnerContext:
    db: Database
    pool: BackendPool
    table: RouteTable
    store: ImageStore
    metrics: Metrics
    worker: str  # who holds the leases this process takes (host:pid)
    lease: float = 60.0
    retry: RetryPolicy = RetryPolicy()


@dataclass(frozen=True)
class Outcome:
    state: str  # succeeded | failed | cancelled | retry | skipped (not ours to run)
    retry_after: float = 0.0
    backend: str | None = None
    error: str | None = None


def run_attempt(ctx: RunnerContext, job_id: str, backend: str) -> Outcome:
    """Run the job on ``backend`` if it is still queued, holding a slot of that backend."""
    token = logs.job_id.set(job_id)
    try:
        return _run_attempt(ctx, job_id, backend)
    finally:
        logs.job_id.reset(token)


def _run_attempt(ctx: RunnerContext, job_id: str, backend: str) -> Outcome:
    now = utcnow()
    with ctx.db.session() as session:
        number = repo.claim_job(
            session, job_id, ctx.worker, backend, now, now + timedelta(seconds=ctx.lease)
        )
        if number is None:
            return Outcome("skipped")
        job = repo.job_any_owner(session, job_id)
        assert job is not None
        snapshot = _Snapshot.of(job, number)

    keeper = _LeaseKeeper(ctx, snapshot, backend)
    keeper.start()
    started = time.monotonic()
    try:
        written = _generate_and_store(ctx, snapshot, backend, keeper)
    except CharforgeError as error:
        return _after_failure(ctx, snapshot, backend, error, time.monotonic() - started)
    except Exception:  # a bug must fail the job visibly, not leave it running forever
        log.exception("job %s crashed", job_id)
        internal = CharforgeError(
            "charforge hit an internal error while running this job.",
            hint="The server log has the details; please report it.",
        )
        _finish_failed(ctx, snapshot, backend, internal)
        return Outcome("failed", backend=backend, error=internal.code)
    finally:
        keeper.stop()
    if written is None:
        log.info("job %s was cancelled or taken over while on %s; nothing stored", job_id, backend)
        return Outcome("cancelled", backend=backend)
    ctx.metrics.jobs_finished.labels("succeeded").inc()
    log.info("job %s succeeded on %s with %d image(s)", job_id, backend, written)
    return Outcome("succeeded", backend=backend)


def _after_failure(
    ctx: RunnerContext, job: _Snapshot, backend: str, error: CharforgeError, seconds: float
) -> Outcome:
    if error.retriable:  # says something about the backend's health, not about the request
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


class _LeaseKeeper:
    """Renews the attempt's lease (and its backend slot) while it runs; when the lease is gone
    (the job was cancelled, or a sweeper gave it away) it interrupts the backend's work."""

    def __init__(self, ctx: RunnerContext, job: _Snapshot, backend: str) -> None:
        self._ctx, self._job, self._backend = ctx, job, backend
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name=f"lease-{job.id[:8]}", daemon=True)
        self.lost = False
        self._last_progress = 0.0

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def _loop(self) -> None:
        while not self._stop.wait(self._ctx.lease / 3):
            try:
                self.renew()
            except Exception:  # a database hiccup: the next renewal may work
                log.exception("could not renew the lease of job %s", self._job.id)

    def renew(self) -> None:
        until = utcnow() + timedelta(seconds=self._ctx.lease)
        with self._ctx.db.session() as session:
            held = repo.renew_lease(
                session, self._job.id, self._job.number, self._ctx.worker, until
            )
        self._ctx.pool.renew(self._backend)
        if not held and not self.lost:
            self.lost = True
            log.info(
                "job %s lost its lease (cancelled?); interrupting %s", self._job.id, self._backend
            )
            self._ctx.pool.backends[self._backend].interrupt()

    def progress(self, update: Progress) -> None:
        with self._ctx.db.session() as session:
            held = repo.set_progress(
                session,
                self._job.id,
                self._job.number,
                self._ctx.worker,
                update.fraction,
                update.step,
                update.steps,
            )
        if not held and not self.lost:
            self.renew()  # find out why, and interrupt if the job is no longer ours


@dataclass(frozen=True)
class _Snapshot:
    id: str
    number: int  # this attempt
    owner_id: int
    character_id: str
    style: str
    checkpoint: str
    checkpoint_hash: str | None
    params: GenerationParams
    count: int

    @classmethod
    def of(cls, job: Job, number: int) -> _Snapshot:
        return cls(
            job.id,
            number,
            job.owner_id,
            job.character_id,
            job.art_style,
            job.checkpoint,
            job.checkpoint_hash,
            GenerationParams.from_json(job.params),
            job.count or 1,
        )


def _generate_and_store(
    ctx: RunnerContext, job: _Snapshot, name: str, keeper: _LeaseKeeper
) -> int | None:
    def check(reported: str | None, reported_hash: str | None) -> None:
        verify_checkpoint_ran(
            expected=job.checkpoint,
            expected_hash=job.checkpoint_hash,
            reported=reported,
            reported_hash=reported_hash,
            backend=name,
            kind=ctx.table.backends[name].kind,
        )

    backend = ctx.pool.backends[name]
    listed = backend.find_checkpoint(job.checkpoint, style=job.style)
    if job.checkpoint_hash and listed.hash:
        check(listed.name, listed.hash)  # a replaced file, before GPU time is spent
    if ctx.pool.status(name).loaded is None:
        # Not probed yet: ask, so that the switch this job may cause is seen and counted.
        with contextlib.suppress(CharforgeError):
            ctx.pool.note_loaded(name, backend.loaded_checkpoint())
    started = time.monotonic()
    ctx.pool.note_loaded(name, listed.name)  # A1111 switches to it before rendering
    result = backend.generate(
        BackendRequest(job.style, listed, job.params, job.count, on_progress=keeper.progress)
    )
    check(result.checkpoint, result.checkpoint_hash)
    ctx.pool.record_success(name, time.monotonic() - started, listed.name)
    if len(result.images) < job.count:
        raise BackendBadResponse(
            f"Backend '{name}' returned {len(result.images)} of the {job.count} images asked "
            "for (was it interrupted?); nothing was stored.",
            retriable=True,
        )
    return _store(ctx, job, name, backend.spec.simulated, result, listed.hash)


def _store(
    ctx: RunnerContext,
    job: _Snapshot,
    backend: str,
    simulated: bool,
    result: BackendResult,
    listed_hash: str | None,
) -> int | None:
    """The images and the job's success in one transaction, only while this attempt still
    holds the job; None when it does not (cancelled, or re-queued after a lapsed lease)."""
    p = job.params
    model_hash = result.checkpoint_hash or listed_hash
    rows: list[Image] = []
    for position, generated in enumerate(result.images[: job.count]):
        infotext = build_infotext(
            prompt=p.prompt,
            negative_prompt=p.negative_prompt,
            steps=p.steps,
            sampler=p.sampler,
            scheduler=p.scheduler,
            cfg_scale=p.cfg_scale,
            seed=generated.seed,
            width=p.width,
            height=p.height,
            model=file_stem(job.checkpoint),
            model_hash=model_hash,
            hires=p.hires,
            hires_scale=p.hires_scale,
            hires_upscaler=p.hires_upscaler,
            denoising_strength=p.denoising_strength,
            extra={"Art style": job.style, "Version": f"charforge {__version__}"},
        )
        try:
            decoded = embed_infotext(generated.data, infotext)
        except NotAnImage as exc:
            raise BackendBadResponse(
                f"Backend '{backend}' sent image {position + 1} that is not a readable "
                f"image ({exc}); nothing was stored.",
                hint="The WebUI's console may show an encoding error.",
            ) from exc
        image_id = new_id()
        relative = ctx.store.relative_path(job.owner_id, job.character_id, image_id)
        ctx.store.save(relative, decoded.png)
        rows.append(
            Image(
                id=image_id,
                owner_id=job.owner_id,
                character_id=job.character_id,
                job_id=job.id,
                position=position,
                file_path=relative,
                width=decoded.width,  # the real size: with hires, info still says first pass
                height=decoded.height,
                seed=generated.seed,
                art_style=job.style,
                checkpoint=job.checkpoint,
                checkpoint_hash=model_hash,
                backend=backend,
                prompt=p.prompt,
                negative_prompt=p.negative_prompt,
                params=p.to_json(),
                infotext=infotext,
                simulated=simulated,
            )
        )
    try:
        with ctx.db.session() as session:
            if not repo.finish_succeeded(session, job.id, job.number, ctx.worker, backend):
                raise _Abandoned()  # cancelled, deleted or taken over meanwhile: keep nothing
            session.add_all(rows)
            session.flush()  # the unique (job, position) index refuses a second copy here
            repo.finish_attempt(session, job.id, job.number, "succeeded")
            character = repo.character(session, job.owner_id, job.character_id)
            if character is not None:
                if character.model is None:  # an older character's requested model worked
                    character.model = job.checkpoint
                # Remembered, so later drift is caught; only for the model this job ran (the
                # owner may have changed the character's model while it was running).
                if (
                    model_hash
                    and not character.model_hash
                    and same_checkpoint(character.model, job.checkpoint)
                ):
                    character.model_hash = model_hash
    except (_Abandoned, IntegrityError):
        for row in rows:
            ctx.store.delete(row.file_path)
        with ctx.db.session() as session:
            repo.finish_attempt(session, job.id, job.number, "cancelled")
        return None
    except BaseException:
        for row in rows:  # the rows did not land, so their files must not linger
            ctx.store.delete(row.file_path)
        raise
    return len(rows)


class _Abandoned(Exception):
    pass


def _finish_failed(ctx: RunnerContext, job: _Snapshot, backend: str, error: CharforgeError) -> None:
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
    CLI and Celery workers). Returns "skipped" when the job is not queued, or is reserved
    by another worker; "retry" when it is not due yet or no backend was free in time."""
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
