"""The queries distributed workers schedule with: the queued jobs they may take, who runs
what now (fairness between users), and the claim of a plan's jobs.

The database is the queue: a worker reads the queued jobs, plans with the same scheduler as
embedded mode, and takes the planned ones with ``SELECT ... FOR UPDATE SKIP LOCKED`` (on
PostgreSQL; SQLite serialises writers anyway) followed by a conditional update, so two
workers planning at once never take the same job and never wait on each other's rows.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import and_, func, or_, select, update
from sqlalchemy.orm import Session

from charforge.db.models import Job, JobAttempt


@dataclass(frozen=True)
class Waiting:
    """A queued job as the scheduler needs it (no prompt, no images)."""

    id: str
    owner_id: int
    style: str
    checkpoint: str
    created_at: datetime
    not_before: datetime | None
    attempts: int


def _takeable(now: datetime) -> Any:
    """Queued and not reserved by a worker, or reserved by one whose reservation lapsed."""
    return and_(
        Job.state == "queued",
        or_(Job.lease_owner.is_(None), Job.lease_until < now),
    )


def waiting_jobs(session: Session, now: datetime, limit: int, per_group: int) -> list[Waiting]:
    """Queued jobs no live reservation holds, oldest first: at most ``per_group`` of each
    (checkpoint, user) and ``limit`` in all, so one user's long batch or one checkpoint's
    backlog never hides another user's job or another checkpoint's from the plan."""
    rank = (
        func.row_number()
        .over(partition_by=(Job.checkpoint, Job.owner_id), order_by=(Job.created_at, Job.id))
        .label("rank")
    )
    ranked = (
        select(
            Job.id,
            Job.owner_id,
            Job.art_style,
            Job.checkpoint,
            Job.created_at,
            Job.not_before,
            Job.attempts,
            rank,
        )
        .where(_takeable(now))
        .subquery()
    )
    rows = session.execute(
        select(
            ranked.c.id,
            ranked.c.owner_id,
            ranked.c.art_style,
            ranked.c.checkpoint,
            ranked.c.created_at,
            ranked.c.not_before,
            ranked.c.attempts,
        )
        .where(ranked.c.rank <= per_group)
        .order_by(ranked.c.created_at, ranked.c.id)
        .limit(limit)
    ).all()
    return [Waiting(*row) for row in rows]


def params_of(session: Session, job_ids: Sequence[str]) -> dict[str, dict[str, Any]]:
    """The parameters of these jobs (read once per job: the scheduler keeps what it needs)."""
    if not job_ids:
        return {}
    rows = session.execute(select(Job.id, Job.params).where(Job.id.in_(list(job_ids))))
    return {str(row[0]): row[1] for row in rows}


def failed_backends_of(session: Session, job_ids: Sequence[str]) -> dict[str, frozenset[str]]:
    """For each job, the backends an attempt of it failed on (a retry steers clear)."""
    if not job_ids:
        return {}
    found: dict[str, set[str]] = {}
    rows = session.execute(
        select(JobAttempt.job_id, JobAttempt.backend).where(
            JobAttempt.job_id.in_(list(job_ids)),
            JobAttempt.outcome.in_(("retried", "failed")),
        )
    )
    for job_id, backend in rows:
        found.setdefault(job_id, set()).add(backend)
    return {job_id: frozenset(names) for job_id, names in found.items()}


def busy_owners(session: Session, now: datetime) -> Counter[int]:
    """How many jobs each user has running or taken by a worker now, in the whole fleet."""
    held = or_(
        Job.state == "running",
        and_(Job.state == "queued", Job.lease_owner.is_not(None), Job.lease_until >= now),
    )
    return Counter(
        {
            int(owner): int(count)
            for owner, count in session.execute(
                select(Job.owner_id, func.count(Job.id)).where(held).group_by(Job.owner_id)
            )
        }
    )


def take(
    session: Session, job_ids: Sequence[str], worker: str, now: datetime, until: datetime
) -> set[str]:
    """Reserve those of ``job_ids`` still free for ``worker`` until ``until``; returns the
    ids it got. Rows another worker is taking at this moment are skipped, not waited for."""
    if not job_ids:
        return set()
    free = and_(Job.id.in_(list(job_ids)), _takeable(now))
    locked = list(
        session.scalars(select(Job.id).where(free).with_for_update(skip_locked=True)).all()
    )
    if not locked:
        return set()
    # The condition again: SQLite has no row locks, and a reservation may land in between.
    reserved = (
        update(Job)
        .where(Job.id.in_(locked), _takeable(now))
        .values(lease_owner=worker, lease_until=until)
        .execution_options(synchronize_session=False)
    )
    if session.get_bind().dialect.update_returning:
        return set(session.scalars(reserved.returning(Job.id)).all())
    session.execute(reserved)
    mine = select(Job.id).where(Job.id.in_(locked), Job.lease_owner == worker)
    return set(session.scalars(mine).all())


def release_reservation(session: Session, job_id: str, worker: str) -> None:
    """The job was not run after all: free it for every worker's next plan."""
    session.execute(
        update(Job)
        .where(Job.id == job_id, Job.state == "queued", Job.lease_owner == worker)
        .values(lease_owner=None, lease_until=None)
    )


def release_reservations_of(session: Session, workers: set[str]) -> int:
    """Queued jobs reserved by workers known dead become free at once."""
    if not workers:
        return 0
    result = session.execute(
        update(Job)
        .where(Job.state == "queued", Job.lease_owner.in_(sorted(workers)))
        .values(lease_owner=None, lease_until=None)
    )
    return int(getattr(result, "rowcount", 0) or 0)
