"""Describe every style: label, emoji, checkpoint and the health of the backends serving it."""

from __future__ import annotations

from dataclasses import dataclass

from charforge.backends.pool import PROBE_CACHE_SECONDS, BackendPool
from charforge.domain.routes import RouteTable
from charforge.services.backend_checks import check_routes

CONSISTENCY_NOTE = "Images will be generated using the same model as the original character"


@dataclass(frozen=True)
class BackendHealth:
    name: str
    kind: str  # "a1111", "comfyui (custom workflow)", "runpod (comfyui worker)", "local"
    capabilities: list[str]
    available: bool
    latency_ms: float | None
    error: str | None
    checkpoint_present: bool | None  # None when the backend could not be asked
    routes: list[str]  # every style this backend serves (one server, one backend)
    identity_method: str | None  # how it conditions on reference images, where it can


@dataclass(frozen=True)
class StyleStatus:
    style: str
    label: str
    emoji: str
    checkpoint: str
    backend: str
    backends: list[BackendHealth]
    capabilities: list[str]  # what at least one backend of the route can do
    available: bool
    indicator: str
    note: str
    simulated: bool


def describe_styles(table: RouteTable, pool: BackendPool) -> list[StyleStatus]:
    out = []
    for check in check_routes(table, pool, max_age=PROBE_CACHE_SECONDS):
        route = check.route
        health = [
            BackendHealth(
                name=b.name,
                kind=b.kind,
                capabilities=b.capabilities,
                available=b.reachable,
                latency_ms=b.latency_ms,
                error=b.error,
                checkpoint_present=b.checkpoint_present,
                routes=b.routes,
                identity_method=b.identity_method,
            )
            for b in check.backends
        ]
        out.append(
            StyleStatus(
                style=route.style,
                label=route.label,
                emoji=route.emoji,
                checkpoint=route.checkpoint,
                backend=route.backends[0],
                backends=health,
                capabilities=sorted({c for h in health for c in h.capabilities}),
                available=any(h.available for h in health),
                indicator=route.indicator,
                note=CONSISTENCY_NOTE,
                simulated=any(table.backends[n].simulated for n in route.backends),
            )
        )
    return out
