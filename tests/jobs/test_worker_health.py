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


def test_a_dead_workers_jobs_and_slots_come_back_without_waiting_for_the_lease(
    live_factory: Any, sims: tuple[A1111Simulator, A1111Simulator], redis_url: str
) -> None:
    from datetime import timedelta

    from redis import Redis

    from charforge.db import repositories as repo
    from charforge.db.models import utcnow
    from charforge.jobs.fleet_board import RedisSlots
    from tests.jobs.conftest import create_character, submit

    live = live_factory(sims[0].url, sims[1].url, broker_url=redis_url, job_lease=600)
    client = live.user("alice")
    character = create_character(client)
    job_id = submit(client, character)["id"]
    cli_job = submit(client, character)["id"]
    queues = worker_queues(live.container.table, None)
    alive = Heartbeat(redis_url, "alive:1", queues, 1)
    alive.start()
    try:
        # "dead:1" claimed the job (a lease good for ten more minutes) and holds a slot, then
        # was killed: its last heartbeat expired. "cli:1" (a command run without the broker's
        # URL: it never sends heartbeats) runs the other job and renews its lease.
        Heartbeat(redis_url, "dead:1", queues, 1, ttl=0.5, interval=0.2).beat()
        with live.container.db.session() as session:
            now = utcnow()
            for job, holder in ((job_id, "dead:1"), (cli_job, "cli:1")):
                assert repo.claim_job(
                    session, job, holder, "anime-cartoon-fantasy", now, now + timedelta(hours=1)
                )
        deadline = time.monotonic() + 5
        while Redis.from_url(redis_url).exists("charforge:worker:dead:1"):
            assert time.monotonic() < deadline
            time.sleep(0.05)
        dead_slots = RedisSlots(redis_url, ttl=600, owner="dead:1")
        mine = RedisSlots(redis_url, ttl=600, owner="alive:1")
        assert dead_slots.acquire("some-backend", 2) is not None
        assert mine.acquire("some-backend", 2) is not None
        assert dead_slots.acquire("some-backend", 2) is None  # both slots taken

        sweeper = live.container.queue._sweeper
        sweeper._slots = mine  # a worker's sweeper frees dead workers' slots
        moved, _ = sweeper.sweep()
        assert moved == 1
        # The command's job is left to its lease: taken back, it would run twice.
        kept = client.get(f"/api/jobs/{cli_job}").json()
        assert kept["state"] == "running" and len(kept["attemptHistory"]) == 1, kept
        job = client.get(f"/api/jobs/{job_id}").json()
        assert job["state"] in ("queued", "running", "succeeded")
        interrupted = job["attemptHistory"][0]
        assert interrupted["outcome"] == "interrupted" and interrupted["worker"] == "dead:1"
        assert "heartbeats" in interrupted["errorMessage"]
        assert dead_slots.acquire("some-backend", 2) is not None  # the dead one's slot is free
        keys = Redis.from_url(redis_url).keys("charforge:slot:*")
        assert len(keys) == 2
    finally:
        alive.stop()
