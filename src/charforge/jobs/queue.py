"""The JobQueue protocol: what the API needs from embedded (threads) and distributed
(Celery) modes alike. The job row is the truth; a queue only delivers job ids to runners."""

from __future__ import annotations

from typing import Protocol

from charforge.jobs.tickets import JobTicket


class JobQueue(Protocol):
    def start(self) -> None: ...

    def recover(self) -> int:
        """Take up jobs an earlier process left; returns how many are queued."""
        ...

    def submit(self, ticket: JobTicket) -> None:
        """Deliver a job whose row is committed (never before: a runner must find it)."""
        ...

    def submit_many(self, tickets: list[JobTicket]) -> None:
        """Deliver jobs committed together (a batch): in one go where the queue can."""
        ...

    def forget(self, job_id: str) -> None:
        """The job was cancelled while queued."""
        ...

    async def wait_async(self, job_id: str, timeout: float) -> bool:
        """True once the job reached a final state; False after ``timeout`` seconds."""
        ...

    def stop(self, timeout: float = 30.0) -> bool: ...
