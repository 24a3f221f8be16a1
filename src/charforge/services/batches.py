"""Batches: many jobs submitted as one, all or nothing, then each run as any job is. A batch's
state is read from its jobs: one failing item never stops the others."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel
from sqlalchemy import and_, or_, select
from sqlalchemy.orm import Session

from charforge.config import GenerationDefaults
from charforge.db.models import Batch, Image, Job, User, utcnow
from charforge.domain.batches import item_bodies
from charforge.domain.params import GenerateBody
from charforge.domain.routes import RouteTable
from charforge.errors import CharforgeError, NotFound
from charforge.services import cursors, generation, quotas
from charforge.services.identity_plan import CapabilitiesOf

STATES = ("queued", "running", "succeeded", "partial", "failed", "cancelled")


@dataclass(frozen=True)
class BatchView:
    batch: Batch
    state: str
    jobs: list[Job]
    images: dict[str, list[Image]]  # by job id, the owner's visible images
    counts: Counter[str]


def submit(
    session: Session,
    owner: User,
    body: BaseModel,
    table: RouteTable,
    defaults: GenerationDefaults,
    *,
    capabilities: CapabilitiesOf | None = None,
    limits: quotas.Limits | None = None,
) -> tuple[Batch, list[Job]]:
    """Every item checked (and its job written) in this transaction; the first refusal names
    its item and nothing is queued. The caller hands the jobs to the queue after commit."""
    shared = body.model_dump(mode="json", by_alias=True, exclude_unset=True, exclude={"items"})
    return submit_bodies(
        session,
        owner,
        item_bodies(body),
        shared,
        table,
        defaults,
        capabilities=capabilities,
        limits=limits,
    )


def submit_bodies(
    session: Session,
    owner: User,
    bodies: Sequence[GenerateBody],
    shared: dict[str, Any],
    table: RouteTable,
    defaults: GenerationDefaults,
    *,
    capabilities: CapabilitiesOf | None = None,
    limits: quotas.Limits | None = None,
    numbers: Sequence[int] | None = None,
) -> tuple[Batch, list[Job]]:
    """A batch of ready generate bodies (the command line's file, read line by line);
    ``numbers`` names the items in errors (their place in the file), default 0, 1, ..."""
    batch = Batch(owner_id=owner.id, total=len(bodies), request=shared, created_at=utcnow())
    session.add(batch)
    session.flush()
    jobs = []
    for index, item in enumerate(bodies):
        try:
            job = generation.submit(
                session,
                owner,
                item,
                table,
                defaults,
                count=item.count,
                capabilities=capabilities,
                limits=limits,
            )
        except CharforgeError as exc:
            where = f"items[{numbers[index] if numbers else index}]"
            exc.field = f"{where}.{exc.field}" if exc.field else where
            exc.message = f"{where}: {exc.message}"
            raise
        job.batch_id, job.batch_index = batch.id, index
        jobs.append(job)
    session.flush()
    return batch, jobs


def get(session: Session, owner: User, batch_id: str) -> Batch:
    batch = session.scalar(select(Batch).where(Batch.id == batch_id, Batch.owner_id == owner.id))
    if batch is None:
        raise NotFound(f"No batch with id '{batch_id[:64]}' among yours.", field="batchId")
    return batch


def jobs_of(session: Session, batch_id: str) -> list[Job]:
    return list(
        session.scalars(select(Job).where(Job.batch_id == batch_id).order_by(Job.batch_index))
    )


def state_of(batch: Batch, jobs: Sequence[Job]) -> tuple[str, Counter[str]]:
    counts = Counter(job.state for job in jobs)
    if batch.cancelled_at is not None and not counts["queued"] and not counts["running"]:
        return "cancelled", counts
    if counts["queued"] == len(jobs):
        return "queued", counts
    if counts["queued"] or counts["running"]:
        return "running", counts
    if counts["succeeded"] == len(jobs):
        return "succeeded", counts
    if counts["succeeded"]:
        return "partial", counts
    return "failed", counts


def _images_of(session: Session, job_ids: list[str]) -> dict[str, list[Image]]:
    found: dict[str, list[Image]] = {job_id: [] for job_id in job_ids}
    if not job_ids:
        return found
    rows = session.scalars(
        select(Image)
        .where(Image.job_id.in_(job_ids), Image.withheld.is_(False))
        .order_by(Image.job_id, Image.position)
    )
    for image in rows:
        found[image.job_id].append(image)
    return found


def view(session: Session, owner: User, batch_id: str) -> BatchView:
    batch = get(session, owner, batch_id)
    jobs = jobs_of(session, batch.id)
    state, counts = state_of(batch, jobs)
    return BatchView(batch, state, jobs, _images_of(session, [j.id for j in jobs]), counts)


def page(
    session: Session, owner: User, *, limit: int, cursor: str | None
) -> tuple[list[BatchView], str | None]:
    query = select(Batch).where(Batch.owner_id == owner.id)
    if cursor:
        created, last_id = cursors.decode(cursor)
        query = query.where(
            or_(Batch.created_at < created, and_(Batch.created_at == created, Batch.id < last_id))
        )
    rows = list(
        session.scalars(query.order_by(Batch.created_at.desc(), Batch.id.desc()).limit(limit + 1))
    )
    more = len(rows) > limit
    rows = rows[:limit]
    views = [view(session, owner, b.id) for b in rows]
    last = rows[-1] if more and rows else None
    return views, cursors.encode(last.created_at, last.id) if last else None


def mark_cancelled(session: Session, owner: User, batch_id: str) -> list[str]:
    """The batch is cancelled; returns its jobs still queued or running, for the caller to
    cancel one by one (each as a job's cancel: its task interrupted on its backend)."""
    batch = get(session, owner, batch_id)
    if batch.cancelled_at is None:
        batch.cancelled_at = utcnow()
    return [j.id for j in jobs_of(session, batch.id) if j.state in ("queued", "running")]
