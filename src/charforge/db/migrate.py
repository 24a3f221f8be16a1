"""Alembic, driven from code: the server upgrades an empty or older database on start.

Servers and workers may start together: the upgrade is done under one lock per database (a
PostgreSQL advisory lock; for SQLite, a lock on a file beside the database), so one process
applies the migrations while the others wait, then find the database at head and go on.
"""

from __future__ import annotations

import fcntl
import logging
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Engine, text

MIGRATIONS_DIR = Path(__file__).parent / "migrations"
# One number for every charforge on a database ("charforg" in ASCII, a signed 64-bit key).
_ADVISORY_KEY = 0x63686172666F7267
# Far beyond a migration's seconds: a process still waiting then says so and stops.
LOCK_WAIT_SECONDS = 300.0
_POLL_SECONDS = 0.2

log = logging.getLogger(__name__)


class MigrationLockTimeout(RuntimeError):
    """Another process held the migration lock for longer than ``LOCK_WAIT_SECONDS``."""


def alembic_config(engine: Engine) -> Config:
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    config.attributes["engine"] = engine
    return config


def upgrade(engine: Engine, revision: str = "head", *, wait: float = LOCK_WAIT_SECONDS) -> None:
    with migration_lock(engine, wait=wait):
        command.upgrade(alembic_config(engine), revision)


@contextmanager
def migration_lock(engine: Engine, *, wait: float = LOCK_WAIT_SECONDS) -> Iterator[None]:
    """Held while this process migrates; another charforge on the same database waits."""
    if engine.dialect.name == "postgresql":
        with _advisory_lock(engine, wait):
            yield
        return
    database = engine.url.database
    if engine.dialect.name == "sqlite" and database and database != ":memory:":
        with _file_lock(Path(database).with_name(Path(database).name + ".migrate-lock"), wait):
            yield
        return
    yield


@contextmanager
def _advisory_lock(engine: Engine, wait: float) -> Iterator[None]:
    # A session lock on a connection of its own, outside any transaction, so it lasts
    # exactly as long as this block, whatever Alembic commits on its connection.
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as connection:
        _acquire(
            lambda: bool(
                connection.scalar(text("SELECT pg_try_advisory_lock(:key)"), {"key": _ADVISORY_KEY})
            ),
            wait,
            "PostgreSQL advisory lock",
        )
        try:
            yield
        finally:
            connection.execute(text("SELECT pg_advisory_unlock(:key)"), {"key": _ADVISORY_KEY})


@contextmanager
def _file_lock(path: Path, wait: float) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as handle:

        def try_lock() -> bool:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return False
            return True

        _acquire(try_lock, wait, f"lock file {path}")
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _acquire(try_lock: Callable[[], bool], wait: float, what: str) -> None:
    if try_lock():
        return
    log.info("another charforge is migrating the database; waiting for it (%s)", what)
    deadline = time.monotonic() + wait
    while not try_lock():
        if time.monotonic() > deadline:
            raise MigrationLockTimeout(
                f"Another process has held the migration {what} for over {wait:.0f} s. If no "
                "charforge is starting or migrating, a stuck one holds it: stop it, or run "
                "`charforge migrate` once it is gone."
            )
        time.sleep(_POLL_SECONDS)


def current_revision(engine: Engine) -> str | None:
    with engine.connect() as connection:
        return MigrationContext.configure(connection).get_current_revision()


def head_revision(engine: Engine) -> str | None:
    return ScriptDirectory.from_config(alembic_config(engine)).get_current_head()
