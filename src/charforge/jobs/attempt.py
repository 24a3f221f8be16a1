"""What one attempt of a job holds while it runs: a snapshot of the job, and its lease."""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from charforge.backends.base import Progress, task_id_of
from charforge.db import repositories as repo
from charforge.db.models import Job, utcnow
from charforge.domain.params import GenerationParams
from charforge.jobs.context import RunnerContext
from charforge.observability import logs

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class JobSnapshot:
    id: str
    number: int  # this attempt (0 until claimed)
    owner_id: int
    character_id: str
    style: str
    checkpoint: str
    checkpoint_hash: str | None
    params: GenerationParams
    count: int
    identity: dict[str, Any] | None = None  # the plan made at submit (services.identity_plan)
    style_transfer: dict[str, Any] | None = None

    @classmethod
    def of(cls, job: Job, number: int) -> JobSnapshot:
        return cls(
            job.id,
            number,
            job.owner_id,
            job.character_id,
            job.art_style,
            job.checkpoint,
            job.checkpoint_hash,
            GenerationParams.from_json(job.params),
            job.count or 1,
            job.identity,
            job.style_transfer,
        )


class LeaseKeeper:
    """Renews the attempt's lease (and its backend slot) while it runs; when the lease is gone
    (the job was cancelled, or a sweeper gave it away) it interrupts the attempt's task on the
    backend, and no other."""

    def __init__(
        self, ctx: RunnerContext, job: JobSnapshot, backend: str, cancelled: threading.Event
    ) -> None:
        self._ctx, self._job, self._backend = ctx, job, backend
        self.job_id = job.id
        self.task_id = task_id_of(job.id, job.number)
        self.cancelled = cancelled  # the attempt's stop: the adapter watches it too
        self.lost = False
        # Made in the attempt's thread; renew runs in the renewer's or a progress watcher's,
        # whose log lines (and the interrupt's) must still name this job.
        self._context = logs.CarriedContext()

    def start(self) -> None:
        self._ctx.renewer.add(self)

    def stop(self) -> None:
        self._ctx.renewer.remove(self)

    def renew(self) -> None:
        self._context.run(self._renew)

    def _renew(self) -> None:
        until = utcnow() + timedelta(seconds=self._ctx.lease)
        with self._ctx.db.session() as session:
            held = repo.renew_lease(
                session, self._job.id, self._job.number, self._ctx.worker, until
            )
        self._ctx.pool.renew(self._backend)
        if not held and not self.lost:
            self.lost = True
            self.cancelled.set()
            log.info(
                "job %s lost its lease (cancelled?); interrupting its task on %s",
                self._job.id,
                self._backend,
            )
            # Off this thread: the renewer serves every attempt, and a WebUI may be slow.
            logs.start_thread(
                self._ctx.pool.backends[self._backend].interrupt,
                self.task_id,
                name=f"interrupt-{self._job.id[:8]}",
            )

    def progress(self, update: Progress) -> None:
        with self._ctx.db.session() as session:
            held = repo.set_progress(
                session,
                self._job.id,
                self._job.number,
                self._ctx.worker,
                update.fraction,
                update.step,
                update.steps,
            )
        if not held and not self.lost:
            self.renew()  # find out why, and interrupt if the job is no longer ours
