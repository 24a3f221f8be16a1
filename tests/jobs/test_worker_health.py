"""Honest health in distributed mode: /readyz is 503 naming the queue no live worker consumes,
ready once a worker's heartbeat covers every queue, and not ready again once that worker is
gone (stopped, or killed: its heartbeat expires by itself)."""

from __future__ import annotations

import time
from typing import Any

from charforge.jobs.celery_queue import OTHER_QUEUE, queue_for, worker_queues
from charforge.jobs.heartbeat import Heartbeat
from charforge.simulator import A1111Simulator


def _ready(live: Any) -> tuple[int, dict[str, Any]]:
    response = live.anonymous().get("/readyz")
    return response.status_code, response.json()["checks"]


def test_readyz_names_the_queue_no_live_worker_consumes(
    live_factory: Any, sims: tuple[A1111Simulator, A1111Simulator], redis_url: str
) -> None:
    live = live_factory(sims[0].url, sims[1].url, broker_url=redis_url)
    status, checks = _ready(live)
    assert status == 503 and checks["broker"]["ok"]
    workers = checks["workers"]
    assert not workers["ok"] and workers["live"] == []
    assert queue_for("diving.safetensors") in workers["error"]
    assert "anime" in workers["error"] and "charforge worker" in workers["hint"]

    table = live.container.table
    # A worker that keeps to the anime checkpoint: the other queues still have none.
    anime = Heartbeat(redis_url, "w-anime", worker_queues(table, ["diving.safetensors"]), 2)
    anime.start()
    try:
        status, checks = _ready(live)
        assert status == 503
        assert queue_for("cyberrealistic.safetensors") in checks["workers"]["error"]
        assert OTHER_QUEUE in checks["workers"]["error"]
        assert queue_for("diving.safetensors") not in checks["workers"]["error"]

        # One that takes everything: ready.
        everything = Heartbeat(
            redis_url, "w-all", worker_queues(table, None), 4, interval=0.5, ttl=1.0
        )
        everything.beat()  # never renewed: as if it was killed right after
        status, checks = _ready(live)
        assert status == 200, checks
        assert {w["worker"] for w in checks["workers"]["live"]} == {"w-anime", "w-all"}
        time.sleep(2.2)  # its heartbeat expires by itself
        status, checks = _ready(live)
        assert status == 503 and [w["worker"] for w in checks["workers"]["live"]] == ["w-anime"]
    finally:
        anime.stop()
    status, checks = _ready(live)
    assert status == 503 and checks["workers"]["live"] == []
