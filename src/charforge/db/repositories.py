"""Every query that reads user data lives here, and every one of them is owner-scoped:
another user's id simply finds nothing (a 404, never a 403 that confirms it exists)."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any

from sqlalchemy import and_, func, or_, select, update
from sqlalchemy.orm import Session

from charforge.db.dispatch import failed_backends_of
from charforge.db.models import ApiToken, Character, Job, JobAttempt, User, utcnow
from charforge.errors import CharforgeError


def user_by_name(session: Session, name: str) -> User | None:
    return session.scalar(select(User).where(User.name == name))


def user_by_id(session: Session, user_id: int) -> User | None:
    return session.get(User, user_id)


def count_users(session: Session) -> int:
    return int(session.scalar(select(func.count()).select_from(User)) or 0)


def all_users(session: Session) -> Sequence[User]:
    return session.scalars(select(User).order_by(User.id)).all()


def token_by_hash(session: Session, token_hash: str) -> ApiToken | None:
    return session.scalar(
        select(ApiToken).where(ApiToken.token_hash == token_hash, ApiToken.revoked_at.is_(None))
    )


def tokens_of(session: Session, user_id: int) -> Sequence[ApiToken]:
    return session.scalars(
        select(ApiToken).where(ApiToken.user_id == user_id).order_by(ApiToken.id)
    ).all()


def character(session: Session, owner_id: int, character_id: str) -> Character | None:
    return session.scalar(
        select(Character).where(Character.id == character_id, Character.owner_id == owner_id)
    )


def characters_named(session: Session, owner_id: int, name: str) -> Sequence[Character]:
    return session.scalars(
        select(Character).where(Character.owner_id == owner_id, Character.name == name)
    ).all()


def characters_of(session: Session, owner_id: int) -> Sequence[Character]:
    return session.scalars(
        select(Character)
        .where(Character.owner_id == owner_id)
        .order_by(Character.created_at.desc(), Character.id.desc())
    ).all()


def write_back_look(
    session: Session, character_id: str, *, style: str | None, model: str | None
) -> bool:
    """Set a style/model still missing, only if still missing: of two first requests racing
    for an older character, exactly one decides its look."""
    query = update(Character).where(Character.id == character_id)
    values: dict[str, str] = {}
    if style is not None:
        query = query.where(Character.primary_style.is_(None))
        values["primary_style"] = style
    if model is not None:
        query = query.where(Character.model.is_(None))
        values["model"] = model
    if not values:
        return True
    result = session.execute(query.values(**values).execution_options(synchronize_session=False))
    return bool(getattr(result, "rowcount", 0) == 1)


def job(session: Session, owner_id: int, job_id: str) -> Job | None:
    return session.scalar(select(Job).where(Job.id == job_id, Job.owner_id == owner_id))


def job_any_owner(session: Session, job_id: str) -> Job | None:
    """For the worker, which acts for whoever owns the job."""
    return session.get(Job, job_id)


def claim_job(
    session: Session,
    job_id: str,
    worker: str,
    backend: str,
    now: datetime,
    lease_until: datetime,
) -> int | None:
    """queued -> running under a lease, atomically: of two workers racing for a job, one wins.
    Returns the number of the attempt it starts (recorded in job_attempts), or None."""
    claim = (
        update(Job)
        .where(Job.id == job_id, Job.state == "queued", _free_or_mine(worker, now))
        .values(
            state="running",
            attempts=Job.attempts + 1,
            started_at=func.coalesce(Job.started_at, now),
            lease_owner=worker,
            lease_until=lease_until,
            backend=backend,
            not_before=None,
            progress=None,
            step=None,
            steps=None,
        )
        .execution_options(synchronize_session=False)
    )
    number: int | None
    if session.get_bind().dialect.update_returning:
        # One statement that also says which attempt this is (PostgreSQL, SQLite 3.35+): the
        # claim sits between one generation and the next on a backend.
        number = session.scalar(claim.returning(Job.attempts))
    else:
        result = session.execute(claim)
        claimed = getattr(result, "rowcount", 0) == 1
        number = session.scalar(select(Job.attempts).where(Job.id == job_id)) if claimed else None
    if number is None:
        return None
    session.add(
        JobAttempt(job_id=job_id, number=number, backend=backend, worker=worker, started_at=now)
    )
    return int(number)


def _free_or_mine(worker: str, now: datetime) -> Any:
    """A queued job nobody has reserved, or whose reservation lapsed, or that is ours."""
    return or_(Job.lease_owner.is_(None), Job.lease_owner == worker, Job.lease_until < now)


def reserve_job(session: Session, job_id: str, worker: str, now: datetime, until: datetime) -> bool:
    """Hold a queued job while waiting for a backend or a backoff (distributed mode): if the
    worker dies meanwhile, the reservation lapses and the sweeper sends the job again."""
    result = session.execute(
        update(Job)
        .where(Job.id == job_id, Job.state == "queued", _free_or_mine(worker, now))
        .values(lease_owner=worker, lease_until=until)
    )
    return bool(getattr(result, "rowcount", 0) == 1)


def release_reservations(session: Session) -> int:
    """Embedded mode at start: queued jobs reserved by an earlier process (waiting at a
    backend's door when it died) become free at once instead of when the lease lapses."""
    result = session.execute(
        update(Job)
        .where(Job.state == "queued", Job.lease_owner.is_not(None))
        .values(lease_owner=None, lease_until=None)
    )
    return int(getattr(result, "rowcount", 0) or 0)


def _held(job_id: str, number: int, worker: str) -> Any:
    return and_(
        Job.id == job_id, Job.state == "running", Job.attempts == number, Job.lease_owner == worker
    )


def renew_lease(session: Session, job_id: str, number: int, worker: str, until: datetime) -> bool:
    result = session.execute(
        update(Job).where(_held(job_id, number, worker)).values(lease_until=until)
    )
    return bool(getattr(result, "rowcount", 0) == 1)


def set_progress(
    session: Session,
    job_id: str,
    number: int,
    worker: str,
    fraction: float,
    step: int | None,
    steps: int | None,
) -> bool:
    result = session.execute(
        update(Job)
        .where(_held(job_id, number, worker))
        .values(progress=fraction, step=step, steps=steps)
    )
    return bool(getattr(result, "rowcount", 0) == 1)


def requeue_for_retry(
    session: Session, job_id: str, number: int, worker: str, not_before: datetime
) -> bool:
    result = session.execute(
        update(Job)
        .where(_held(job_id, number, worker))
        .values(state="queued", lease_owner=None, lease_until=None, not_before=not_before)
    )
    return bool(getattr(result, "rowcount", 0) == 1)


def finish_succeeded(
    session: Session,
    job_id: str,
    number: int,
    worker: str,
    backend: str,
    params: dict[str, Any] | None = None,
    identity: dict[str, Any] | None = None,
) -> bool:
    """Mark the job succeeded if this attempt still holds it; ``params`` (when given) are
    the parameters as they ran (the canonical sampler and schedule names, say); ``identity``
    the identity plan with its tries and outcome."""
    extra: dict[str, Any] = {} if params is None else {"params": params}
    if identity is not None:
        extra["identity"] = identity
    result = session.execute(
        update(Job)
        .where(_held(job_id, number, worker))
        .values(
            **extra,
            state="succeeded",
            backend=backend,
            finished_at=utcnow(),
            lease_owner=None,
            lease_until=None,
            progress=1.0,
            error_code=None,
            error_message=None,
            error_hint=None,
            error_field=None,
        )
    )
    return bool(getattr(result, "rowcount", 0) == 1)


def keep_after_cancel(session: Session, job_id: str, number: int, made: int, asked: int) -> bool:
    """A job cancelled while attempt ``number`` ran keeps the ``made`` images that were whole;
    False when it was not cancelled during that attempt (re-queued, or never cancelled)."""
    result = session.execute(
        update(Job)
        .where(Job.id == job_id, Job.state == "cancelled", Job.attempts == number)
        .values(
            error_message=f"The job was cancelled after {made} of {asked} images; the {made} "
            "already made are kept."
        )
    )
    return bool(getattr(result, "rowcount", 0) == 1)


def finish_failed(
    session: Session,
    job_id: str,
    error: CharforgeError,
    *,
    backend: str | None = None,
    attempt: tuple[int, str] | None = None,
) -> bool:
    """Fail a job that is still running (by this attempt, when given) or still queued."""
    if attempt is not None:
        condition = _held(job_id, *attempt)
    else:
        condition = and_(Job.id == job_id, Job.state.in_(("queued", "running")))
    values: dict[str, Any] = {
        "state": "failed",
        "finished_at": utcnow(),
        "lease_owner": None,
        "lease_until": None,
        "error_code": error.code,
        "error_message": error.message,
        "error_hint": error.hint,
        "error_field": error.field,
    }
    if backend is not None:
        values["backend"] = backend
    result = session.execute(update(Job).where(condition).values(**values))
    return bool(getattr(result, "rowcount", 0) == 1)


def finish_attempt(
    session: Session,
    job_id: str,
    number: int,
    outcome: str,
    error_code: str | None = None,
    error_message: str | None = None,
) -> None:
    session.execute(
        update(JobAttempt)
        .where(
            JobAttempt.job_id == job_id,
            JobAttempt.number == number,
            JobAttempt.outcome == "running",
        )
        .values(
            outcome=outcome,
            error_code=error_code,
            error_message=error_message,
            finished_at=utcnow(),
        )
    )


def attempts_of(session: Session, job_id: str) -> Sequence[JobAttempt]:
    return session.scalars(
        select(JobAttempt).where(JobAttempt.job_id == job_id).order_by(JobAttempt.number)
    ).all()


def failed_backends(session: Session, job_id: str) -> frozenset[str]:
    """Backends an attempt of this job failed on: a retry steers clear of them."""
    return failed_backends_of(session, [job_id]).get(job_id, frozenset())


def cancel_job(session: Session, owner_id: int, job_id: str) -> tuple[str, str | None, int] | None:
    """Cancel a queued or running job; returns (state it was in, its backend, its attempt
    number), or None when it is no longer cancellable."""
    # A worker may claim the job (queued -> running) between the read and the update; the
    # job is still cancellable then, so read it again and retry rather than answer 409.
    for _ in range(_CANCEL_TRIES):
        job = session.scalar(
            select(Job)
            .where(Job.id == job_id, Job.owner_id == owner_id)
            .execution_options(populate_existing=True)
        )
        if job is None or job.state not in ("queued", "running"):
            return None
        previous, backend, attempt = job.state, job.backend, job.attempts or 0
        result = session.execute(
            update(Job)
            .where(Job.id == job_id, Job.state == previous, Job.attempts == job.attempts)
            .values(
                state="cancelled",
                finished_at=utcnow(),
                lease_owner=None,
                lease_until=None,
                error_code="cancelled",
                error_message="The job was cancelled.",
            )
            .execution_options(synchronize_session=False)
        )
        if getattr(result, "rowcount", 0) == 1:
            break
    else:
        return None
    if previous == "running":
        session.execute(
            update(JobAttempt)
            .where(JobAttempt.job_id == job_id, JobAttempt.outcome == "running")
            .values(outcome="cancelled", finished_at=utcnow())
        )
    return previous, backend, attempt


# Each retry follows a state change by a worker; a job changes state a few times at most.
_CANCEL_TRIES = 5


def queued_jobs(session: Session) -> Sequence[Job]:
    return session.scalars(
        select(Job).where(Job.state == "queued").order_by(Job.created_at, Job.id)
    ).all()


def jobs_by_ids(session: Session, job_ids: list[str]) -> Sequence[Job]:
    if not job_ids:
        return []
    return session.scalars(select(Job).where(Job.id.in_(job_ids))).all()


def jobs_page(
    session: Session,
    owner_id: int,
    *,
    states: list[str] | None,
    limit: int,
    after: tuple[datetime, str] | None,
) -> Sequence[Job]:
    """The user's jobs, newest first, keyset-paginated like image history."""
    query = select(Job).where(Job.owner_id == owner_id)
    if states:
        query = query.where(Job.state.in_(states))
    if after is not None:
        created, last_id = after
        query = query.where(
            or_(Job.created_at < created, and_(Job.created_at == created, Job.id < last_id))
        )
    return session.scalars(query.order_by(Job.created_at.desc(), Job.id.desc()).limit(limit)).all()


def queue_position(session: Session, job: Job) -> int:
    """How many queued jobs for the same checkpoint were created before this one."""
    return int(
        session.scalar(
            select(func.count())
            .select_from(Job)
            .where(
                Job.state == "queued",
                Job.checkpoint == job.checkpoint,
                or_(
                    Job.created_at < job.created_at,
                    and_(Job.created_at == job.created_at, Job.id < job.id),
                ),
            )
        )
        or 0
    )


def job_counts(session: Session) -> dict[str, int]:
    rows = session.execute(select(Job.state, func.count()).group_by(Job.state)).all()
    return {state: int(count) for state, count in rows}


def queued_by_checkpoint(session: Session) -> dict[str, int]:
    rows = session.execute(
        select(Job.checkpoint, func.count()).where(Job.state == "queued").group_by(Job.checkpoint)
    ).all()
    return {checkpoint: int(count) for checkpoint, count in rows}


def running_on_backends(session: Session) -> dict[str, int]:
    rows = session.execute(
        select(Job.backend, func.count()).where(Job.state == "running").group_by(Job.backend)
    ).all()
    return {str(backend): int(count) for backend, count in rows if backend}
