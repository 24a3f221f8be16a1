"""Taking jobs back from processes that died: leases that lapsed, workers whose heartbeat is
gone, and queued jobs whose message was lost (sent again)."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any

from sqlalchemy import and_, case, or_, select, update
from sqlalchemy.orm import Session

from charforge.db.models import Job
from charforge.db.repositories import finish_attempt


def running_owners(session: Session) -> list[str]:
    """The processes holding running jobs' leases, or queued jobs they took to run."""
    rows = session.scalars(
        select(Job.lease_owner)
        .where(Job.state.in_(("running", "queued")), Job.lease_owner.is_not(None))
        .distinct()
    )
    return sorted({str(owner) for owner in rows})


def requeue_abandoned(
    session: Session,
    now: datetime,
    *,
    only_expired: bool,
    max_attempts: int,
    owners: set[str] | None = None,
    reason: str | None = None,
) -> tuple[list[str], list[str]]:
    """Jobs whose runner died go back to the queue, their attempt marked interrupted.
    ``only_expired``: only those whose lease lapsed (others may be alive elsewhere); else
    every running job (one embedded server starting: nothing else can be running them).
    A job interrupted ``max_attempts`` times fails instead of crashing workers forever.
    Returns (re-queued ids, failed ids)."""
    query = select(Job.id, Job.attempts, Job.lease_owner, Job.lease_until).where(
        Job.state == "running"
    )
    if owners is not None:  # these processes are known dead: their leases need not lapse
        query = query.where(Job.lease_owner.in_(sorted(owners)))
    if only_expired:
        query = query.where(or_(Job.lease_until.is_(None), Job.lease_until < now))
    requeued: list[str] = []
    failed: list[str] = []
    for job_id, attempts, owner, until in session.execute(query).all():
        condition = and_(Job.id == job_id, Job.state == "running", Job.attempts == attempts)
        if owners is not None:
            condition = and_(condition, Job.lease_owner == owner)
        if only_expired:
            condition = and_(condition, or_(Job.lease_until.is_(None), Job.lease_until < now))
        if attempts >= max_attempts:
            values: dict[str, Any] = {
                "state": "failed",
                "finished_at": now,
                "error_code": "interrupted",
                "error_message": (
                    f"The job was interrupted {attempts} times (its worker stopped or "
                    "crashed while running it) and was given up."
                ),
                "error_hint": "Check the worker logs for crashes; then submit it again.",
            }
        else:
            values = {"state": "queued", "not_before": None}
        values.update(lease_owner=None, lease_until=None)
        result = session.execute(update(Job).where(condition).values(**values))
        if getattr(result, "rowcount", 0) == 1:
            # Said on the attempt, so its history tells what happened and to whom.
            cause = reason or (
                "it stopped renewing its lease"
                + (f" (it lapsed at {until:%H:%M:%S} UTC)" if until else "")
                + ": it died, was killed or lost the database"
            )
            why = f"The process running it ({owner or 'unknown'}): {cause}; " + (
                "the job was given up." if attempts >= max_attempts else "it was re-queued."
            )
            finish_attempt(session, job_id, attempts, "interrupted", "interrupted", why)
            (failed if attempts >= max_attempts else requeued).append(job_id)
    return requeued, failed


def stale_queued(session: Session, before: datetime, now: datetime) -> Sequence[Job]:
    """Queued jobs to send again: reserved by a worker whose reservation lapsed (it died
    holding the message), or never reserved and last sent before ``before``."""
    lapsed = and_(Job.lease_owner.is_not(None), Job.lease_until < now)
    unsent = and_(
        Job.lease_owner.is_(None), or_(Job.enqueued_at.is_(None), Job.enqueued_at < before)
    )
    return session.scalars(select(Job).where(Job.state == "queued", or_(lapsed, unsent))).all()


def mark_enqueued(session: Session, job_ids: list[str], now: datetime) -> None:
    """The jobs' messages were (re)sent now; a lapsed reservation is dropped."""
    if job_ids:
        session.execute(
            update(Job)
            .where(Job.id.in_(job_ids), Job.state == "queued")
            .values(
                enqueued_at=now,
                lease_owner=case((Job.lease_until < now, None), else_=Job.lease_owner),
            )
        )
