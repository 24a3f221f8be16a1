"""Run one job: claim -> pick backend -> generate -> verify checkpoint -> store -> finish.

Idempotent: the claim is a conditional update, so a job runs at most once at a time, and a
job that is no longer ``queued`` is left alone. Files are written before the rows that name
them are committed, so a row never points at a missing file.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from charforge import __version__
from charforge.backends.base import BackendRequest, BackendResult
from charforge.backends.pool import BackendPool
from charforge.db import repositories as repo
from charforge.db.engine import Database
from charforge.db.models import Image, Job, new_id, utcnow
from charforge.domain.checkpoints import file_stem, same_checkpoint
from charforge.domain.consistency import verify_checkpoint_ran
from charforge.domain.infotext import build_infotext
from charforge.domain.params import GenerationParams
from charforge.domain.routes import RouteTable
from charforge.errors import BackendBadResponse, CharforgeError
from charforge.storage.files import ImageStore
from charforge.storage.png import NotAnImage, embed_infotext

log = logging.getLogger(__name__)


@dataclass
class RunnerContext:
    db: Database
    pool: BackendPool
    table: RouteTable
    store: ImageStore
    lease_wait: float  # how long a job may wait for a free backend of its route


def run_job(ctx: RunnerContext, job_id: str) -> str:
    """Run the job if it is still queued; returns the state it ends in."""
    with ctx.db.session() as session:
        if not repo.claim_job(session, job_id, utcnow()):
            job = repo.job_any_owner(session, job_id)
            return job.state if job else "missing"
        job = repo.job_any_owner(session, job_id)
        assert job is not None
        snapshot = _Snapshot.of(job)

    try:
        written = _generate_and_store(ctx, snapshot)
    except _FailedOn as failure:
        error = failure.error
        log.warning(
            "job %s failed on %s: %s (%s)", job_id, failure.backend, error.code, error.message
        )
        _finish_failed(ctx, job_id, error, failure.backend)
        return "failed"
    except Exception:  # a bug must fail the job visibly, not leave it running forever
        log.exception("job %s crashed", job_id)
        _finish_failed(
            ctx,
            job_id,
            CharforgeError(
                "charforge hit an internal error while running this job.",
                hint="The server log has the details; please report it.",
            ),
        )
        return "failed"
    log.info("job %s succeeded with %d image(s)", job_id, written)
    return "succeeded"


@dataclass(frozen=True)
class _Snapshot:
    id: str
    owner_id: int
    character_id: str
    style: str
    checkpoint: str
    checkpoint_hash: str | None
    params: GenerationParams

    @classmethod
    def of(cls, job: Job) -> _Snapshot:
        return cls(
            job.id,
            job.owner_id,
            job.character_id,
            job.art_style,
            job.checkpoint,
            job.checkpoint_hash,
            GenerationParams.from_json(job.params),
        )


class _FailedOn(Exception):
    """A job error together with the backend it happened on (recorded on the job)."""

    def __init__(self, error: CharforgeError, backend: str | None) -> None:
        super().__init__(error.message)
        self.error = error
        self.backend = backend


def _generate_and_store(ctx: RunnerContext, job: _Snapshot) -> int:
    def check(backend: str, reported: str | None, reported_hash: str | None) -> None:
        verify_checkpoint_ran(
            expected=job.checkpoint,
            expected_hash=job.checkpoint_hash,
            reported=reported,
            reported_hash=reported_hash,
            backend=backend,
        )

    name: str | None = None  # no backend yet while waiting for a free one
    try:
        with ctx.pool.lease(ctx.table.route(job.style), wait=ctx.lease_wait) as backend:
            name = backend.spec.name
            listed = backend.find_checkpoint(job.checkpoint, style=job.style)
            if job.checkpoint_hash and listed.hash:
                check(name, listed.name, listed.hash)  # a replaced file, before GPU time is spent
            result = backend.generate(BackendRequest(job.style, listed, job.params))
        check(name, result.checkpoint, result.checkpoint_hash)
        return _store(ctx, job, name, backend.spec.simulated, result, listed.hash)
    except CharforgeError as exc:
        raise _FailedOn(exc, name) from exc


def _store(
    ctx: RunnerContext,
    job: _Snapshot,
    backend: str,
    simulated: bool,
    result: BackendResult,
    listed_hash: str | None,
) -> int:
    p = job.params
    model_hash = result.checkpoint_hash or listed_hash
    rows: list[Image] = []
    for position, generated in enumerate(result.images):
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
            stored = repo.job_any_owner(session, job.id)
            if stored is None or stored.state != "running":
                raise _Abandoned()  # cancelled or deleted meanwhile: keep nothing
            session.add_all(rows)
            stored.state = "succeeded"
            stored.backend = backend
            stored.finished_at = utcnow()
            stored.error_code = stored.error_message = stored.error_hint = None
            stored.error_field = None
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
    except _Abandoned:
        for row in rows:
            ctx.store.delete(row.file_path)
        return 0
    except BaseException:
        for row in rows:  # the rows did not land, so their files must not linger
            ctx.store.delete(row.file_path)
        raise
    return len(rows)


class _Abandoned(Exception):
    pass


def _finish_failed(
    ctx: RunnerContext, job_id: str, error: CharforgeError, backend: str | None = None
) -> None:
    with ctx.db.session() as session:
        job = repo.job_any_owner(session, job_id)
        if job is None or job.state != "running":
            return
        job.state = "failed"
        job.backend = backend or job.backend
        job.finished_at = utcnow()
        job.error_code = error.code
        job.error_message = error.message
        job.error_hint = error.hint
        job.error_field = error.field
