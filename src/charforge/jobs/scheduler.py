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


def plan(
    queued: Iterable[QueuedJob],
    free: list[FreeBackend],
    loaded_elsewhere: Iterable[str | None],
    *,
    now: float,
    fairness: Fairness,
    policy: Policy,
    healthy: set[str] | None = None,
) -> list[tuple[QueuedJob, str]]:
    """Assignments for this moment. ``free`` are healthy backends with a free slot (mutated
    as slots are handed out); ``loaded_elsewhere`` are the checkpoints of the busy ones;
    ``healthy`` are all healthy backends (for "does the job have another one to try")."""
    ready = sorted((j for j in queued if j.not_before <= now), key=lambda j: j.queued_at)
    if not ready or not any(b.free for b in free):
        return []
    up = healthy if healthy is not None else {b.name for b in free}
    holders: dict[str, int] = defaultdict(int)  # backends on each checkpoint, busy or free
    for loaded in loaded_elsewhere:
        if loaded:
            holders[model_name(loaded)] += 1
    for backend in free:
        if backend.key:
            holders[backend.key] += 1

    assigned: list[tuple[QueuedJob, str]] = []
    taken: set[str] = set()

    def allowed(job: QueuedJob, backend: FreeBackend) -> bool:
        if backend.name not in job.backends or job.id in taken:
            return False
        if backend.name in job.avoid:
            # Only when every healthy backend of its pool already failed it.
            return all(name in job.avoid for name in job.backends if name in up)
        return True

    def give(job: QueuedJob, backend: FreeBackend) -> None:
        if backend.key != job.key:
            if backend.key:
                holders[backend.key] -= 1
            holders[job.key] += 1
            backend.loaded = job.checkpoint
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
        candidates = [b for b in free if b.free and allowed(job, b)]
        if candidates:  # prefer one that has its checkpoint loaded
            give(job, min(candidates, key=lambda b: b.key != job.key))

    # 3. Free backends take jobs for what they have loaded.
    progress = True
    while progress:
        progress = False
        for backend in free:
            if not backend.free:
                continue
            same = [j for j in ready if j.key == backend.key and allowed(j, backend)]
            if same:
                give(fairest(same), backend)
                progress = True

    # 4. Still-free backends switch to where help is needed most: a checkpoint no backend is on,
    #    or the one with the most queued jobs per backend on it, if that is over the bar.
    for backend in free:
        while backend.free:
            waiting: dict[str, list[QueuedJob]] = defaultdict(list)
            for job in ready:
                if allowed(job, backend):
                    waiting[job.key].append(job)
            if not waiting:
                break

            def need(item: tuple[str, list[QueuedJob]]) -> tuple[float, float]:
                key, jobs = item
                per_holder = len(jobs) / holders[key] if holders[key] else float("inf")
                return (per_holder, -jobs[0].queued_at)  # older work breaks ties

            key, jobs = max(waiting.items(), key=need)
            if holders[key] and len(jobs) <= holders[key] * policy.jobs_per_holder:
                break  # the backends on it will get there soon; a switch would cost more
            give(fairest(jobs), backend)
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
