"""Describe every style: label, emoji, checkpoint and the health of the backends serving it."""

from __future__ import annotations

from dataclasses import dataclass

from charforge.backends.pool import BackendPool
from charforge.domain.checkpoints import same_checkpoint
from charforge.domain.routes import RouteTable

CONSISTENCY_NOTE = "Images will be generated using the same model as the original character"


@dataclass(frozen=True)
class BackendHealth:
    name: str
    available: bool
    latency_ms: float | None
    error: str | None
    checkpoint_present: bool | None  # None when the backend could not be asked


@dataclass(frozen=True)
class StyleStatus:
    style: str
    label: str
    emoji: str
    checkpoint: str
    backend: str
    backends: list[BackendHealth]
    available: bool
    indicator: str
    note: str
    simulated: bool


def describe_styles(table: RouteTable, pool: BackendPool) -> list[StyleStatus]:
    names = sorted({name for route in table.routes.values() for name in route.backends})
    probes = pool.probe(names)
    out = []
    for route in table.routes.values():
        health = []
        for name in route.backends:
            probe = probes[name]
            present = (
                any(same_checkpoint(route.checkpoint, cp.name) for cp in probe.checkpoints)
                if probe.ok
                else None
            )
            health.append(
                BackendHealth(
                    name=name,
                    available=probe.ok,
                    latency_ms=round(probe.latency_ms, 1) if probe.latency_ms is not None else None,
                    error=probe.error,
                    checkpoint_present=present,
                )
            )
        out.append(
            StyleStatus(
                style=route.style,
                label=route.label,
                emoji=route.emoji,
                checkpoint=route.checkpoint,
                backend=route.backends[0],
                backends=health,
                available=any(h.available for h in health),
                indicator=route.indicator,
                note=CONSISTENCY_NOTE,
                simulated=any(table.backends[n].simulated for n in route.backends),
            )
        )
    return out
