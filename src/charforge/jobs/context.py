"""What every process that runs jobs shares: database, backends, store, policies."""

from __future__ import annotations

import logging
import random
import threading
import time
from dataclasses import dataclass, field
from typing import Protocol

from charforge.backends.pool import BackendPool
from charforge.db.engine import Database
from charforge.domain.routes import RouteTable
from charforge.observability.metrics import Metrics
from charforge.safety.screening import Screening, shared_screener
from charforge.storage.files import ImageStore

log = logging.getLogger(__name__)


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


class Renewable(Protocol):
    job_id: str

    def renew(self) -> None: ...


class Renewer:
    """One thread per process that renews the leases of every attempt running in it, every
    third of a lease (no thread is started per attempt: that would sit between one
    generation and the next on a backend). It ends when nothing runs and starts again with
    the next attempt."""

    def __init__(self, interval: float) -> None:
        self._interval = interval
        self._leases: set[Renewable] = set()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    def add(self, lease: Renewable) -> None:
        with self._lock:
            self._leases.add(lease)
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, name="leases", daemon=True)
                self._thread.start()

    def remove(self, lease: Renewable) -> None:
        with self._lock:
            self._leases.discard(lease)

    def _loop(self) -> None:
        while True:
            time.sleep(self._interval)
            with self._lock:
                leases = list(self._leases)
                if not leases:
                    self._thread = None
                    return
            for lease in leases:
                try:
                    lease.renew()
                except Exception:  # a database hiccup: the next renewal may work
                    log.exception("could not renew the lease of job %s", lease.job_id)


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
    screening: Screening = field(default_factory=lambda: Screening(0.8, shared_screener()))
    # Attempts of this process (job id -> set when it must stop), waiting at their backend's
    # door or running: a cancel made here reaches them at once instead of at their next look
    # at the database, and before the backend knows their task.
    attempts: dict[str, threading.Event] = field(default_factory=dict)
    renewer: Renewer = field(init=False)  # renews the leases of the attempts running here

    def __post_init__(self) -> None:
        self.renewer = Renewer(self.lease / 3)


def notice_cancel(ctx: RunnerContext, job_id: str) -> None:
    """The job was just cancelled (committed): its attempt in this process, if any, gives up
    waiting at its backend's door, sends nothing, or stops its task when it runs (the adapter
    watches the same event). The caller also interrupts the backend's task at once."""
    cancelled = ctx.attempts.get(job_id)
    if cancelled is not None:
        cancelled.set()
