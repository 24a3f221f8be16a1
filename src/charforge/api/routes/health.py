"""Liveness."""

from __future__ import annotations

from fastapi import APIRouter

from charforge import __version__
from charforge.api.deps import ContainerDep

router = APIRouter(tags=["health"])


@router.get("/healthz")
@router.get("/api/health")
def health(c: ContainerDep) -> dict[str, object]:
    return {"status": "ok", "version": __version__, "simulated": c.settings.demo}
