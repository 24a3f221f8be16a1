"""The outbox rule in distributed mode: a job committed while the broker is unreachable is
answered 202 with its id (never a 500), stays queued, and is sent once the broker answers."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
from redis import Redis

from charforge.simulator import A1111Simulator
from tests.helpers import free_port
from tests.jobs.conftest import create_character, job_of


class Forwarder:
    """A TCP port that refuses connections until ``open()``, then forwards them to Redis:
    the broker being away, then back."""

    def __init__(self, port: int, target: tuple[str, int]) -> None:
        self.port, self._target = port, target
        self._server: socket.socket | None = None
        self._closed = False

    def open(self) -> None:
        self._server = socket.create_server(("127.0.0.1", self.port))
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        assert self._server is not None
        while not self._closed:
            try:
                client, _ = self._server.accept()
            except OSError:
                return
            upstream = socket.create_connection(self._target)
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(source: socket.socket, sink: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                sink.sendall(data)
        except OSError:
            pass
        finally:
            for end in (source, sink):
                with contextlib.suppress(OSError):
                    end.close()

    def close(self) -> None:
        self._closed = True
        if self._server is not None:
            self._server.close()


@pytest.fixture
def away_broker(redis_url: str) -> Iterator[tuple[Forwarder, str, Redis]]:
    host_port, _, db = redis_url.removeprefix("redis://").rpartition("/")
    host, _, port = host_port.partition(":")
    forwarder = Forwarder(free_port(), (host, int(port)))
    redis: Redis = Redis.from_url(redis_url)
    yield forwarder, f"redis://127.0.0.1:{forwarder.port}/{db}", redis
    forwarder.close()
    redis.close()


def test_a_job_committed_while_the_broker_is_away_is_202_and_sent_when_it_returns(
    live_factory: Any,
    sims: tuple[A1111Simulator, A1111Simulator],
    away_broker: tuple[Forwarder, str, Redis],
    caplog: pytest.LogCaptureFixture,
) -> None:
    forwarder, broker_url, redis = away_broker
    live = live_factory(sims[0].url, sims[1].url, broker_url=broker_url)
    client = live.user("alice")
    character = create_character(client)
    started = time.monotonic()
    response = client.post("/api/jobs", json={"prompt": "at the beach", "characterId": character})
    assert response.status_code == 202, response.text
    assert time.monotonic() - started < 10  # the request does not hang on the broker
    job = response.json()
    assert job["state"] == "queued" and response.headers["location"] == f"/api/jobs/{job['id']}"
    assert any("CHARFORGE_BROKER_URL" in r.getMessage() for r in caplog.records)
    assert redis.llen("charforge.ckpt.diving") == 0

    forwarder.open()  # the broker is back: the next sweep sends the message
    _, sent = live.container.queue._sweeper.sweep()
    assert sent >= 1
    assert redis.llen("charforge.ckpt.diving") == 1
    assert job_of(client, job["id"])["state"] == "queued"  # waiting for a worker, not lost


def test_a_broker_that_never_answers_does_not_hold_a_request(
    live_factory: Any,
    sims: tuple[A1111Simulator, A1111Simulator],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A broker that takes the connection and then says nothing (hung, or a half-open
    connection): a job and a batch of 20 are still answered 202 in seconds, all queued.
    Before, the first publish waited for ever."""
    hole = socket.create_server(("127.0.0.1", free_port()))  # listens, never answers
    try:
        port = hole.getsockname()[1]
        live = live_factory(sims[0].url, sims[1].url, broker_url=f"redis://127.0.0.1:{port}/1")
        client = live.user("alice")
        character = create_character(client)
        started = time.monotonic()
        response = client.post("/api/jobs", json={"prompt": "at sea", "characterId": character})
        assert response.status_code == 202, response.text
        assert time.monotonic() - started < 10
        started = time.monotonic()
        items = [{"prompt": f"scene {n}"} for n in range(20)]
        batch = client.post("/api/batches", json={"characterId": character, "items": items})
        assert batch.status_code == 202, batch.text
        # One publish waits for the broker (about two seconds); the others are left to the
        # sweeper at once instead of each waiting as long.
        assert time.monotonic() - started < 10
        assert {job["state"] for job in batch.json()["jobs"]} == {"queued"}
        warnings = [
            r.getMessage() for r in caplog.records if "CHARFORGE_BROKER_URL" in r.getMessage()
        ]
        assert any("and 19 more" in message for message in warnings), warnings
    finally:
        hole.close()
