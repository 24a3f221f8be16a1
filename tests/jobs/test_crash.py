"""kill -9 of the server in the middle of 50 jobs loses nothing: after a restart every job
ends succeeded with exactly the images it asked for, and every image row has its file."""

from __future__ import annotations

import random
import time
from pathlib import Path
from typing import Any

import httpx
from sqlalchemy import func, select

from charforge.config import Settings
from charforge.container import build_container
from charforge.db.migrate import upgrade
from charforge.db.models import Job, JobAttempt
from charforge.services import users
from charforge.simulator import A1111Simulator
from tests.helpers import free_port
from tests.jobs.conftest import assert_exactly_the_images_asked_for, count_states, submit
from tests.processes import Process, clean_env

JOBS = 50


def test_kill_9_of_the_server_with_50_jobs_in_flight_loses_nothing(
    tmp_path: Path,
    database_url: str,
    sims: tuple[A1111Simulator, A1111Simulator],
    pool: tuple[A1111Simulator, A1111Simulator],
    processes: list[Process],
    finalizers: list[Any],
) -> None:
    for sim in (sims[0], *pool):
        sim.faults.delay_seconds = 0.3
    data_dir = tmp_path / "data"
    env = clean_env(
        CHARFORGE_DATA_DIR=str(data_dir),
        CHARFORGE_DATABASE_URL=database_url,
        RUNPOD_REALISTIC_URL=sims[0].url,
        RUNPOD_ANIME_CARTOON_FANTASY_URL=f"{pool[0].url},{pool[1].url}",
    )
    settings = Settings(data_dir=data_dir, database_url=database_url)
    container = build_container(settings)
    finalizers.append(container.close)
    upgrade(container.db.engine)
    with container.db.session() as session:
        owner = users.create_user(session, "alice", "password-alice")
        _, token = users.create_token(session, owner, "test")
    container.db.dispose()

    port = free_port()
    base = f"http://127.0.0.1:{port}"
    args = ["serve", "--port", str(port)]
    server = Process("server", args, env, tmp_path).start()
    processes.append(server)
    server.wait_http(f"{base}/healthz")

    client = httpx.Client(base_url=base, headers={"Authorization": f"Bearer {token}"}, timeout=30)
    finalizers.append(client.close)
    characters = [
        client.post(
            "/api/characters", json={"name": name, "artStyle": {"primaryStyle": style}}
        ).json()["id"]
        for name, style in (("Sakura", "anime"), ("Alex", "realistic"), ("Eldara", "fantasy"))
    ]
    rng = random.Random(7)
    wanted: dict[str, int] = {}
    for index in range(JOBS):
        count = rng.choice((1, 1, 2))
        job = submit(client, rng.choice(characters), prompt=f"scene {index}", count=count)
        wanted[job["id"]] = count

    def succeeded() -> int:  # read from the database: 50 GETs a round would lag behind
        with container.db.session() as session:
            return int(session.scalar(select(func.count()).where(Job.state == "succeeded")) or 0)

    deadline = time.monotonic() + 30
    while succeeded() < 5:
        assert time.monotonic() < deadline, count_states(client, wanted)
        time.sleep(0.05)
    server.kill9()
    with container.db.session() as session:
        at_crash = dict(session.execute(select(Job.state, func.count()).group_by(Job.state)).all())
    assert at_crash.get("queued", 0) > 0, at_crash  # the crash really was in the middle

    restarted = Process("server-2", args, env, tmp_path).start()
    processes.append(restarted)
    restarted.wait_http(f"{base}/healthz")
    deadline = time.monotonic() + 90
    while (now := count_states(client, wanted)).get("succeeded", 0) < JOBS:
        assert not (set(now) - {"queued", "running", "succeeded"}), now
        assert time.monotonic() < deadline, now
        time.sleep(0.2)
    client.close()

    with container.db.session() as session:
        assert_exactly_the_images_asked_for(session, data_dir, wanted)
        # Every attempt the crash cut short says so, and why, in the job's history.
        cut = session.scalars(select(JobAttempt).where(JobAttempt.outcome == "interrupted")).all()
        assert len(cut) == at_crash.get("running", 0)
        assert all(a.error_message and "re-queued" in a.error_message for a in cut)
    container.db.dispose()
    assert "re-queued" in restarted.output() or at_crash.get("running", 0) == 0
