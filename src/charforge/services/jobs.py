"""Jobs as their owner sees them: list, one job with its attempts and place in the queue,
cancel."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from sqlalchemy.orm import Session

from charforge.db import images as image_rows
from charforge.db import repositories as repo
from charforge.db.models import Image, Job, JobAttempt, User
from charforge.errors import Conflict, InvalidInput, NotFound
from charforge.services import cursors

STATES = ("queued", "running", "succeeded", "failed", "cancelled")
FINAL = frozenset(("succeeded", "failed", "cancelled"))


@dataclass(frozen=True)
class JobView:
    job: Job
    images: list[Image]
    attempts: list[JobAttempt]
    queue_position: int | None  # jobs ahead of it for the same checkpoint, while queued
    withheld: int = 0  # images the output screening withheld (in quarantine)


def get(session: Session, owner: User, job_id: str) -> Job:
    job = repo.job(session, owner.id, job_id)
    if job is None:
        raise NotFound(f"No job with id '{job_id}' among yours.", field="jobId")
    return job


def view(session: Session, owner: User, job_id: str) -> JobView:
    job = get(session, owner, job_id)
    return JobView(
        job,
        list(image_rows.images_of_job(session, job.id)),
        list(repo.attempts_of(session, job.id)),
        repo.queue_position(session, job) if job.state == "queued" else None,
        image_rows.withheld_of_job(session, job.id) if job.state in FINAL else 0,
    )


def page(
    session: Session, owner: User, *, states: str | None, limit: int, cursor: str | None
) -> tuple[Sequence[Job], str | None]:
    wanted = [s.strip().lower() for s in states.split(",") if s.strip()] if states else None
    unknown = [s for s in wanted or [] if s not in STATES]
    if unknown:
        raise InvalidInput(
            f"Unknown job state {', '.join(repr(s) for s in unknown)}.",
            field="state",
            hint=f"Use one or more of {', '.join(STATES)}, comma-separated.",
        )
    after = cursors.decode(cursor) if cursor else None
    rows = repo.jobs_page(session, owner.id, states=wanted, limit=limit + 1, after=after)
    last = rows[limit - 1] if len(rows) > limit else None
    return rows[:limit], cursors.encode(last.created_at, last.id) if last else None


def cancel(session: Session, owner: User, job_id: str) -> tuple[str, str | None, int]:
    """Cancel a queued or running job: returns (the state it was in, its backend, the number
    of its attempt)."""
    job = get(session, owner, job_id)
    cancelled = repo.cancel_job(session, owner.id, job.id)
    if cancelled is None:
        session.refresh(job)
        raise Conflict(
            f"Job '{job_id}' has already {job.state}; only queued or running jobs can be "
            "cancelled.",
            field="jobId",
        )
    return cancelled
