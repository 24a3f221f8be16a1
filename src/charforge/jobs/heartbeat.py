"""Distributed mode: workers say they are alive, and which queues they consume, in Redis.

Each worker writes ``charforge:worker:<id>`` every ``INTERVAL`` seconds with a time to live of
``TTL``: a worker that dies (SIGKILL included) drops out within ``TTL`` without anyone cleaning
up. Servers read the keys for ``/readyz`` and ``charforge backends check``: a route whose queue
no live worker consumes is not ready, and says so, instead of its jobs waiting for ever.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from redis import Redis
from redis.exceptions import RedisError

log = logging.getLogger(__name__)

PREFIX = "charforge:worker:"
# A worker that has sent heartbeats: when they stop, it died and the jobs it holds are taken
# back at once. A process that never sent any (a CLI run without CHARFORGE_BROKER_URL) keeps
# its jobs while it renews their leases. Kept well past any job lease.
KNOWN_PREFIX = "charforge:worker-known:"
KNOWN_TTL = 24 * 3600.0
INTERVAL = 5.0
TTL = 15.0


@dataclass(frozen=True)
class LiveWorker:
    worker: str
    host: str
    queues: tuple[str, ...]
    concurrency: int
    seen: float  # the worker's clock when it last wrote (seconds since the epoch)


class Heartbeat:
    """The worker's side: a thread that renews its key until ``stop()`` deletes it."""

    def __init__(
        self,
        url: str,
        worker: str,
        queues: list[str],
        concurrency: int,
        *,
        interval: float = INTERVAL,
        ttl: float = TTL,
        metrics: Callable[[], bytes] | None = None,
    ) -> None:
        self._redis: Redis = Redis.from_url(url, socket_connect_timeout=2, socket_timeout=2)
        self._key = PREFIX + worker
        self._interval = interval
        self._ttl_ms = int(max(ttl, 2 * interval) * 1000)
        self._body: dict[str, Any] = {
            "worker": worker,
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "queues": queues,
            "concurrency": concurrency,
        }
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._metrics = metrics  # its Prometheus text, for the servers' /metrics
        self._url, self._worker = url, worker

    def beat(self) -> None:
        body = json.dumps({**self._body, "seen": time.time()})
        with self._redis.pipeline(transaction=False) as pipe:
            pipe.set(self._key, body, px=self._ttl_ms)
            pipe.set(KNOWN_PREFIX + self._worker, "1", px=int(KNOWN_TTL * 1000))
            pipe.execute()
        if self._metrics is not None:
            from charforge.observability.fleet_metrics import PREFIX as METRICS

            self._redis.set(METRICS + self._worker, self._metrics(), px=self._ttl_ms)

    def start(self) -> None:
        self.beat()
        self._thread = threading.Thread(target=self._loop, name="heartbeat", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop.wait(self._interval):
            try:
                self.beat()
            except RedisError as exc:  # the broker away for a moment: the next beat may pass
                log.warning("worker heartbeat failed: %s", exc)

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        with contextlib.suppress(RedisError):  # else its time to live ends it anyway
            self._redis.delete(self._key)
            if self._metrics is not None:
                from charforge.observability.fleet_metrics import PREFIX as METRICS

                self._redis.delete(METRICS + self._worker)
        self._redis.close()


def known_workers(url: str, workers: set[str]) -> set[str]:
    """Those of ``workers`` that have sent heartbeats (in the last day): a worker among them
    whose heartbeat is gone died. Raises RedisError when Redis is away."""
    if not workers:
        return set()
    names = sorted(workers)
    client: Redis = Redis.from_url(url, socket_connect_timeout=2, socket_timeout=2)
    try:
        found = client.mget([KNOWN_PREFIX + name for name in names])
    finally:
        client.close()
    return {name for name, value in zip(names, found, strict=True) if value is not None}


def live_workers(url: str) -> list[LiveWorker]:
    """Every worker whose heartbeat has not expired. Raises RedisError when Redis is away."""
    client: Redis = Redis.from_url(url, socket_connect_timeout=2, socket_timeout=2)
    try:
        found = []
        for key in client.scan_iter(match=PREFIX + "*", count=100):
            raw = client.get(key)
            if raw is None:
                continue  # expired between the scan and the read
            try:
                data = json.loads(raw)
                found.append(
                    LiveWorker(
                        str(data["worker"]),
                        str(data.get("host", "?")),
                        tuple(str(q) for q in data.get("queues", [])),
                        int(data.get("concurrency", 0)),
                        float(data.get("seen", 0.0)),
                    )
                )
            except (ValueError, KeyError, TypeError):
                log.warning("unreadable worker heartbeat under %r", key)
        return sorted(found, key=lambda w: w.worker)
    finally:
        client.close()
