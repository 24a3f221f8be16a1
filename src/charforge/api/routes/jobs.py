"""/api/jobs/{id}: follow a generation."""

from __future__ import annotations

from fastapi import APIRouter

from charforge.api.deps import ContainerDep, CurrentUser
from charforge.api.schemas import JobOut
from charforge.db import repositories as repo
from charforge.errors import NotFound

router = APIRouter(prefix="/api/jobs", tags=["jobs"])


@router.get("/{job_id}", response_model=JobOut)
def get_job(job_id: str, user: CurrentUser, c: ContainerDep) -> JobOut:
    with c.db.session() as session:
        job = repo.job(session, user.id, job_id)
        if job is None:
            raise NotFound(f"No job with id '{job_id}' among yours.", field="jobId")
        return JobOut.of(job, list(repo.images_of_job(session, job_id)))
