"""The queries distributed workers plan with (db/dispatch.py), on SQLite and PostgreSQL: a long
backlog of one user never hides another user's job from the plan, and taking jobs is all or
nothing per job, never twice."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest

from charforge.config import Settings
from charforge.container import build_runner
from charforge.db import dispatch
from charforge.db.migrate import upgrade
from charforge.db.models import User, utcnow
from charforge.domain.params import GenerateBody
from charforge.jobs.runner import RunnerContext
from charforge.services import characters, generation, users


@pytest.fixture
def runner(database_url: str, tmp_path: Path) -> Iterator[RunnerContext]:
    ctx = build_runner(Settings(data_dir=tmp_path, database_url=database_url))
    upgrade(ctx.db.engine)
    yield ctx
    ctx.pool.close()
    ctx.db.dispose()


def _jobs(ctx: RunnerContext, owner: User, n: int) -> list[str]:
    settings = Settings()
    with ctx.db.session() as session:
        character = characters.create(
            session,
            owner,
            characters.CharacterFields(name=f"c-{owner.name}", art_style="anime"),
            ctx.table,
        )
        return [
            generation.submit(
                session,
                owner,
                GenerateBody(prompt=f"scene {i}", character_id=character.id, hires=False),
                ctx.table,
                settings.defaults,
            ).id
            for i in range(n)
        ]


def test_a_long_backlog_does_not_hide_another_users_job(runner: RunnerContext) -> None:
    with runner.db.session() as session:
        alice = users.create_user(session, "alice", "password-alice")
        bob = users.create_user(session, "bob", "password-bob")
    backlog = _jobs(runner, alice, 30)
    late = _jobs(runner, bob, 1)
    with runner.db.session() as session:
        seen = dispatch.waiting_jobs(session, utcnow(), limit=100, per_group=10)
    ids = [w.id for w in seen]
    assert ids == backlog[:10] + late  # oldest first, at most 10 of alice's


def test_a_job_is_taken_once(runner: RunnerContext) -> None:
    with runner.db.session() as session:
        alice = users.create_user(session, "alice", "password-alice")
    ids = _jobs(runner, alice, 3)
    now = utcnow()
    until = now + timedelta(seconds=60)
    with runner.db.session() as session:
        first = dispatch.take(session, ids[:2], "worker-a", now, until)
    with runner.db.session() as session:
        second = dispatch.take(session, ids, "worker-b", now, until)
        left = dispatch.waiting_jobs(session, now, limit=100, per_group=10)
    assert first == set(ids[:2])
    assert second == {ids[2]}
    assert left == []
    # A reservation that lapsed is free again; one given back is free at once.
    later = until + timedelta(seconds=1)
    with runner.db.session() as session:
        dispatch.release_reservation(session, ids[2], "worker-b")
        assert [w.id for w in dispatch.waiting_jobs(session, now, 100, 10)] == [ids[2]]
        assert len(dispatch.waiting_jobs(session, later, 100, 10)) == 3
