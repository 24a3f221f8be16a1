"""Distributed mode for real: two `charforge serve` and two `charforge worker` processes on
PostgreSQL and Redis (Celery), one worker killed with SIGKILL in the middle of the work."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import select

from charforge.config import Settings
from charforge.container import build_runner
from charforge.db.migrate import upgrade
from charforge.db.models import JobAttempt
from charforge.services import users
from charforge.simulator import A1111Simulator
from tests.helpers import free_port
from tests.jobs.conftest import assert_exactly_the_images_asked_for, count_states, submit
from tests.processes import Process, clean_env

JOBS = 30


@pytest.mark.timeout(300)
def test_two_servers_and_two_workers_survive_a_killed_worker(
    tmp_path: Path,
    postgres_url: str,
    redis_url: str,
    sims: tuple[A1111Simulator, A1111Simulator],
    pool: tuple[A1111Simulator, A1111Simulator],
    processes: list[Process],
    finalizers: list[Any],
) -> None:
    for sim in (sims[0], *pool):
        sim.faults.delay_seconds = 0.3
    shared = tmp_path / "shared-images"  # the image store every process mounts
    env = clean_env(
        CHARFORGE_DATA_DIR=str(shared),
        CHARFORGE_DATABASE_URL=postgres_url,
        CHARFORGE_BROKER_URL=redis_url,
        CHARFORGE_JOB_LEASE="3",
        CHARFORGE_RETRY_BACKOFF="0.2",
        RUNPOD_REALISTIC_URL=sims[0].url,
        RUNPOD_ANIME_CARTOON_FANTASY_URL=f"{pool[0].url},{pool[1].url}",
    )
    runner = build_runner(Settings(data_dir=shared, database_url=postgres_url))
    finalizers.extend((runner.db.dispose, runner.pool.close))
    upgrade(runner.db.engine)
    with runner.db.session() as session:
        owner = users.create_user(session, "alice", "password-alice")
        _, token = users.create_token(session, owner, "test")

    ports = [free_port(), free_port()]
    for index, port in enumerate(ports):
        server = Process(f"server-{index}", ["serve", "--port", str(port)], env, tmp_path)
        processes.append(server.start())
    metrics_port = free_port()  # the surviving worker serves its own metrics
    workers = [
        Process("worker-0", ["worker"], env, tmp_path).start(),
        Process("worker-1", ["worker", "--metrics-port", str(metrics_port)], env, tmp_path).start(),
    ]
    processes.extend(workers)
    for index, port in enumerate(ports):
        processes[index].wait_http(f"http://127.0.0.1:{port}/healthz")
    clients = [
        httpx.Client(
            base_url=f"http://127.0.0.1:{port}",
            headers={"Authorization": f"Bearer {token}"},
            timeout=30,
        )
        for port in ports
    ]
    finalizers.extend(client.close for client in clients)
    # Ready once the workers' heartbeats cover every queue the servers send to.
    deadline = time.monotonic() + 60
    while (answer := clients[0].get("/readyz")).status_code != 200:
        assert time.monotonic() < deadline, answer.json()
        time.sleep(0.5)
    ready = answer.json()
    assert ready["checks"]["broker"]["ok"] and ready["checks"]["database"]["ok"], ready
    assert len(ready["checks"]["workers"]["live"]) == 2

    characters = [
        clients[0]
        .post("/api/characters", json={"name": name, "artStyle": {"primaryStyle": style}})
        .json()["id"]
        for name, style in (("Sakura", "anime"), ("Alex", "realistic"))
    ]
    wanted: dict[str, int] = {}
    for index in range(JOBS):
        client = clients[index % 2]  # both servers take work
        count = 1 + index % 2
        job = submit(client, characters[index % 2], prompt=f"scene {index}", count=count)
        wanted[job["id"]] = count

    deadline = time.monotonic() + 60
    while count_states(clients[1], wanted).get("succeeded", 0) < 4:
        assert time.monotonic() < deadline, (
            count_states(clients[1], wanted),
            workers[0].output()[-2000:],
        )
        time.sleep(0.1)
    workers[0].kill9()

    deadline = time.monotonic() + 120
    while (now := count_states(clients[1], wanted)).get("succeeded", 0) < JOBS:
        assert not (set(now) - {"queued", "running", "succeeded"}), now
        assert time.monotonic() < deadline, (now, workers[1].output()[-3000:])
        time.sleep(0.3)

    # The synchronous endpoint works through the queue too, on either server.
    sync = clients[1].post(
        "/api/image-generation/generate",
        json={
            "prompt": "a last one",
            "characterId": characters[0],
            "width": 64,
            "height": 64,
            "hires": False,
        },
    )
    assert sync.status_code == 200, sync.text

    with runner.db.session() as session:
        assert_exactly_the_images_asked_for(session, shared, wanted)
        ran_on = set(session.scalars(select(JobAttempt.worker)).all())
    runner.db.dispose()
    assert len(ran_on) == 2, ran_on  # both workers took jobs before one was killed
    metrics = httpx.get(f"http://127.0.0.1:{metrics_port}/metrics").text
    counted = [
        float(line.rsplit(" ", 1)[1])
        for line in metrics.splitlines()
        if line.startswith("charforge_backend_request_seconds_count")
    ]
    assert sum(counted) > 0, metrics[:2000]
    # Every server's /metrics has the live worker's figures too, labelled with it.
    fleet = clients[0].get("/metrics").text
    labelled = [
        line
        for line in fleet.splitlines()
        if line.startswith("charforge_backend_request_seconds_count") and 'worker="' in line
    ]
    assert labelled and sum(float(line.rsplit(" ", 1)[1]) for line in labelled) > 0, fleet[:2000]
    assert fleet.count("# TYPE charforge_backend_request_seconds histogram") == 1
