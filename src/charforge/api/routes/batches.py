"""/api/batches: many generations in one request, followed as one (owner-scoped)."""

from __future__ import annotations

import contextlib
from datetime import datetime
from typing import Annotated, Any

from fastapi import APIRouter, Query, Request
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.concurrency import run_in_threadpool

from charforge.api.deps import ContainerDep, CurrentUser
from charforge.api.routes.jobs import cancel_job
from charforge.api.schemas import ImageBrief, JobError, Wire, brief, job_error
from charforge.api.sse import polled_stream
from charforge.container import Container
from charforge.db.models import User
from charforge.domain.batches import BatchBody
from charforge.errors import Conflict
from charforge.jobs.tickets import JobTicket
from charforge.services import batches, quotas

router = APIRouter(prefix="/api/batches", tags=["batches"])


class BatchJobOut(Wire):
    id: str
    index: int
    state: str
    prompt: str
    count: int
    images: list[ImageBrief]
    error: JobError | None


class BatchOut(Wire):
    id: str
    state: str  # queued | running | succeeded | partial | failed | cancelled
    total: int
    succeeded: int
    failed: int
    cancelled: int
    images: int  # made so far, over all items
    jobs: list[BatchJobOut]
    created_at: datetime
    cancelled_at: datetime | None

    @classmethod
    def of(cls, v: batches.BatchView) -> BatchOut:
        return cls(
            id=v.batch.id,
            state=v.state,
            total=v.batch.total,
            succeeded=v.counts["succeeded"],
            failed=v.counts["failed"],
            cancelled=v.counts["cancelled"],
            images=sum(len(found) for found in v.images.values()),
            jobs=[
                BatchJobOut(
                    id=j.id,
                    index=j.batch_index or 0,
                    state=j.state,
                    prompt=j.user_prompt,
                    count=j.count or 1,
                    images=[brief(i) for i in v.images.get(j.id, [])],
                    error=job_error(j),
                )
                for j in v.jobs
            ],
            created_at=v.batch.created_at,
            cancelled_at=v.batch.cancelled_at,
        )


class BatchPage(Wire):
    items: list[BatchOut]
    next_cursor: str | None


def submit_batch(c: Container, user: User, body: BatchBody) -> BatchOut:
    with c.db.session() as session:
        batch, jobs = batches.submit(
            session,
            user,
            body,
            c.table,
            c.settings.defaults,
            capabilities=c.pool.capabilities,
            limits=quotas.Limits.of(c.settings),
        )
        tickets = [JobTicket.of(job) for job in jobs]
        batch_id = batch.id
    c.queue.submit_many(tickets)  # committed: only now may a worker see them
    return batch_out(c, user, batch_id)


def batch_out(c: Container, user: User, batch_id: str) -> BatchOut:
    with c.db.session() as session:
        return BatchOut.of(batches.view(session, user, batch_id))


@router.post("", status_code=202, response_model=BatchOut)
async def create_batch(body: BatchBody, user: CurrentUser, c: ContainerDep) -> JSONResponse:
    out = await run_in_threadpool(submit_batch, c, user, body)
    return JSONResponse(
        out.model_dump(mode="json", by_alias=True),
        status_code=202,
        headers={"Location": f"/api/batches/{out.id}"},
    )


@router.get("", response_model=BatchPage)
def list_batches(
    user: CurrentUser,
    c: ContainerDep,
    limit: Annotated[int, Query(ge=1, le=50)] = 10,
    cursor: Annotated[str | None, Query(max_length=200)] = None,
) -> BatchPage:
    with c.db.session() as session:
        views, next_cursor = batches.page(session, user, limit=limit, cursor=cursor)
        return BatchPage(items=[BatchOut.of(v) for v in views], next_cursor=next_cursor)


@router.get("/{batch_id}", response_model=BatchOut)
def get_batch(batch_id: str, user: CurrentUser, c: ContainerDep) -> BatchOut:
    return batch_out(c, user, batch_id)


@router.post("/{batch_id}/cancel", response_model=BatchOut)
def cancel_batch(batch_id: str, user: CurrentUser, c: ContainerDep) -> BatchOut:
    """Items not finished are cancelled (a running one has its own task interrupted); every
    finished item keeps its images."""
    cancel_open_items(c, user, batch_id)
    return batch_out(c, user, batch_id)


def cancel_open_items(c: Container, user: User, batch_id: str) -> None:
    """Shared by the API and the page: each open item cancelled as a job is."""
    with c.db.session() as session:
        open_jobs = batches.mark_cancelled(session, user, batch_id)
    for job_id in open_jobs:
        with contextlib.suppress(Conflict):  # it finished meanwhile: it keeps its images
            cancel_job(c, user, job_id)


@router.get(
    "/{batch_id}/events",
    response_class=StreamingResponse,
    responses={200: {"content": {"text/event-stream": {}}}},
)
async def batch_events(batch_id: str, request: Request, user: CurrentUser, c: ContainerDep) -> Any:
    """Server-Sent Events: ``batch`` (state and counts) when they change, ``job`` for each
    item whose state changes, then ``done`` with the whole batch."""
    first = await run_in_threadpool(batch_out, c, user, batch_id)  # 404 before the stream

    seen: dict[str, str] = {}
    last: dict[str, Any] = {}

    def changes(current: BatchOut) -> list[tuple[str, Any]]:
        sent: list[tuple[str, Any]] = []
        for job in current.jobs:
            if seen.get(job.id) != job.state:
                seen[job.id] = job.state
                sent.append(("job", job.model_dump(mode="json", by_alias=True)))
        summary = {
            "state": current.state,
            "total": current.total,
            "succeeded": current.succeeded,
            "failed": current.failed,
            "cancelled": current.cancelled,
            "images": current.images,
        }
        if summary != last:
            last.update(summary)
            sent.append(("batch", summary))
        return sent

    def done(current: BatchOut) -> Any | None:
        final = current.state not in ("queued", "running")
        return current.model_dump(mode="json", by_alias=True) if final else None

    return polled_stream(
        first,
        lambda: batch_out(c, user, batch_id),
        changes,
        done,
        request,
        poll_seconds=_POLL_SECONDS,
    )


_POLL_SECONDS = 0.5
