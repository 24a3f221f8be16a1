"""Servers and workers started together on an empty database: one applies the migrations,
the others wait for it, and every one of them comes up (no UniqueViolation on
alembic_version, no half-made tables)."""

from __future__ import annotations

import multiprocessing
from multiprocessing.connection import Connection

import pytest

from charforge.db.engine import make_engine
from charforge.db.migrate import current_revision, head_revision, upgrade

STARTERS = 4


def _start(url: str, ready: multiprocessing.synchronize.Barrier, out: Connection) -> None:
    engine = make_engine(url)
    try:
        ready.wait(timeout=30)  # all at the same moment, as two `charforge serve` are
        upgrade(engine)
        out.send(None)
    except Exception as exc:  # reported to the test, which names it
        out.send(f"{type(exc).__name__}: {exc}"[:500])
    finally:
        engine.dispose()


def _start_together(url: str) -> list[str | None]:
    context = multiprocessing.get_context("spawn")
    barrier = context.Barrier(STARTERS)
    pipes = [context.Pipe(duplex=False) for _ in range(STARTERS)]
    processes = [context.Process(target=_start, args=(url, barrier, sender)) for _, sender in pipes]
    for process in processes:
        process.start()
    results = [receiver.recv() if receiver.poll(120) else "no answer" for receiver, _ in pipes]
    for process in processes:
        process.join(timeout=30)
    return results


def test_starters_racing_on_an_empty_database_all_come_up(database_url: str) -> None:
    assert _start_together(database_url) == [None] * STARTERS
    engine = make_engine(database_url)
    try:
        assert current_revision(engine) == head_revision(engine)
    finally:
        engine.dispose()


def test_starters_racing_on_an_older_database_all_come_up(database_url: str) -> None:
    engine = make_engine(database_url)
    upgrade(engine, "0004")
    engine.dispose()
    assert _start_together(database_url) == [None] * STARTERS
    engine = make_engine(database_url)
    try:
        assert current_revision(engine) == head_revision(engine)
    finally:
        engine.dispose()


def test_a_process_that_waits_too_long_says_why(database_url: str) -> None:
    from charforge.db.migrate import MigrationLockTimeout, migration_lock

    engine = make_engine(database_url)
    other = make_engine(database_url)
    try:
        with migration_lock(other), pytest.raises(MigrationLockTimeout) as caught:
            upgrade(engine, wait=0.5)
        assert "charforge migrate" in str(caught.value)
        upgrade(engine, wait=0.5)  # released: it goes ahead
        assert current_revision(engine) == head_revision(engine)
    finally:
        engine.dispose()
        other.dispose()
