"""Prometheus metrics. Each container has its own registry, so tests and several apps in one
process never mix their figures; job counts come from the database at scrape time, so every
server of a distributed deployment reports the same, true numbers."""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

JOB_STATES = ("queued", "running", "succeeded", "failed", "cancelled")
# A generation takes from a fraction of a second (a tiny model) to minutes (hires on a slow GPU).
_LATENCY_BUCKETS = (0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40, 60, 90, 120, 180, 300, 600)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.backend_seconds = Histogram(
            "charforge_backend_request_seconds",
            "Time a backend took to answer a generation, by outcome.",
            ["backend", "outcome"],
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.checkpoint_switches = Counter(
            "charforge_checkpoint_switches",
            "Times a backend had to load another checkpoint.",
            ["backend"],
            registry=self.registry,
        )
        self.retries = Counter(
            "charforge_job_retries",
            "Job attempts that failed and were tried again, by error code.",
            ["code"],
            registry=self.registry,
        )
        self.jobs_finished = Counter(
            "charforge_jobs_finished",
            "Jobs this process brought to a final state.",
            ["state"],
            registry=self.registry,
        )
        self.backend_up = Gauge(
            "charforge_backend_up",
            "1 while this process considers the backend healthy.",
            ["backend"],
            registry=self.registry,
        )
        self.in_flight = Gauge(
            "charforge_backend_in_flight",
            "Generations this process has running on the backend.",
            ["backend"],
            registry=self.registry,
        )

    def watch_jobs(
        self,
        by_state: Callable[[], dict[str, int]],
        queued_by_checkpoint: Callable[[], dict[str, int]],
    ) -> None:
        self.registry.register(_JobsCollector(by_state, queued_by_checkpoint))

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _JobsCollector(Collector):
    def __init__(
        self,
        by_state: Callable[[], dict[str, int]],
        queued_by_checkpoint: Callable[[], dict[str, int]],
    ) -> None:
        self._by_state = by_state
        self._queued = queued_by_checkpoint

    def collect(self) -> Iterator[GaugeMetricFamily]:
        states = GaugeMetricFamily(
            "charforge_jobs", "Jobs in the database by state.", labels=["state"]
        )
        counts = self._by_state()
        for state in JOB_STATES:
            states.add_metric([state], counts.get(state, 0))
        yield states
        depth = GaugeMetricFamily(
            "charforge_queue_depth",
            "Queued jobs waiting for each checkpoint.",
            labels=["checkpoint"],
        )
        for checkpoint, count in sorted(self._queued().items()):
            depth.add_metric([checkpoint], count)
        yield depth

    def describe(self) -> Iterator[GaugeMetricFamily]:
        return iter(())  # collected live: never describe, so registering does not query the DB
