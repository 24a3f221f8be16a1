"""Test plumbing: run an ASGI app on a real 127.0.0.1 socket in a thread."""

from __future__ import annotations

import socket
import threading
import time
from typing import Any

import uvicorn


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class LiveServer:
    """uvicorn in a daemon thread on an already bound socket (no port race)."""

    def __init__(self, app: Any) -> None:
        self._sock = socket.socket()
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind(("127.0.0.1", 0))
        self.port = int(self._sock.getsockname()[1])
        self.url = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(app, log_level="warning", lifespan="on")
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(
            target=self._server.run, kwargs={"sockets": [self._sock]}, daemon=True
        )

    def start(self) -> LiveServer:
        self._thread.start()
        deadline = time.monotonic() + 15
        while not self._server.started:
            if time.monotonic() > deadline or not self._thread.is_alive():
                raise RuntimeError("test server did not start")
            time.sleep(0.01)
        return self

    def stop(self) -> None:
        self._server.should_exit = True
        self._thread.join(15)
        self._sock.close()


def character_whose_checkpoint_went_away(live: Any, user: str, name: str, model: str) -> str:
    """A character naming a checkpoint its backends do not have (any more): created before the
    file was removed, or while the backends were down, so the create-time check did not see
    it. Made through the service, as the API would refuse it now."""
    from charforge.services import characters, users

    with live.container.db.session() as session:
        owner = users.require_user(session, user)
        fields = characters.CharacterFields(name=name, art_style="anime", model=model)
        return characters.create(session, owner, fields, live.container.table).id
