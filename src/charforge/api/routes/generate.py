"""POST /api/image-generation/generate: the original synchronous endpoint, on top of a Job."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

from charforge.api.deps import ContainerDep, CurrentUser
from charforge.api.errors import error_response
from charforge.api.schemas import GenerateOut, JobOut, brief, camel_params, identity_view
from charforge.container import Container
from charforge.db import images as image_rows
from charforge.db import repositories as repo
from charforge.db.models import User
from charforge.domain.params import GenerateBody
from charforge.errors import NotFound, error_from_code
from charforge.jobs.tickets import JobTicket
from charforge.services import generation, quotas

router = APIRouter(tags=["generation"])


def submit_generation(c: Container, user: User, body: GenerateBody, count: int = 1) -> JobTicket:
    with c.db.session() as session:
        job = generation.submit(
            session,
            user,
            body,
            c.table,
            c.settings.defaults,
            count=count,
            capabilities=c.pool.capabilities,
            limits=quotas.Limits.of(c.settings),
        )
        ticket = JobTicket.of(job)
    # the with-block has committed: only now may a worker see the job
    c.queue.submit(ticket)
    return ticket


def generation_outcome(c: Container, user: User, job_id: str) -> JSONResponse:
    with c.db.session() as session:
        job = repo.job(session, user.id, job_id)
        if job is None:
            raise NotFound(
                "The job is gone: its character was deleted while the image was being made.",
                field="characterId",
            )
        images = list(image_rows.images_of_job(session, job_id))
        if job.state == "succeeded":
            out = GenerateOut(
                job_id=job.id,
                character_id=job.character_id,
                art_style=job.art_style,
                model=job.checkpoint,
                # The hash of the weights that ran (what the images record), not what the
                # character remembers from an earlier run.
                model_hash=next((i.checkpoint_hash for i in images if i.checkpoint_hash), None),
                backend=job.backend,
                images=[brief(i) for i in images],
                parameters=camel_params(job.params),
                simulated=any(i.simulated for i in images),
                identity=identity_view(job.identity),
                style_transfer=job.style_transfer,
            )
            return JSONResponse(out.model_dump(mode="json", by_alias=True))
        if job.state == "failed":
            error = error_from_code(
                job.error_code or "internal_error",
                job.error_message or "The job failed.",
                hint=job.error_hint,
                field=job.error_field,
            )
            error.extra["jobId"] = job.id
            return error_response(error)
        pending = JobOut.of(job, images).model_dump(mode="json", by_alias=True)
    # Still queued or running after the wait: hand back the job to follow.
    return JSONResponse(pending, status_code=202, headers={"Location": f"/api/jobs/{job_id}"})


@router.post(
    "/api/image-generation/generate",
    response_model=GenerateOut,
    responses={202: {"model": JobOut, "description": "Still running after the wait"}},
)
async def generate(body: GenerateBody, user: CurrentUser, c: ContainerDep) -> JSONResponse:
    return await generate_and_wait(c, user, body)


async def generate_and_wait(c: Container, user: User, body: GenerateBody) -> JSONResponse:
    """Shared by the API and the Generate page: the same job, the same answer."""
    job_id = (await run_in_threadpool(submit_generation, c, user, body, body.count)).id
    await c.queue.wait_async(job_id, c.settings.generate_wait)
    return await run_in_threadpool(generation_outcome, c, user, job_id)
