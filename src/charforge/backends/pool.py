"""Backends by name, with one request in flight per A1111 instance.

A1111 runs one generation at a time and lets further requests hang inside their HTTP call,
so charforge queues them itself: a job leases a free backend of its route, or waits.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

from charforge.backends.a1111 import A1111Backend
from charforge.backends.base import ImageBackend, ProbeResult
from charforge.domain.routes import BackendSpec, Route, RouteTable
from charforge.errors import BackendTimeout

_PROBE_CACHE_SECONDS = 5.0


def build_backend(spec: BackendSpec, probe_timeout: float) -> ImageBackend:
    if spec.kind == "a1111":
        return A1111Backend(spec, probe_timeout=probe_timeout)
    raise ValueError(f"backend '{spec.name}': unknown kind '{spec.kind}'")


class BackendPool:
    def __init__(
        self,
        table: RouteTable,
        *,
        probe_timeout: float = 3.0,
        factory: Callable[[BackendSpec, float], ImageBackend] = build_backend,
    ) -> None:
        self.table = table
        self.backends: dict[str, ImageBackend] = {
            name: factory(spec, probe_timeout) for name, spec in table.backends.items()
        }
        self._busy: dict[str, int] = dict.fromkeys(self.backends, 0)
        self._free = threading.Condition()
        self._probes: dict[str, tuple[float, ProbeResult]] = {}
        self._probe_lock = threading.Lock()

    def in_flight(self, name: str) -> int:
        with self._free:
            return self._busy[name]

    @contextmanager
    def lease(self, route: Route, *, wait: float) -> Iterator[ImageBackend]:
        """The least busy idle backend of the route; waits up to ``wait`` seconds for one."""
        deadline = time.monotonic() + wait
        with self._free:
            while True:
                idle = [name for name in route.backends if self._busy[name] == 0]
                if idle:
                    chosen = idle[0]
                    self._busy[chosen] += 1
                    break
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    names = ", ".join(route.backends)
                    raise BackendTimeout(
                        f"Every backend of the {route.style} style ({names}) stayed busy for "
                        f"{wait:g}s.",
                        hint="Add backends to the route's pool or raise CHARFORGE_BACKEND_TIMEOUT.",
                    )
                self._free.wait(remaining)
        try:
            yield self.backends[chosen]
        finally:
            with self._free:
                self._busy[chosen] -= 1
                self._free.notify_all()

    def probe(self, names: list[str]) -> dict[str, ProbeResult]:
        """Health of the named backends, probed concurrently, cached for a few seconds."""
        now = time.monotonic()
        with self._probe_lock:
            stale = [
                n
                for n in names
                if n not in self._probes or now - self._probes[n][0] > _PROBE_CACHE_SECONDS
            ]
        if stale:
            with ThreadPoolExecutor(max_workers=min(8, len(stale))) as executor:
                results = dict(
                    zip(stale, executor.map(lambda n: self.backends[n].probe(), stale), strict=True)
                )
            with self._probe_lock:
                for name, result in results.items():
                    self._probes[name] = (time.monotonic(), result)
        with self._probe_lock:
            return {n: self._probes[n][1] for n in names}

    def close(self) -> None:
        for backend in self.backends.values():
            backend.close()
