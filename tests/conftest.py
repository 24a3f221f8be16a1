"""Fixtures over real parts: HTTP on 127.0.0.1, SQLite and PostgreSQL, A1111 simulators."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest

from charforge.api.app import create_app
from charforge.config import Settings
from charforge.container import Container, build_container
from charforge.services import users
from charforge.simulator import A1111Simulator, Faults, SimulatorSettings
from tests.helpers import LiveServer

PG_ADMIN_URL = os.environ.get("CHARFORGE_TEST_PG", "postgresql://postgres@127.0.0.1:5432/test")


def _pg_reachable() -> bool:
    try:
        with psycopg.connect(PG_ADMIN_URL, connect_timeout=3):
            return True
    except psycopg.OperationalError:
        return False


@pytest.fixture(scope="session")
def pg_available() -> bool:
    return _pg_reachable()


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """Each test that needs a database runs on both: a file SQLite and a fresh PG database."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'charforge.db'}"
        return
    yield from _fresh_pg_database(request)


@pytest.fixture
def postgres_url(request: pytest.FixtureRequest) -> Iterator[str]:
    """A fresh PostgreSQL database only (for what SQLite cannot do: several machines)."""
    yield from _fresh_pg_database(request)


def _fresh_pg_database(request: pytest.FixtureRequest) -> Iterator[str]:
    if not request.getfixturevalue("pg_available"):
        if os.environ.get("CI"):
            pytest.fail(f"PostgreSQL is required in CI and is not reachable at {PG_ADMIN_URL}")
        pytest.skip(f"PostgreSQL not reachable at {PG_ADMIN_URL}")
    name = f"cf_test_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(PG_ADMIN_URL, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    base = PG_ADMIN_URL.rsplit("/", 1)[0]
    try:
        yield f"{base}/{name}"
    finally:
        with psycopg.connect(PG_ADMIN_URL, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


REDIS_URL = os.environ.get("CHARFORGE_TEST_REDIS", "redis://127.0.0.1:6379")


@pytest.fixture
def redis_url() -> Iterator[str]:
    """An emptied Redis database of its own (numbers 1-15, picked at random) as the broker."""
    import random

    from redis import Redis
    from redis.exceptions import RedisError

    url = f"{REDIS_URL}/{random.randint(1, 15)}"
    client: Redis = Redis.from_url(url, socket_connect_timeout=3)
    try:
        client.flushdb()
    except RedisError as exc:
        if os.environ.get("CI"):
            pytest.fail(f"Redis is required in CI and is not reachable at {REDIS_URL}: {exc}")
        pytest.skip(f"Redis not reachable at {REDIS_URL}")
    yield url
    client.flushdb()
    client.close()


@pytest.fixture(scope="session")
def realistic_sim() -> Iterator[A1111Simulator]:
    sim = A1111Simulator(
        SimulatorSettings(
            models=["cyberrealistic.safetensors", "other.safetensors"], name="sim-7860"
        )
    )
    sim.start()
    yield sim
    sim.stop()


@pytest.fixture(scope="session")
def anime_sim() -> Iterator[A1111Simulator]:
    sim = A1111Simulator(
        SimulatorSettings(models=["diving.safetensors", "other.safetensors"], name="sim-7861")
    )
    sim.start()
    yield sim
    sim.stop()


@pytest.fixture
def sims(
    realistic_sim: A1111Simulator, anime_sim: A1111Simulator
) -> Iterator[tuple[A1111Simulator, A1111Simulator]]:
    """Both simulators with faults cleared and request logs emptied for this test."""
    for sim in (realistic_sim, anime_sim):
        sim.reset()  # faults off, first model loaded, counters and request log cleared
    yield realistic_sim, anime_sim
    for sim in (realistic_sim, anime_sim):
        sim.faults = Faults()


@dataclass
class Live:
    """A running charforge: its URL, its container and helpers to act as a user."""

    url: str
    container: Container
    tokens: dict[str, str] = field(default_factory=dict)
    clients: list[httpx.Client] = field(default_factory=list)

    def user(self, name: str, *, admin: bool = False) -> httpx.Client:
        with self.container.db.session() as session:
            user = users.create_user(session, name, "password-" + name, is_admin=admin)
            _, token = users.create_token(session, user, "test")
        self.tokens[name] = token
        return self.client({"Authorization": f"Bearer {token}"})

    def anonymous(self) -> httpx.Client:
        return self.client({})

    def client(self, headers: dict[str, str]) -> httpx.Client:
        client = httpx.Client(base_url=self.url, headers=headers, timeout=60)
        self.clients.append(client)
        return client

    def close(self) -> None:
        for client in self.clients:
            client.close()


def make_settings(
    data_dir: Path, database_url: str, realistic: str, anime: str, **extra: Any
) -> Settings:
    values: dict[str, Any] = {
        "data_dir": data_dir,
        "database_url": database_url,
        "runpod_realistic_url": realistic,
        "runpod_anime_cartoon_fantasy_url": anime,
        "backend_timeout": 10.0,
        "backend_connect_timeout": 2.0,
        "probe_timeout": 2.0,
        "retry_backoff": 0.1,  # retries are tested for what they do, not for how long they wait
    }
    values.update(extra)
    return Settings(**values)


@pytest.fixture
def live_factory(tmp_path: Path, database_url: str) -> Iterator[Any]:
    started: list[LiveServer] = []
    lives: list[Live] = []
    counter = iter(range(1000))

    def start(realistic: str, anime: str, **extra: Any) -> Live:
        data_dir = tmp_path / f"data{next(counter)}"
        settings = make_settings(data_dir, database_url, realistic, anime, **extra)
        container = build_container(settings)
        server = LiveServer(create_app(container)).start()
        started.append(server)
        lives.append(Live(server.url, container))
        return lives[-1]

    yield start
    for one in lives:
        one.close()
    for server in started:
        server.stop()


@pytest.fixture
def live(live_factory: Any, sims: tuple[A1111Simulator, A1111Simulator]) -> Live:
    realistic, anime = sims
    result: Live = live_factory(realistic.url, anime.url)
    return result
