"""Every backend of every route, with what the scheduler needs to know about each.

A backend is a server, whatever it was called (route tables merge names of one server).
Per backend: slots for the jobs given to it, a door that lets one generation in at a time
(A1111 runs one at a time and lets further requests hang inside their HTTP call, where they
can be neither followed nor withdrawn), health (marked down after consecutive failures,
probed again with a doubling pause), and the checkpoint it has loaded.

Pipelining: with ``pipeline`` on, a backend takes a second job while one runs. That job is
prepared (its checkpoint found) and waits at the door, still queued; it is claimed and goes
in the moment the running one has answered and been checked, and charforge stores the first
one's images while the GPU works on the second. It waits in charforge, not in the
WebUI's queue: there it could not be withdrawn, and its start would clear the WebUI's
interrupted flag before the previous task's result could be checked.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import Protocol

from charforge.backends.a1111 import A1111Backend
from charforge.backends.base import ImageBackend, ProbeResult
from charforge.domain.capabilities import Capability
from charforge.domain.checkpoints import same_checkpoint, strip_hash
from charforge.domain.requirements import capable_backends
from charforge.domain.routes import BackendSpec, Route, RouteTable
from charforge.errors import BackendTimeout
from charforge.observability.metrics import Metrics

log = logging.getLogger(__name__)
PROBE_CACHE_SECONDS = 5.0


def build_backend(spec: BackendSpec, probe_timeout: float) -> ImageBackend:
    # Imported on use: a process only loads the adapters its configuration names (the
    # local engine's module imports torch only when it first generates).
    if spec.kind == "a1111":
        return A1111Backend(spec, probe_timeout=probe_timeout)
    if spec.kind == "comfyui":
        from charforge.backends.comfyui import ComfyUIBackend

        return ComfyUIBackend(spec, probe_timeout=probe_timeout)
    if spec.kind == "runpod":
        from charforge.backends.runpod import RunPodBackend

        return RunPodBackend(spec, probe_timeout=probe_timeout)
    if spec.kind == "local":
        from charforge.backends.local import LocalBackend

        return LocalBackend(spec, probe_timeout=probe_timeout)
    raise ValueError(f"backend '{spec.name}': unknown kind '{spec.kind}'")


@dataclass(frozen=True)
class HealthPolicy:
    interval: float = 15.0  # seconds between probes of a healthy backend
    failures: int = 3  # consecutive failures that mark a backend down
    backoff_max: float = 300.0  # longest pause between probes of a down backend


@dataclass
class BackendStatus:
    """What the pool knows about one backend now (copies are handed out)."""

    name: str
    limit: int = 1
    in_flight: int = 0
    healthy: bool = True  # until shown otherwise: a fresh start must not refuse work
    failures: int = 0
    down_for: float = 0.0  # the current pause between probes while down
    next_probe: float = 0.0  # monotonic time
    loaded: str | None = None
    latency_ms: float | None = None
    last_error: str | None = None
    checked: bool = False  # probed or used at least once
    # A checkpoint that failed to load: until a load succeeds, what the backend reports as
    # loaded is not trusted (A1111 names the file it failed on).
    load_failed: str | None = None
    # The checkpoint of the last job given to it: what it will have loaded once the jobs it
    # holds (one may wait at its door) are done. The scheduler plans with this.
    upcoming: str | None = None
    # Found missing at its last probe (see ProbeResult.lacking), and how it conditions on
    # reference images where it can.
    lacking: frozenset[Capability] = frozenset()
    identity_method: str | None = None

    @property
    def planned(self) -> str | None:
        return self.upcoming or self.loaded

    @property
    def idle_slots(self) -> int:
        return max(0, self.limit - self.in_flight)


class SlotGuard(Protocol):
    """Limits requests in flight across processes (distributed mode); see jobs.redis_slots."""

    def acquire(self, backend: str, limit: int) -> str | None: ...

    def renew(self, backend: str, token: str) -> None: ...

    def release(self, backend: str, token: str) -> None: ...

    def swap_loaded(self, backend: str, checkpoint: str) -> str | None:
        """Record, for every process, what the backend now renders with; returns what the
        record said before (None: nothing yet)."""
        ...

    def forget_loaded(self, backend: str) -> None: ...


class BackendPool:
    def __init__(
        self,
        table: RouteTable,
        *,
        probe_timeout: float = 3.0,
        health: HealthPolicy | None = None,
        metrics: Metrics | None = None,
        slots: SlotGuard | None = None,
        factory: Callable[[BackendSpec, float], ImageBackend] = build_backend,
        pipeline: bool = False,
    ) -> None:
        self.table = table
        self.health = health or HealthPolicy()
        self.metrics = metrics or Metrics()
        self._slots = slots
        self.backends: dict[str, ImageBackend] = {
            name: factory(spec, probe_timeout) for name, spec in table.backends.items()
        }
        limit = 2 if pipeline else 1  # one generating, one waiting at the door
        self._status = {name: BackendStatus(name, limit=limit) for name in self.backends}
        self._tokens: dict[str, list[str]] = {name: [] for name in self.backends}
        self._doors = {name: threading.Lock() for name in self.backends}
        self._door_tokens: dict[str, str] = {}
        self._changed = threading.Condition()
        self._listeners: list[Callable[[], None]] = []
        self._probes: dict[str, tuple[float, ProbeResult]] = {}
        self._probe_lock = threading.Lock()
        self._monitor: threading.Thread | None = None
        self._stop = threading.Event()

    # -- state -----------------------------------------------------------------------------

    def status(self, name: str) -> BackendStatus:
        with self._changed:
            return replace(self._status[name])

    def statuses(self, names: Iterable[str] | None = None) -> list[BackendStatus]:
        with self._changed:
            return [replace(self._status[n]) for n in (names or self._status)]

    def capabilities(self, name: str) -> frozenset[Capability]:
        """What the backend can do: its kind's capabilities less what its probe found missing."""
        return self.backends[name].spec.capabilities - self.status(name).lacking

    def in_flight(self, name: str) -> int:
        return self.status(name).in_flight

    def on_change(self, listener: Callable[[], None]) -> None:
        """Called (outside the pool's lock) when a backend frees up or its health changes."""
        self._listeners.append(listener)

    def _notify(self) -> None:
        with self._changed:
            self._changed.notify_all()
        for listener in self._listeners:
            listener()

    # -- slots -----------------------------------------------------------------------------

    def try_acquire(self, name: str) -> bool:
        """Take one of the backend's slots if one is free (here and, if shared, everywhere)."""
        with self._changed:
            status = self._status[name]
            if status.in_flight >= status.limit:
                return False
            status.in_flight += 1
        if self._slots is not None:
            token = self._slots.acquire(self._key(name), self._status[name].limit)
            if token is None:  # another worker process holds it
                with self._changed:
                    self._status[name].in_flight -= 1
                return False
            with self._changed:
                self._tokens[name].append(token)
        self.metrics.in_flight.labels(name).set(self.in_flight(name))
        return True

    def _key(self, name: str) -> str:
        """The backend's name in shared slots: its identity, so that every worker, whatever
        its configuration calls the server, counts the same slots."""
        return self.table.backends[name].key

    def _door_key(self, name: str) -> str:
        return self._key(name) + ":door"

    def renew(self, name: str) -> None:
        if self._slots is not None:
            with self._changed:
                tokens = list(self._tokens[name])
                door = self._door_tokens.get(name)
            for token in tokens:
                self._slots.renew(self._key(name), token)
            if door is not None:
                self._slots.renew(self._door_key(name), door)

    def note_upcoming(self, name: str, checkpoint: str) -> None:
        """A job for ``checkpoint`` was given to the backend (it may wait at the door)."""
        with self._changed:
            self._status[name].upcoming = strip_hash(checkpoint)

    def release(self, name: str) -> None:
        token = None
        with self._changed:
            self._status[name].in_flight -= 1
            if self._status[name].in_flight == 0:
                self._status[name].upcoming = None  # nothing held: what is loaded is what is
            if self._tokens[name]:
                token = self._tokens[name].pop()
        if self._slots is not None and token is not None:
            self._slots.release(self._key(name), token)
        self.metrics.in_flight.labels(name).set(self.in_flight(name))
        self._notify()

    def choose(
        self,
        route: Route,
        checkpoint: str,
        avoid: Iterable[str] = (),
        needs: frozenset[Capability] = frozenset(),
    ) -> str | None:
        """Where a job should go when there is no scheduler to ask: a healthy backend with a
        free slot that can do what the job needs, preferring one that has the checkpoint
        loaded and one not tried before."""
        avoided = set(avoid)
        names = capable_backends(route, self.table, needs)
        with self._changed:
            candidates = [
                self._status[n]
                for n in names
                if self._status[n].healthy and self._status[n].idle_slots > 0
            ]
        if not candidates:
            return None
        candidates.sort(
            key=lambda s: (
                s.name in avoided,
                not (s.loaded and same_checkpoint(s.loaded, checkpoint)),
                s.in_flight,
            )
        )
        return candidates[0].name

    @contextmanager
    def lease(
        self,
        route: Route,
        checkpoint: str,
        *,
        wait: float,
        avoid: Iterable[str] = (),
        needs: frozenset[Capability] = frozenset(),
        waiting: Callable[[], None] | None = None,
    ) -> Iterator[ImageBackend]:
        """A backend of the route picked by ``choose`` and held; waits up to ``wait`` seconds
        (calling ``waiting`` now and then meanwhile)."""
        deadline = time.monotonic() + wait
        avoided = tuple(avoid)
        while True:
            if waiting is not None:
                waiting()
            name = self.choose(route, checkpoint, avoided, needs)
            if name is not None and self.try_acquire(name):
                break
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                names = ", ".join(capable_backends(route, self.table, needs)) or "none"
                able = f" able to do {', '.join(sorted(needs))}" if needs else ""
                raise BackendTimeout(
                    f"No backend of the {route.style} style{able} ({names}) was free and "
                    f"healthy within {wait:g}s.",
                    hint="Add backends to the route's pool, or run `charforge backends` to see "
                    "which are down.",
                )
            with self._changed:
                # Slots held by other processes free up without a notification: poll.
                self._changed.wait(min(remaining, 0.5))
        try:
            yield self.backends[name]
        finally:
            self.release(name)

    @contextmanager
    def door(self, name: str, *, give_up: Callable[[], bool] | None = None) -> Iterator[bool]:
        """Hold the backend's door: one generation at a time goes in (across processes too,
        when slots are shared). Yields False when ``give_up`` said so while waiting (the job
        was cancelled meanwhile): the caller then sends nothing."""
        lock = self._doors[name]
        while not lock.acquire(timeout=0.2):
            if give_up is not None and give_up():
                yield False
                return
        token = None
        try:
            if self._slots is not None:
                # Another process's job may be inside: wait for it (no notification crosses
                # processes, so poll briefly).
                while (token := self._slots.acquire(self._door_key(name), 1)) is None:
                    if give_up is not None and give_up():
                        yield False
                        return
                    time.sleep(0.005)
                with self._changed:
                    self._door_tokens[name] = token
            yield True
        finally:
            if token is not None:
                with self._changed:
                    self._door_tokens.pop(name, None)
                assert self._slots is not None
                self._slots.release(self._door_key(name), token)
            lock.release()

    # -- health ----------------------------------------------------------------------------

    def record_success(self, name: str, seconds: float, checkpoint: str | None) -> None:
        with self._changed:
            status = self._status[name]
            recovered = not status.healthy
            status.healthy, status.failures, status.down_for = True, 0, 0.0
            status.last_error = None
            status.checked = True
            status.load_failed = None  # it loaded and ran a checkpoint: trust it again
            switched = self._set_loaded(status, checkpoint)
        self.metrics.backend_seconds.labels(name, "succeeded").observe(seconds)
        self.metrics.backend_up.labels(name).set(1)
        if switched and self._slots is None:  # shared: counted in note_rendering
            self.metrics.checkpoint_switches.labels(name).inc()
        if recovered:
            log.info("backend %s is healthy again", name)
            self._notify()

    def record_failure(self, name: str, error: str, seconds: float | None = None) -> None:
        """A fault that says something about the backend's health (not a bad request)."""
        with self._changed:
            status = self._status[name]
            status.failures += 1
            status.last_error = error
            status.checked = True
            went_down = status.healthy and status.failures >= self.health.failures
            if went_down:
                status.healthy = False
                status.down_for = min(self.health.interval, self.health.backoff_max)
                status.next_probe = time.monotonic() + status.down_for
        if seconds is not None:
            self.metrics.backend_seconds.labels(name, "failed").observe(seconds)
        if went_down:
            self.metrics.backend_up.labels(name).set(0)
            log.warning(
                "backend %s marked down after %d failures: %s", name, status.failures, error
            )
            self._notify()

    def note_load_failed(self, name: str, checkpoint: str) -> None:
        """A checkpoint failed to load: the backend's own report of what is loaded is not
        trusted until a generation succeeds (A1111 names the file it failed on)."""
        with self._changed:
            status = self._status[name]
            status.load_failed = strip_hash(checkpoint)
            status.loaded = None
        with self._probe_lock:
            cached = self._probes.get(name)
            if cached is not None:
                self._probes[name] = (cached[0], replace(cached[1], loaded=None))
        if self._slots is not None:
            try:
                self._slots.forget_loaded(self._key(name))
            except Exception as exc:  # the next render records it again
                log.warning("backend %s: could not clear its checkpoint record (%s)", name, exc)
        log.warning("backend %s failed to load %s", name, checkpoint)

    def note_loaded(self, name: str, checkpoint: str | None) -> None:
        with self._changed:
            if self._status[name].load_failed is not None:
                return  # not to be believed until a generation succeeds
            switched = self._set_loaded(self._status[name], checkpoint)
        if switched and self._slots is None:
            self.metrics.checkpoint_switches.labels(name).inc()

    def note_rendering(self, name: str, checkpoint: str) -> None:
        """The backend is about to render with ``checkpoint`` (A1111 switches to it first).
        With slots shared across processes, the switch is counted against the fleet's record
        of what the backend has loaded, which another worker may have changed meanwhile;
        this process's own view would miss or invent switches."""
        if self._slots is None:
            self.note_loaded(name, checkpoint)
            return
        checkpoint = strip_hash(checkpoint)
        try:
            previous = self._slots.swap_loaded(self._key(name), checkpoint)
        except Exception as exc:  # only a metric rides on it: never fail the job for it
            log.warning("backend %s: could not record its checkpoint for the fleet (%s)", name, exc)
            previous = None
        with self._changed:
            status = self._status[name]
            if previous is None:  # the first job anyone runs there: this process's probe
                previous = status.loaded
            if status.load_failed is None:
                status.loaded = checkpoint
        if previous and not same_checkpoint(previous, checkpoint):
            self.metrics.checkpoint_switches.labels(name).inc()

    @staticmethod
    def _set_loaded(status: BackendStatus, checkpoint: str | None) -> bool:
        if not checkpoint:
            return False
        checkpoint = strip_hash(checkpoint)
        switched = status.loaded is not None and not same_checkpoint(status.loaded, checkpoint)
        status.loaded = checkpoint
        return switched

    def apply_probe(self, name: str, result: ProbeResult) -> None:
        now = time.monotonic()
        with self._changed:
            if self._status[name].load_failed is not None:
                result = replace(result, loaded=None)
        with self._probe_lock:
            self._probes[name] = (now, result)
        with self._changed:
            status = self._status[name]
            status.checked = True
            changed = status.healthy != result.ok
            if result.ok:
                # Answering a probe revives a backend that was down; it does not erase the
                # generation failures of one that is up (a WebUI can list its models and
                # still fail every txt2img, e.g. out of GPU memory).
                if not status.healthy:
                    status.healthy, status.failures, status.down_for = True, 0, 0.0
                    status.last_error = None
                status.latency_ms = result.latency_ms
                status.next_probe = now + self.health.interval
                if result.lacking is not None:
                    status.lacking = result.lacking
                    status.identity_method = result.identity_method
                if result.loaded and status.in_flight == 0:
                    # Busy backends report what they are switching to themselves.
                    status.loaded = strip_hash(result.loaded)
            else:
                status.failures += 1
                status.last_error = result.error
                if status.healthy and status.failures < self.health.failures:
                    changed = False
                    status.next_probe = now + min(self.health.interval, 2.0)
                else:
                    status.healthy = False
                    status.down_for = min(
                        max(status.down_for * 2, min(self.health.interval, 1.0)),
                        self.health.backoff_max,
                    )
                    status.next_probe = now + status.down_for
        self.metrics.backend_up.labels(name).set(1 if self.status(name).healthy else 0)
        if changed:
            log.log(
                logging.INFO if result.ok else logging.WARNING,
                "backend %s is %s%s",
                name,
                "healthy" if result.ok else "down",
                "" if result.ok else f": {result.error}",
            )
            self._notify()

    def probe(
        self, names: list[str], *, max_age: float = PROBE_CACHE_SECONDS
    ) -> dict[str, ProbeResult]:
        """Health of the named backends, probed concurrently, reused for ``max_age`` seconds."""
        now = time.monotonic()
        with self._probe_lock:
            stale = [
                n for n in names if n not in self._probes or now - self._probes[n][0] > max_age
            ]
        if stale:
            with ThreadPoolExecutor(min(8, len(stale)), thread_name_prefix="probe") as executor:
                results = list(executor.map(lambda n: self.backends[n].probe(), stale))
            for name, result in zip(stale, results, strict=True):
                self.apply_probe(name, result)
        with self._probe_lock:
            return {n: self._probes[n][1] for n in names}

    def start_monitor(self) -> None:
        """Probe each backend in the background: healthy ones every ``interval``, down ones
        with a pause that doubles up to ``backoff_max``."""
        if self._monitor is not None or not self.backends:
            return
        self._stop.clear()
        self._monitor = threading.Thread(target=self._monitor_loop, name="health", daemon=True)
        self._monitor.start()

    def _monitor_loop(self) -> None:
        while not self._stop.wait(0.25):
            now = time.monotonic()
            with self._changed:
                due = [s.name for s in self._status.values() if s.next_probe <= now]
                for name in due:  # not again until this probe has answered
                    self._status[name].next_probe = now + self.health.backoff_max
            if due:
                try:
                    self.probe(due, max_age=0.0)
                except Exception:  # a probe must never end the monitor
                    log.exception("health probe failed")

    def close(self) -> None:
        self._stop.set()
        if self._monitor is not None:
            self._monitor.join(timeout=5)
            self._monitor = None
        for backend in self.backends.values():
            backend.close()
