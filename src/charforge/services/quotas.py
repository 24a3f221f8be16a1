"""Quotas: images per day and active jobs per user, checked before a job row exists.

"Per day" is a rolling 24 hours (not UTC midnight): a limit never resets at once for
everyone, and Retry-After is exact (when the oldest counted image leaves the window).
Images still to come from the user's queued and running jobs count too, so a burst of
submissions cannot overshoot the quota.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from charforge.config import Settings
from charforge.db.models import Image, Job, User, utcnow
from charforge.errors import QuotaExceeded, TooManyJobs
from charforge.services import permissions

DAY = timedelta(hours=24)
ACTIVE = ("queued", "running")
# A job slot frees when a job ends: no exact time to promise, so a short wait.
ACTIVE_RETRY_AFTER = 5.0


@dataclass(frozen=True)
class Limits:
    """The global defaults (None: off); a user's permissions may override either."""

    images_per_day: int | None = None
    max_active_jobs: int | None = None
    # The most a backend may send in one answer (CHARFORGE_BACKEND_MAX_RESPONSE_BYTES): a job
    # whose images cannot fit in one is refused before it is queued, not failed on the way.
    answer_bytes: int | None = None

    @classmethod
    def of(cls, settings: Settings) -> Limits:
        return cls(
            settings.quota_images_per_day,
            settings.max_active_jobs_per_user,
            settings.backend_max_response_bytes,
        )

    def for_user(self, user: User) -> Limits:
        own = permissions.of(user)
        return Limits(
            own.images_per_day if "imagesPerDay" in own.overrides else self.images_per_day,
            own.max_active_jobs if "maxActiveJobs" in own.overrides else self.max_active_jobs,
            self.answer_bytes,
        )


@dataclass(frozen=True)
class Usage:
    images_today: int  # stored in the last 24 h, plus those still to come from active jobs
    active_jobs: int
    limits: Limits


def _stored_since(session: Session, user_id: int, since: datetime) -> int:
    return int(
        session.scalar(
            select(func.count())
            .select_from(Image)
            .where(Image.owner_id == user_id, Image.created_at >= since)
        )
        or 0
    )


def _active(session: Session, user_id: int) -> tuple[int, int]:
    """(active jobs, images they have yet to store)."""
    jobs = session.execute(
        select(Job.id, Job.count).where(Job.owner_id == user_id, Job.state.in_(ACTIVE))
    ).all()
    if not jobs:
        return 0, 0
    stored = int(
        session.scalar(
            select(func.count())
            .select_from(Image)
            .where(Image.job_id.in_([job_id for job_id, _ in jobs]))
        )
        or 0
    )
    return len(jobs), max(0, sum(int(count or 1) for _, count in jobs) - stored)


def usage(session: Session, user: User, limits: Limits, now: datetime | None = None) -> Usage:
    now = now or utcnow()
    active, pending = _active(session, user.id)
    return Usage(
        _stored_since(session, user.id, now - DAY) + pending, active, limits.for_user(user)
    )


def check(
    session: Session, user: User, limits: Limits, count: int, now: datetime | None = None
) -> None:
    """429 too_many_jobs or quota_exceeded when ``count`` more images would break a limit."""
    now = now or utcnow()
    used = usage(session, user, limits, now)
    own = used.limits
    if own.max_active_jobs is not None and used.active_jobs >= own.max_active_jobs:
        raise TooManyJobs(
            f"You have {used.active_jobs} jobs queued or running; the limit is "
            f"{own.max_active_jobs}.",
            retry_after=ACTIVE_RETRY_AFTER,
            hint="Wait for one to finish (or cancel one), then try again. The default limit "
            "is CHARFORGE_MAX_ACTIVE_JOBS_PER_USER; an administrator may change yours.",
        )
    if own.images_per_day is not None and used.images_today + count > own.images_per_day:
        raise QuotaExceeded(
            f"This would make {used.images_today + count} images in 24 hours; your limit is "
            f"{own.images_per_day}.",
            retry_after=_until_room(
                session, user.id, now, used.images_today + count - own.images_per_day
            ),
            hint="Wait until older images leave the 24-hour window (see Retry-After). The "
            "default limit is CHARFORGE_QUOTA_IMAGES_PER_DAY; an administrator may raise yours.",
        )


def _until_room(session: Session, user_id: int, now: datetime, excess: int) -> float:
    """Seconds until ``excess`` stored images have aged out of the window."""
    times = session.scalars(
        select(Image.created_at)
        .where(Image.owner_id == user_id, Image.created_at >= now - DAY)
        .order_by(Image.created_at)
        .limit(excess)
    ).all()
    if len(times) < excess:
        # Images still to come (or a batch above the limit itself) count too: a whole
        # window is the honest bound.
        return DAY.total_seconds()
    return max(1.0, (times[excess - 1] + DAY - now).total_seconds())
