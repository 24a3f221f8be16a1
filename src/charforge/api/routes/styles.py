"""/api/styles: what each style resolves to, and whether its backend answers."""

from __future__ import annotations

from fastapi import APIRouter
from starlette.concurrency import run_in_threadpool

from charforge.api.deps import ContainerDep, CurrentUser
from charforge.api.schemas import StyleOut
from charforge.services.styles import describe_styles

router = APIRouter(tags=["styles"])


@router.get("/api/styles", response_model=list[StyleOut])
async def list_styles(_user: CurrentUser, c: ContainerDep) -> list[StyleOut]:
    statuses = await run_in_threadpool(describe_styles, c.table, c.pool)
    return [StyleOut.model_validate(status, from_attributes=True) for status in statuses]
