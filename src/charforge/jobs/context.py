"""What every process that runs jobs shares: database, backends, store, policies."""

from __future__ import annotations

import random
import threading
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from charforge.backends.pool import BackendPool
from charforge.db.engine import Database
from charforge.domain.routes import RouteTable
from charforge.observability.metrics import Metrics
from charforge.storage.files import ImageStore

if TYPE_CHECKING:
    from charforge.jobs.attempt import Renewer


@dataclass(frozen=True)
class RetryPolicy:
    max_attempts: int = 3
    backoff: float = 1.0  # first pause; doubles per attempt, with jitter
    backoff_max: float = 30.0

    def delay(self, attempt: int) -> float:
        """Exponential backoff with "equal jitter": half fixed, half random, so retries of
        many jobs that failed together do not hit the pool together again."""
        ceiling = min(self.backoff_max, self.backoff * 2.0 ** max(0, attempt - 1))
        jitter: float = random.uniform(0, ceiling / 2)  # noqa: S311 - not cryptographic
        return ceiling / 2 + jitter


@dataclass
class RunnerContext:
    db: Database
    pool: BackendPool
    table: RouteTable
    store: ImageStore
    metrics: Metrics
    worker: str  # who holds the leases this process takes (host:pid)
    lease: float = 60.0
    retry: RetryPolicy = RetryPolicy()
    # Attempts of this process (job id -> set when it must stop), waiting at their backend's
    # door or running: a cancel made here reaches them at once instead of at their next look
    # at the database, and before the backend knows their task.
    attempts: dict[str, threading.Event] = field(default_factory=dict)
    renewer: Renewer | None = None  # renews the leases of the attempts running here


def notice_cancel(ctx: RunnerContext, job_id: str) -> None:
    """The job was just cancelled (committed): its attempt in this process, if any, gives up
    waiting at its backend's door, sends nothing, or stops its task when it runs (the adapter
    watches the same event). The caller also interrupts the backend's task at once."""
    cancelled = ctx.attempts.get(job_id)
    if cancelled is not None:
        cancelled.set()
