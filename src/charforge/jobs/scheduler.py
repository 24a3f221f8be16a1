"""Which queued job goes to which free backend: pure logic, no I/O, so it is tested directly.

Rules, in order:
1. A job waits out its retry backoff, and avoids backends that already failed it while the
   pool has others.
2. A job that has waited longer than ``max_wait`` goes to the first free backend of its route,
   whatever that backend has loaded (bounded wait: grouping never starves anyone).
3. A free backend takes a job for the checkpoint it has loaded (no switch).
4. Otherwise it switches to the checkpoint whose queued jobs have the fewest backends already
   on them, counting each backend as able to take ``jobs_per_holder`` jobs before help is
   worth a switch. So jobs for one checkpoint are grouped on as few backends as keeps up.
Within a checkpoint the next job is that of the user served least recently (fair between
users), then the oldest (FIFO).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Protocol

from charforge.domain.checkpoints import model_name


@dataclass(frozen=True)
class QueuedJob:
    id: str
    owner_id: int
    checkpoint: str
    backends: tuple[str, ...]  # the pool of the job's route
    queued_at: float  # seconds on one clock; FIFO and bounded wait use it
    not_before: float = 0.0  # backoff after a failed attempt
    avoid: frozenset[str] = frozenset()  # backends it already failed on

    @property
    def key(self) -> str:
        return model_name(self.checkpoint)


@dataclass
class FreeBackend:
    name: str
    free: int  # slots free now
    loaded: str | None  # checkpoint it has in memory (or is switching to)

    @property
    def key(self) -> str | None:
        return model_name(self.loaded) if self.loaded else None


@dataclass(frozen=True)
class Policy:
    max_wait: float = 120.0
    jobs_per_holder: int = 4


@dataclass
class Fairness:
    """Who was served when, and how many of each user's jobs run now."""

    last_served: dict[int, float] = field(default_factory=dict)
    running: dict[int, int] = field(default_factory=lambda: defaultdict(int))


class BackendView(Protocol):
    """What the planner reads of a backend's status (backends.pool.BackendStatus)."""

    @property
    def name(self) -> str: ...
    @property
    def healthy(self) -> bool: ...
    @property
    def idle_slots(self) -> int: ...
    @property
    def planned(self) -> str | None: ...


def split_backends(
    statuses: Iterable[BackendView], queued: Iterable[QueuedJob]
) -> tuple[list[FreeBackend], list[tuple[str, str | None]]]:
    """Healthy backends with a free slot, and what the others have (or will have) loaded.
    A job whose capable backends are all down still gets them: it then fails with the
    backend's own error after its attempts instead of waiting for ever (its pool is the
    part of its route's that can do what it asks, so a healthy backend without that does
    not count)."""
    by_name = {s.name: s for s in statuses}
    stranded = {
        pool
        for pool in {job.backends for job in queued}
        if not any(by_name[n].healthy for n in pool if n in by_name)
    }
    free: list[FreeBackend] = []
    busy: list[tuple[str, str | None]] = []
    for name, status in by_name.items():
        orphan = any(name in pool for pool in stranded)
        if status.idle_slots and (status.healthy or orphan):
            free.append(FreeBackend(name, status.idle_slots, status.planned))
        else:
            busy.append((name, status.planned))
    return free, busy


def plan(
    queued: Iterable[QueuedJob],
    free: list[FreeBackend],
    busy: Iterable[tuple[str, str | None]],
    *,
    now: float,
    fairness: Fairness,
    policy: Policy,
    healthy: set[str] | None = None,
) -> list[tuple[QueuedJob, str]]:
    """Assignments for this moment. ``free`` are usable backends with a free slot (mutated as
    slots are handed out); ``busy`` are (name, loaded checkpoint) of the others; ``healthy``
    are all healthy backends (to know whether a job has another one to try)."""
    ready = sorted((j for j in queued if j.not_before <= now), key=lambda j: j.queued_at)
    if not ready or not any(b.free for b in free):
        return []
    # Idle backends first: a job waits behind a running one (pipelining) only when no
    # backend that could take it is idle.
    free = sorted(free, key=lambda b: -b.free)
    up = healthy if healthy is not None else {b.name for b in free}
    # What every backend has (or is about to have) loaded, busy or free.
    on: dict[str, str | None] = {name: model_name(c) if c else None for name, c in busy}
    on.update({b.name: b.key for b in free})

    assigned: list[tuple[QueuedJob, str]] = []
    taken: set[str] = set()

    def allowed(job: QueuedJob, name: str) -> bool:
        if name not in job.backends or job.id in taken:
            return False
        if name in job.avoid:
            # Only when every healthy backend of its pool already failed it.
            return all(n in job.avoid for n in job.backends if n in up)
        return True

    def give(job: QueuedJob, backend: FreeBackend) -> None:
        if backend.key != job.key:
            backend.loaded = job.checkpoint
            on[backend.name] = job.key
        backend.free -= 1
        taken.add(job.id)
        fairness.last_served[job.owner_id] = now
        fairness.running[job.owner_id] += 1
        assigned.append((job, backend.name))

    def fairest(jobs: list[QueuedJob]) -> QueuedJob:
        return min(
            jobs,
            key=lambda j: (
                fairness.running[j.owner_id],
                fairness.last_served.get(j.owner_id, float("-inf")),
                j.queued_at,
            ),
        )

    # 2. Overdue jobs first, oldest first, on any free backend of their route.
    for job in ready:
        if now - job.queued_at < policy.max_wait:
            break
        candidates = [b for b in free if b.free and allowed(job, b.name)]
        if candidates:  # prefer one that has its checkpoint loaded, then an idle one
            give(job, min(candidates, key=lambda b: (b.key != job.key, -b.free)))

    # 3. Free backends take jobs for what they have loaded.
    progress = True
    while progress:
        progress = False
        for backend in free:
            if not backend.free:
                continue
            same = [j for j in ready if j.key == backend.key and allowed(j, backend.name)]
            if same:
                give(fairest(same), backend)
                progress = True

    # 4. Still-free backends switch to where help is needed most: a checkpoint no other
    #    backend that may run its jobs is on, or the one with the most queued jobs per such
    #    backend, if that is more than they get through soon.
    for backend in free:
        while backend.free:
            waiting: dict[str, list[QueuedJob]] = defaultdict(list)
            for job in ready:
                if allowed(job, backend.name):
                    waiting[job.key].append(job)

            def helpers(key: str, jobs: list[QueuedJob], me: str = backend.name) -> int:
                return sum(
                    1
                    for name, loaded in on.items()
                    if name != me and loaded == key and any(allowed(j, name) for j in jobs)
                )

            worth: list[tuple[float, float, list[QueuedJob]]] = []
            for key, jobs in waiting.items():
                others = helpers(key, jobs)
                if others and len(jobs) <= others * policy.jobs_per_holder:
                    continue  # the backends on it get there soon; a switch costs more
                per_helper = len(jobs) / others if others else float("inf")
                worth.append((per_helper, -jobs[0].queued_at, jobs))  # older work breaks ties
            if not worth:
                break
            give(fairest(max(worth, key=lambda w: (w[0], w[1]))[2]), backend)
    return assigned


def round_robin(
    queued: Iterable[QueuedJob], free: list[FreeBackend], *, cursor: list[int], order: list[str]
) -> list[tuple[QueuedJob, str]]:
    """The naive baseline the fleet benchmark compares with: the oldest job goes to the next
    backend in strict rotation (waiting for it if busy), whatever that backend has loaded."""
    assigned: list[tuple[QueuedJob, str]] = []
    by_name = {b.name: b for b in free}
    for job in sorted(queued, key=lambda j: j.queued_at):
        backend = by_name.get(order[cursor[0] % len(order)])
        if backend is None or not backend.free:
            break
        cursor[0] += 1
        backend.free -= 1
        assigned.append((job, backend.name))
    return assigned
