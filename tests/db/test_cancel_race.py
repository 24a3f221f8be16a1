"""Cancel against a worker's claim: a job claimed between cancel's read and its update is
still cancellable, and cancel must say so rather than answer "already finished"."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import pytest
from sqlalchemy import Engine
from sqlalchemy.orm import Session

from charforge.db import repositories as repo
from charforge.db.engine import Database, make_engine
from charforge.db.migrate import upgrade
from charforge.db.models import Character, Job, User, utcnow


@pytest.fixture
def engine(database_url: str) -> Iterator[Engine]:
    engine = make_engine(database_url)
    upgrade(engine)
    yield engine
    engine.dispose()


def _queued_job(db: Database) -> tuple[int, str]:
    with db.session() as session:
        user = User(name="ann", password_hash=None, is_admin=False)
        session.add(user)
        session.flush()
        character = Character(owner_id=user.id, name="Sakura", primary_style="anime")
        session.add(character)
        session.flush()
        job = Job(
            owner_id=user.id,
            character_id=character.id,
            art_style="anime",
            checkpoint="anything.safetensors",
            params={},
            user_prompt="at the beach",
        )
        session.add(job)
        session.flush()
        return user.id, job.id


class _ClaimAfterFirstRead(Session):
    """A session whose first read of the job is followed, before cancel's update, by a
    worker's claim committed on another connection: the window the race lives in."""

    def __init__(self, db: Database, job_id: str, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._db, self._job_id, self._claimed = db, job_id, False

    def scalar(self, *args: Any, **kwargs: Any) -> Any:
        found = super().scalar(*args, **kwargs)
        if not self._claimed:
            self._claimed = True
            with self._db.session() as worker:
                now = utcnow()
                number = repo.claim_job(
                    worker, self._job_id, "worker-1", "a1111", now, now + timedelta(seconds=60)
                )
                assert number == 1
        return found


def test_a_job_claimed_while_it_is_cancelled_is_still_cancelled(engine: Engine) -> None:
    db = Database(engine)
    owner_id, job_id = _queued_job(db)
    session = _ClaimAfterFirstRead(db, job_id, bind=engine, expire_on_commit=False)
    try:
        outcome = repo.cancel_job(session, owner_id, job_id)
        session.commit()
    finally:
        session.close()
    # It was running when the cancel landed: the runner is told to stop that attempt.
    assert outcome == ("running", "a1111", 1)
    with db.session() as check:
        job = check.get(Job, job_id)
        assert job is not None and job.state == "cancelled"
        assert [a.outcome for a in repo.attempts_of(check, job_id)] == ["cancelled"]


def test_a_finished_job_is_not_cancelled(engine: Engine) -> None:
    db = Database(engine)
    owner_id, job_id = _queued_job(db)
    with db.session() as session:
        job = session.get(Job, job_id)
        assert job is not None
        job.state = "succeeded"
    with db.session() as session:
        assert repo.cancel_job(session, owner_id, job_id) is None
