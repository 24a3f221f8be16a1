"""Everything a running charforge needs, built from settings in one place (never at import)."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

from charforge.backends.pool import BackendPool
from charforge.config import Settings
from charforge.db.engine import Database, make_engine
from charforge.db.migrate import upgrade
from charforge.domain.routes import RouteTable, build_route_table
from charforge.jobs.inline import InlineJobQueue
from charforge.jobs.runner import RunnerContext, run_job
from charforge.storage.files import ImageStore

log = logging.getLogger(__name__)


@dataclass
class Container:
    settings: Settings
    table: RouteTable
    db: Database
    store: ImageStore
    pool: BackendPool
    queue: InlineJobQueue
    runner: RunnerContext
    # Things started alongside (demo simulators) that must stop with the container.
    companions: list[Any] = field(default_factory=list)
    started: bool = False

    def start(self) -> None:
        """Upgrade the database to the current schema, then start the workers."""
        upgrade(self.db.engine)
        self.queue.start()
        resumed = self.queue.recover(self.db)
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


def build_container(settings: Settings) -> Container:
    table = build_route_table(settings)
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    db = Database(make_engine(settings.effective_database_url))
    store = ImageStore(settings.data_dir)
    pool = BackendPool(table, probe_timeout=settings.probe_timeout)
    runner = RunnerContext(
        db=db, pool=pool, table=table, store=store, lease_wait=settings.backend_timeout
    )
    # At least one worker per backend, so a busy route never holds up an idle one.
    workers = max(settings.workers, len(table.backends))
    job_queue = InlineJobQueue(lambda job_id: run_job(runner, job_id), workers=workers)
    return Container(settings, table, db, store, pool, job_queue, runner)
