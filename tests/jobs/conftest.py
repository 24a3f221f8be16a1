"""A route served by a pool of two A1111 simulators, for failover and scheduling tests."""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session

from charforge.db.models import Image
from charforge.simulator import A1111Simulator, Faults, SimulatorSettings
from tests.conftest import Live
from tests.processes import Process


@pytest.fixture(scope="session")
def second_anime_sim() -> Iterator[A1111Simulator]:
    sim = A1111Simulator(
        SimulatorSettings(models=["diving.safetensors", "other.safetensors"], name="sim-pool-2")
    )
    sim.start()
    yield sim
    sim.stop()


@pytest.fixture
def pool(
    sims: tuple[A1111Simulator, A1111Simulator], second_anime_sim: A1111Simulator
) -> Iterator[tuple[A1111Simulator, A1111Simulator]]:
    """The anime route's pool: (first, second); the first is tried first when both are idle."""
    second_anime_sim.reset()
    yield sims[1], second_anime_sim
    second_anime_sim.faults = Faults()


@pytest.fixture
def pool_live(
    live_factory: Any,
    sims: tuple[A1111Simulator, A1111Simulator],
    pool: tuple[A1111Simulator, A1111Simulator],
) -> Any:
    """A charforge whose anime route has both pool simulators (extra settings allowed)."""

    def start(first_url: str | None = None, **extra: Any) -> Live:
        urls = f"{first_url or pool[0].url},{pool[1].url}"
        live: Live = live_factory(sims[0].url, urls, **extra)
        # Let the first health probe answer, so the scheduler knows what every backend has
        # loaded and the order jobs are tried in is the pool's order, not a race.
        deadline = time.monotonic() + 10
        while not all(s.checked for s in live.container.pool.statuses()):
            assert time.monotonic() < deadline, live.container.pool.statuses()
            time.sleep(0.02)
        return live

    return start


def job_of(client: httpx.Client, job_id: str) -> dict[str, Any]:
    response = client.get(f"/api/jobs/{job_id}")
    assert response.status_code == 200, response.text
    return dict(response.json())


def create_character(client: httpx.Client, name: str = "Sakura", style: str = "anime") -> str:
    response = client.post(
        "/api/characters",
        json={"name": name, "appearance": "pink hair", "artStyle": {"primaryStyle": style}},
    )
    assert response.status_code == 201, response.text
    return str(response.json()["id"])


def submit(client: httpx.Client, character_id: str, **extra: Any) -> dict[str, Any]:
    body = {
        "prompt": "in a garden",
        "characterId": character_id,
        "width": 64,
        "height": 64,
        "steps": 2,
        "hires": False,
        **extra,
    }
    response = client.post("/api/jobs", json=body)
    assert response.status_code == 202, response.text
    return dict(response.json())


def wait_final(client: httpx.Client, job_id: str, timeout: float = 30) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        job = job_of(client, job_id)
        if job["state"] in ("succeeded", "failed", "cancelled"):
            return job
        if time.monotonic() > deadline:
            raise AssertionError(f"job {job_id} still {job['state']} after {timeout}s: {job}")
        time.sleep(0.05)


@pytest.fixture
def finalizers() -> Iterator[list[Any]]:
    """Callables run after the test even when it fails (clients, engines left open would
    surface as ResourceWarnings in whichever test runs next)."""
    calls: list[Any] = []
    yield calls
    for call in reversed(calls):
        call()


@pytest.fixture
def processes() -> Iterator[list[Process]]:
    """charforge processes a test started; stopped after it."""
    started: list[Process] = []
    yield started
    for process in started:
        process.stop()


def count_states(client: httpx.Client, job_ids: Iterable[str]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for job_id in job_ids:
        state = job_of(client, job_id)["state"]
        counts[state] = counts.get(state, 0) + 1
    return counts


def assert_exactly_the_images_asked_for(
    session: Session, data_dir: Path, wanted: dict[str, int]
) -> None:
    """Every job has positions 0..count-1, once each, and every row's file exists."""
    for job_id, count in wanted.items():
        rows = session.scalars(select(Image).where(Image.job_id == job_id)).all()
        assert sorted(r.position for r in rows) == list(range(count)), job_id
        for row in rows:
            assert (data_dir / row.file_path).is_file(), row.file_path
