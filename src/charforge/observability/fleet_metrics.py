"""Distributed mode: every worker's metrics on every server's ``/metrics``.

Each worker writes its own Prometheus text to Redis (``charforge:metrics:<worker>``) with its
heartbeat, expiring with it. A server merges those into its own answer: one family per metric
name (so no HELP/TYPE line is repeated), each worker's samples labelled ``worker="<id>"``.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector
from redis import Redis
from redis.exceptions import RedisError

log = logging.getLogger(__name__)

PREFIX = "charforge:metrics:"


class _Fixed(Collector):
    def __init__(self, families: list[Metric]) -> None:
        self._families = families

    def collect(self) -> Iterator[Metric]:
        yield from self._families


def merge(own: bytes, workers: Iterable[tuple[str, bytes]]) -> bytes:
    """The server's own metrics plus each worker's, labelled with the worker."""
    families: dict[str, Metric] = {}
    sources: list[tuple[str | None, bytes]] = [(None, own), *workers]
    for worker, text in sources:
        try:
            parsed = list(text_string_to_metric_families(text.decode("utf-8")))
        except (ValueError, UnicodeDecodeError) as exc:  # one bad worker never hides the rest
            log.warning("unreadable metrics from worker %s: %s", worker, exc)
            continue
        for family in parsed:
            merged = families.setdefault(
                family.name, Metric(family.name, family.documentation, family.type)
            )
            for sample in family.samples:
                labels = (
                    dict(sample.labels) if worker is None else {**sample.labels, "worker": worker}
                )
                merged.add_sample(sample.name, labels, sample.value, sample.timestamp)
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Fixed(list(families.values())))
    return generate_latest(registry)


def publish(url: str, worker: str, text: bytes, ttl: float) -> None:
    """The worker's side: its current metrics, kept as long as its heartbeat."""
    client: Redis = Redis.from_url(url, socket_connect_timeout=2, socket_timeout=2)
    try:
        client.set(PREFIX + worker, text, px=int(ttl * 1000))
    finally:
        client.close()


def gather(url: str) -> list[tuple[str, bytes]]:
    """Every live worker's metrics (none when Redis does not answer: the server's own stay)."""
    client: Redis = Redis.from_url(url, socket_connect_timeout=2, socket_timeout=2)
    try:
        found = []
        for key in client.scan_iter(match=PREFIX + "*", count=100):
            text = client.get(key)
            if isinstance(text, bytes):
                name = key.decode() if isinstance(key, bytes) else str(key)
                found.append((name.removeprefix(PREFIX), text))
        return sorted(found)
    except RedisError as exc:
        log.warning("could not read the workers' metrics: %s", exc)
        return []
    finally:
        client.close()
