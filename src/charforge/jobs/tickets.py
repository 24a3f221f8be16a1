"""What a queue needs to know about a committed job to deliver it."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from charforge.db.models import Job, utcnow
from charforge.domain.capabilities import Capability
from charforge.domain.params import GenerationParams
from charforge.domain.requirements import needs_of


@dataclass(frozen=True)
class JobTicket:
    id: str
    owner_id: int
    style: str
    checkpoint: str
    created_at: datetime
    not_before: datetime | None = None
    needs: frozenset[Capability] = frozenset()  # what its backend must be able to do

    @classmethod
    def of(cls, job: Job) -> JobTicket:
        return cls(
            job.id,
            job.owner_id,
            job.art_style,
            job.checkpoint,
            job.created_at,
            job.not_before,
            needs_of(GenerationParams.from_json(job.params)),
        )

    def wait_seconds(self) -> float:
        """How long a retry must still wait out its backoff."""
        if self.not_before is None:
            return 0.0
        return max(0.0, (self.not_before - utcnow()).total_seconds())
