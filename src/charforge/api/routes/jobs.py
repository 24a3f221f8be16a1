"""/api/jobs: submit generations without waiting, follow them (also as Server-Sent Events),
list and cancel them. The synchronous generate endpoint is a wait on the same jobs."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Query, Request
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.concurrency import run_in_threadpool

from charforge.api.deps import ContainerDep, CurrentUser
from charforge.api.routes.generate import submit_generation
from charforge.api.schemas import JobOut, JobPage
from charforge.api.sse import polled_stream
from charforge.backends.base import task_id_of
from charforge.container import Container
from charforge.db.models import User
from charforge.domain.params import JobBody
from charforge.jobs.runner import notice_cancel
from charforge.observability import logs
from charforge.services import jobs

router = APIRouter(prefix="/api/jobs", tags=["jobs"])


@router.post("", status_code=202, response_model=JobOut)
async def create_job(body: JobBody, user: CurrentUser, c: ContainerDep) -> JSONResponse:
    ticket = await run_in_threadpool(submit_generation, c, user, body, body.count)
    out = await run_in_threadpool(job_out, c, user, ticket.id)
    return JSONResponse(
        out.model_dump(mode="json", by_alias=True),
        status_code=202,
        headers={"Location": f"/api/jobs/{ticket.id}"},
    )


@router.get("", response_model=JobPage)
def list_jobs(
    user: CurrentUser,
    c: ContainerDep,
    state: Annotated[
        str | None, Query(description="Only jobs in these states, comma-separated.")
    ] = None,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
    cursor: str | None = None,
) -> JobPage:
    with c.db.session() as session:
        rows, next_cursor = jobs.page(session, user, states=state, limit=limit, cursor=cursor)
        return JobPage(items=[JobOut.of(row, []) for row in rows], next_cursor=next_cursor)


def job_out(c: Container, user: User, job_id: str) -> JobOut:
    with c.db.session() as session:
        return JobOut.of_view(jobs.view(session, user, job_id))


@router.get("/{job_id}", response_model=JobOut)
def get_job(job_id: str, user: CurrentUser, c: ContainerDep) -> JobOut:
    return job_out(c, user, job_id)


def cancel_job(c: Container, user: User, job_id: str) -> JobOut:
    """Shared by the API and the pages."""
    with c.db.session() as session:
        previous, backend, attempt = jobs.cancel(session, user, job_id)
    c.queue.forget(job_id)
    # An attempt of this process waiting at its backend's door gives up; a running one
    # stores nothing (it would also notice its lease is gone, a little later).
    notice_cancel(c.runner, job_id)
    if previous == "running" and backend in c.pool.backends:
        # Stop this job's work now, and only its own: the backend's task for this attempt.
        # The adapter's log lines about it name the job, not only the backend's task id.
        token = logs.job_id.set(job_id)
        try:
            c.pool.backends[backend].interrupt(task_id_of(job_id, attempt))
        finally:
            logs.job_id.reset(token)
    return job_out(c, user, job_id)


@router.post("/{job_id}/cancel", response_model=JobOut)
def cancel(job_id: str, user: CurrentUser, c: ContainerDep) -> JobOut:
    return cancel_job(c, user, job_id)


@router.get(
    "/{job_id}/events",
    response_class=StreamingResponse,
    responses={200: {"content": {"text/event-stream": {}}}},
)
async def job_events(job_id: str, request: Request, user: CurrentUser, c: ContainerDep) -> Any:
    first = await run_in_threadpool(job_out, c, user, job_id)  # 404 before the stream starts
    return event_stream(c, user, first, request)


def event_stream(c: Container, user: User, first: JobOut, request: Request) -> StreamingResponse:
    """Server-Sent Events for one job: ``state``, ``queue`` (position), ``progress`` (fraction
    and sampling step, where the backend reports them), and a last ``done`` carrying the whole
    job. Read from the database, so any server can stream a job any worker runs."""
    last: dict[str, Any] = {}

    def changes(current: JobOut) -> list[tuple[str, Any]]:
        now: dict[str, dict[str, Any]] = {
            "state": {
                "state": current.state,
                "attempt": current.attempts,
                "backend": current.backend,
            },
            "queue": {"position": current.queue_position},
            "progress": {
                "progress": current.progress,
                "step": current.step,
                "steps": current.steps,
            },
        }
        sent = [
            (name, data)
            for name, data in now.items()
            if last.get(name) != data and not (name == "queue" and data["position"] is None)
        ]
        last.update(now)
        return sent

    def done(current: JobOut) -> Any | None:
        final = current.state in jobs.FINAL
        return current.model_dump(mode="json", by_alias=True) if final else None

    return polled_stream(
        first,
        lambda: job_out(c, user, first.id),
        changes,
        done,
        request,
        poll_seconds=_POLL_SECONDS,
    )


_POLL_SECONDS = 0.25
