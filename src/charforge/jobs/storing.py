"""Storing a successful attempt: the files first, then the rows and the job's success in one
transaction, only while the attempt still holds the job."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from sqlalchemy.exc import IntegrityError

from charforge import __version__
from charforge.backends.base import BackendResult
from charforge.db import repositories as repo
from charforge.db.models import Image, new_id
from charforge.domain.checkpoints import file_stem, same_checkpoint
from charforge.domain.infotext import build_infotext
from charforge.domain.params import GenerationParams
from charforge.errors import BackendBadResponse, ContentWithheld
from charforge.jobs.attempt import JobSnapshot
from charforge.jobs.context import RunnerContext
from charforge.jobs.identity import Scored, image_consistency
from charforge.safety.screening import Screening, preview_of
from charforge.storage.png import DecodedImage, LargerThanAsked, NotAnImage, embed_infotext


def store_images(
    ctx: RunnerContext,
    job: JobSnapshot,
    backend: str,
    simulated: bool,
    result: BackendResult,
    listed_hash: str | None,
    scored: Scored | None = None,
) -> Stored | None:
    """The images and the job's success in one transaction, only while this attempt still
    holds the job; None when it does not (cancelled, or re-queued after a lapsed lease)."""
    # The names that ran, as the backend spells them (A1111's canonical ones).
    p = replace(
        job.params,
        sampler=result.sampler or job.params.sampler,
        scheduler=result.scheduler or job.params.scheduler,
    )
    model_hash = result.checkpoint_hash or listed_hash
    plan = job.identity
    identity = _identity_of(job, result)
    scale = p.hires_scale if p.hires else 1.0
    asked = (int(p.width * scale), int(p.height * scale))  # what the backend was told to make
    # Screened unless the job may show NSFW content (a user with that permission asked).
    screening = None if p.nsfw else ctx.screening
    decoded: list[DecodedImage] = []
    infotexts: list[str] = []
    consistencies: list[dict[str, Any] | None] = []
    rows: list[Image] = []
    for position, generated in enumerate(result.images[: job.count]):
        score = scored.scores[position] if scored and position < len(scored.scores) else None
        consistency = image_consistency(score, plan or {}) if score is not None else None
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
            hires_steps=p.hires_steps,
            clip_skip=p.clip_skip,
            # The run's own fields (Lora hashes, ...) stay, as A1111's PNG Info shows them.
            extra={
                **generated.extra,
                "Art style": job.style,
                **_identity_infotext(identity, consistency, job.style_transfer),
                "Version": f"charforge {__version__}",
            },
        )
        decoded.append(_decoded(generated.data, infotext, asked, screening, backend, position, p))
        infotexts.append(infotext)
        consistencies.append(consistency)
    verdicts = (
        screening.judge([d.preview for d in decoded if d.preview is not None])
        if screening is not None
        else [None] * len(decoded)
    )
    for position, (generated, image, verdict) in enumerate(
        zip(result.images[: job.count], decoded, verdicts, strict=True)
    ):
        image_id = new_id()
        relative = ctx.store.relative_path(job.owner_id, job.character_id, image_id)
        ctx.store.save(relative, image.png)
        rows.append(
            Image(
                id=image_id,
                owner_id=job.owner_id,
                character_id=job.character_id,
                job_id=job.id,
                position=position,
                file_path=relative,
                width=image.width,  # the real size: with hires, info still says first pass
                height=image.height,
                seed=generated.seed,
                art_style=job.style,
                checkpoint=job.checkpoint,
                checkpoint_hash=model_hash,
                backend=backend,
                prompt=p.prompt,
                negative_prompt=p.negative_prompt,
                params=p.to_json(),
                infotext=infotexts[position],
                simulated=simulated,
                identity=identity,
                consistency=consistencies[position],
                style_transfer=job.style_transfer,
                nsfw_score=verdict.score if verdict else None,
                withheld=bool(verdict and verdict.withheld),
            )
        )
    try:
        with ctx.db.session() as session:
            outcome = (
                {**plan, "tries": scored.tries if scored else [], "result": identity}
                if plan is not None
                else None
            )
            stored = Stored(
                shown=sum(not r.withheld for r in rows), withheld=sum(r.withheld for r in rows)
            )
            outcome_of_attempt: tuple[str, str | None, str | None]
            if result.stopped_after is not None:
                # Cancelled meanwhile (by its owner, for this very attempt): keep what was made.
                held = repo.keep_after_cancel(
                    session, job.id, job.number, result.stopped_after, job.count
                )
                outcome_of_attempt = ("cancelled", None, None)
            elif stored.shown == 0 and stored.withheld:
                # Nothing to show: the job fails, its images wait in quarantine.
                withheld = _withheld_error(rows, ctx.screening.threshold)
                held = repo.finish_failed(
                    session, job.id, withheld, backend=backend, attempt=(job.number, ctx.worker)
                )
                outcome_of_attempt = (
                    "failed",
                    withheld.code,
                    withheld.message,
                )
            else:
                held = repo.finish_succeeded(
                    session,
                    job.id,
                    job.number,
                    ctx.worker,
                    backend,
                    params=p.to_json(),
                    identity=outcome,
                )
                outcome_of_attempt = ("succeeded", None, None)
            if not held:
                raise _Abandoned()  # cancelled, deleted or taken over meanwhile: keep nothing
            session.add_all(rows)
            session.flush()  # the unique (job, position) index refuses a second copy here
            repo.finish_attempt(session, job.id, job.number, *outcome_of_attempt)
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
    return stored


@dataclass(frozen=True)
class Stored:
    shown: int  # images the owner sees
    withheld: int  # images screened above the threshold, in quarantine


class _Abandoned(Exception):
    pass


def _decoded(
    data: bytes,
    infotext: str,
    asked: tuple[int, int],
    screening: Screening | None,
    backend: str,
    position: int,
    p: GenerationParams,
) -> DecodedImage:
    """The image checked against the size asked (from its header, before any decode) and
    decoded, with the classifier's preview when it is to be screened."""
    try:
        return embed_infotext(
            data, infotext, asked=asked, preview=preview_of if screening is not None else None
        )
    except LargerThanAsked as exc:
        raise BackendBadResponse(
            f"Backend '{backend}' sent image {position + 1} of {exc.size[0]}x{exc.size[1]} "
            f"where {asked[0]}x{asked[1]} was asked"
            f"{' (high-resolution pass included)' if p.hires else ''}; it was not decoded "
            "and nothing was stored.",
            hint="A backend that answers far larger images than asked is misconfigured "
            "or hostile; check what is listening on that URL.",
        ) from exc
    except NotAnImage as exc:
        raise BackendBadResponse(
            f"Backend '{backend}' sent image {position + 1} that is not a readable "
            f"image ({exc}); nothing was stored.",
            hint="The WebUI's console may show an encoding error.",
        ) from exc


def _withheld_error(rows: list[Image], threshold: float) -> ContentWithheld:
    scores = ", ".join(f"{r.nsfw_score:.2f}" for r in rows if r.nsfw_score is not None)
    what = "The image was" if len(rows) == 1 else f"All {len(rows)} images were"
    return ContentWithheld(
        f"{what} withheld: the output screening scored {scores}, above this server's NSFW "
        f"threshold of {threshold:g}. It is kept for an administrator to review.",
        hint="Change the prompt (or the character's appearance) away from explicit content. "
        "If explicit images are allowed for you, an admin can grant the nsfw permission; then "
        'send "nsfw": true.',
    )


def _identity_of(job: JobSnapshot, result: BackendResult) -> dict[str, Any] | None:
    """What the image says of identity conditioning: applied (how, how strongly) or why not."""
    plan = job.identity
    if plan is None:
        return None
    strength = job.params.identity_strength
    if strength > 0 and result.identity is not None:
        return result.identity.to_json(strength)
    if strength > 0:  # an adapter that cannot condition and said nothing: never claim it
        return {"applied": False, "reason": "the backend did not report using the references"}
    return {"applied": False, "reason": plan.get("reason") or "identity.strength is 0"}


def _identity_infotext(
    identity: dict[str, Any] | None,
    consistency: dict[str, Any] | None,
    transfer: dict[str, Any] | None,
) -> dict[str, str]:
    fields: dict[str, str] = {}
    if identity and identity.get("applied"):
        fields["Identity"] = f"{identity['method']}, strength {identity['strength']:g}"
    if consistency and consistency.get("score") is not None:
        fields["Consistency score"] = f"{consistency['score']:.3f} ({consistency['method']})"
    if transfer:
        fields["Style transfer"] = f"{transfer['from']} to {transfer['to']}"
    return fields
