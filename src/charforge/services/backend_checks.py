"""Ask every backend of every route whether it answers and has the route's checkpoint.

Shared by ``GET /api/styles`` and ``charforge backends check``.
"""

from __future__ import annotations

from dataclasses import dataclass

from charforge.backends.pool import BackendPool
from charforge.domain.capabilities import Capability
from charforge.domain.checkpoints import find_checkpoint_named
from charforge.domain.routes import Route, RouteTable


@dataclass(frozen=True)
class BackendCheck:
    name: str
    kind: str  # as a user reads it: "comfyui (custom workflow)", "runpod (a1111 worker)", ...
    capabilities: list[str]
    reachable: bool
    latency_ms: float | None
    error: str | None
    # None where it cannot be known: the backend did not answer, or cannot list its models
    checkpoint_present: bool | None
    checkpoint_hash: str | None
    loaded: str | None
    # One server is one backend, whichever routes (and names) it serves.
    routes: list[str]
    aliases: list[str]
    load_failed: str | None  # a checkpoint that failed to load (its report is not trusted)
    # How it conditions on reference images ("controlnet reference_only", ...); None: it
    # cannot (see capabilities), or its probe did not say.
    identity_method: str | None = None

    @property
    def working(self) -> bool:
        return self.reachable and self.checkpoint_present is not False


@dataclass(frozen=True)
class RouteCheck:
    route: Route
    backends: list[BackendCheck]

    @property
    def working(self) -> bool:
        return any(b.working for b in self.backends)


def check_routes(table: RouteTable, pool: BackendPool, *, max_age: float = 5.0) -> list[RouteCheck]:
    names = sorted({name for route in table.routes.values() for name in route.backends})
    probes = pool.probe(names, max_age=max_age)
    checks = []
    status = {s.name: s for s in pool.statuses(names)}
    for route in table.routes.values():
        rows = []
        for name in route.backends:
            probe, spec = probes[name], table.backends[name]
            match = find_checkpoint_named(route.checkpoint, probe.checkpoints, lambda c: c.name)
            listed = probe.ok and Capability.CHECKPOINT_LIST in spec.capabilities
            rows.append(
                BackendCheck(
                    name=name,
                    kind=spec.label,
                    capabilities=sorted(pool.capabilities(name)),
                    reachable=probe.ok,
                    latency_ms=round(probe.latency_ms, 1) if probe.latency_ms is not None else None,
                    error=probe.error,
                    checkpoint_present=(match is not None) if listed else None,
                    checkpoint_hash=match.hash if match else None,
                    loaded=probe.loaded,
                    routes=table.routes_of(name),
                    aliases=list(spec.aliases),
                    load_failed=status[name].load_failed,
                    identity_method=status[name].identity_method,
                )
            )
        checks.append(RouteCheck(route, rows))
    return checks
