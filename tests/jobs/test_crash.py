"""kill -9 of the server in the middle of 50 jobs loses nothing: after a restart every job
ends succeeded with exactly the images it asked for, and every image row has its file."""

from __future__ import annotations

import random
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import func, select

from charforge.config import Settings
from charforge.container import build_container
from charforge.db.migrate import upgrade
from charforge.db.models import Image, Job
from charforge.services import users
from charforge.simulator import A1111Simulator
from tests.helpers import free_port
from tests.processes import Process, clean_env

JOBS = 50


@pytest.fixture
def processes() -> Iterator[list[Process]]:
    started: list[Process] = []
    yield started
    for process in started:
        process.stop()


def test_kill_9_of_the_server_with_50_jobs_in_flight_loses_nothing(
    tmp_path: Path,
    database_url: str,
    sims: tuple[A1111Simulator, A1111Simulator],
    pool: tuple[A1111Simulator, A1111Simulator],
    processes: list[Process],
    finalizers: list[Any],
) -> None:
    for sim in (sims[0], *pool):
        sim.faults.delay_seconds = 0.15
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
        response = client.post(
            "/api/jobs",
            json={
                "prompt": f"scene {index}",
                "characterId": rng.choice(characters),
                "count": count,
                "width": 64,
                "height": 64,
                "steps": 2,
                "hires": False,
            },
        )
        assert response.status_code == 202, response.text
        wanted[response.json()["id"]] = count

    def states() -> dict[str, int]:
        result: dict[str, int] = {}
        for job_id in wanted:
            state = client.get(f"/api/jobs/{job_id}").json()["state"]
            result[state] = result.get(state, 0) + 1
        return result

    deadline = time.monotonic() + 30
    while states().get("succeeded", 0) < 5:
        assert time.monotonic() < deadline, states()
        time.sleep(0.1)
    server.kill9()
    with container.db.session() as session:
        at_crash = dict(session.execute(select(Job.state, func.count()).group_by(Job.state)).all())
    assert at_crash.get("queued", 0) > 0, at_crash  # the crash really was in the middle

    restarted = Process("server-2", args, env, tmp_path).start()
    processes.append(restarted)
    restarted.wait_http(f"{base}/healthz")
    deadline = time.monotonic() + 90
    while (now := states()).get("succeeded", 0) < JOBS:
        assert not (set(now) - {"queued", "running", "succeeded"}), now
        assert time.monotonic() < deadline, now
        time.sleep(0.2)
    client.close()

    with container.db.session() as session:
        for job_id, count in wanted.items():
            rows = session.scalars(select(Image).where(Image.job_id == job_id)).all()
            assert sorted(r.position for r in rows) == list(range(count)), job_id
            for row in rows:
                assert (data_dir / row.file_path).is_file(), row.file_path
    container.db.dispose()
    assert "re-queued" in restarted.output() or at_crash.get("running", 0) == 0
