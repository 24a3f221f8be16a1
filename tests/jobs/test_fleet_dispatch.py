"""Two workers' schedulers (jobs/fleet_dispatcher.py) sharing PostgreSQL and Redis plan as one
fleet: jobs for one checkpoint stay grouped on the backend that has it loaded (few switches,
however the two workers interleave), and a user who arrives behind another's long queue is
served next, not last. The workers are two dispatchers in this process, each with its own
worker id, database engine, backend pool and Redis clients, as two processes would have."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select

from charforge.config import Settings
from charforge.container import build_runner
from charforge.db.migrate import upgrade
from charforge.db.models import Job, JobAttempt, User
from charforge.domain.params import GenerateBody
from charforge.jobs.celery_queue import route_queue, worker_queues
from charforge.jobs.fleet_board import FleetBoard, RedisSlots
from charforge.jobs.fleet_dispatcher import FleetDispatcher
from charforge.jobs.heartbeat import Heartbeat
from charforge.jobs.runner import RunnerContext
from charforge.services import characters, generation, users
from charforge.simulator import A1111Simulator


class Fleet:
    def __init__(self, settings: Settings, redis_url: str) -> None:
        self.settings, self.redis_url = settings, redis_url
        self.workers: list[tuple[RunnerContext, FleetDispatcher, FleetBoard]] = []
        self.heartbeats: list[Heartbeat] = []
        self.admin = build_runner(settings)  # the "server": writes jobs, reads outcomes
        upgrade(self.admin.db.engine)

    def start_worker(
        self, name: str, checkpoints: list[str] | None = None, threads: int = 2
    ) -> None:
        slots = RedisSlots(self.redis_url, ttl=self.settings.job_lease, owner=name)
        ctx = build_runner(self.settings, slots=slots)
        ctx.worker = name
        ctx.pool.probe(list(ctx.table.backends), max_age=0.0)  # what each has loaded
        board = FleetBoard(self.redis_url)
        # The queues the jobs of these checkpoints go to (all of them by default).
        queues = sorted(
            {route_queue(ctx.table, c) for c in checkpoints}
            if checkpoints
            else set(worker_queues(ctx.table, None))
        )
        dispatcher = FleetDispatcher(
            ctx,
            slots,
            board,
            queues=set(queues),
            route_queue=lambda checkpoint: route_queue(ctx.table, checkpoint),
            threads=threads,
        )
        self.workers.append((ctx, dispatcher, board))
        # What the other workers read: its queues and how many jobs it runs at once.
        heartbeat = Heartbeat(self.redis_url, name, queues, threads)
        heartbeat.start()
        self.heartbeats.append(heartbeat)

    def go(self) -> None:
        for _, dispatcher, _ in self.workers:
            dispatcher.start()

    def submit(self, owner: User, character_id: str, n: int, tag: str) -> list[str]:
        with self.admin.db.session() as session:
            return [
                generation.submit(
                    session,
                    owner,
                    GenerateBody(
                        prompt=f"{tag} {i}",
                        character_id=character_id,
                        width=64,
                        height=64,
                        hires=False,
                    ),
                    self.admin.table,
                    self.settings.defaults,
                ).id
                for i in range(n)
            ]

    def finished(self, ids: list[str], timeout: float = 90) -> list[Job]:
        deadline = time.monotonic() + timeout
        while True:
            with self.admin.db.session() as session:
                jobs = list(session.scalars(select(Job).where(Job.id.in_(ids))).all())
            if all(j.state in ("succeeded", "failed", "cancelled") for j in jobs):
                return jobs
            assert time.monotonic() < deadline, sorted(j.state for j in jobs)
            time.sleep(0.05)

    def close(self) -> None:
        for heartbeat in self.heartbeats:
            heartbeat.stop()
        for ctx, dispatcher, board in self.workers:
            dispatcher.stop(timeout=10)
            board.close()
            ctx.pool.close()
            ctx.db.dispose()
        self.admin.pool.close()
        self.admin.db.dispose()


@pytest.fixture
def fleet_of(tmp_path: Path, postgres_url: str, redis_url: str) -> Iterator[Any]:
    made: list[Fleet] = []

    def make(realistic: str, anime: str) -> Fleet:
        settings = Settings(
            data_dir=tmp_path / "images",
            database_url=postgres_url,
            broker_url=redis_url,
            runpod_realistic_url=realistic,
            runpod_anime_cartoon_fantasy_url=anime,
            health_failures=100,
        )
        fleet = Fleet(settings, redis_url)
        made.append(fleet)
        return fleet

    yield make
    for fleet in made:
        fleet.close()


def _user(fleet: Fleet, name: str) -> User:
    with fleet.admin.db.session() as session:
        return users.create_user(session, name, "password-" + name)


def _character(fleet: Fleet, owner: User, name: str, model: str | None = None) -> str:
    with fleet.admin.db.session() as session:
        fields = characters.CharacterFields(name=name, art_style="anime", model=model)
        return characters.create(session, owner, fields, fleet.admin.table).id


@pytest.mark.timeout(180)
def test_two_workers_keep_each_checkpoint_on_one_backend(
    fleet_of: Any,
    sims: tuple[A1111Simulator, A1111Simulator],
    pool: tuple[A1111Simulator, A1111Simulator],
) -> None:
    for sim in pool:
        sim.faults.delay_seconds = 0.05
    fleet = fleet_of(sims[0].url, f"{pool[0].url},{pool[1].url}")
    alice = _user(fleet, "alice")
    diving = _character(fleet, alice, "Sakura")
    other = _character(fleet, alice, "Mika", model="other.safetensors")
    ids: list[str] = []
    for round_ in range(12):  # interleaved: a first-come, first-served fleet switches often
        ids += fleet.submit(alice, diving, 1, f"diving {round_}")
        ids += fleet.submit(alice, other, 1, f"other {round_}")
    fleet.start_worker("worker-a")
    fleet.start_worker("worker-b")
    fleet.go()
    jobs = fleet.finished(ids)
    assert {j.state for j in jobs} == {"succeeded"}, [(j.state, j.error_message) for j in jobs]
    assert {j.lease_owner for j in jobs} <= {None}  # finished jobs hold no lease
    # Both start with diving loaded: one switches to other and keeps it; at most the other
    # one comes to help at the end (first come, first served would switch ~20 times).
    loads = [sim.checkpoint_loads for sim in pool]
    assert sum(loads) <= 2, loads
    with fleet.admin.db.session() as session:
        ran_by = set(session.scalars(select(JobAttempt.worker)).all())
    assert ran_by == {"worker-a", "worker-b"}  # both planned, with one view of the fleet
    # Each worker counts the switches it caused against the fleet's record of what a backend
    # has loaded: together they count what the WebUIs did (their own views would not).
    counted = sum(
        ctx.metrics.checkpoint_switches.labels(name)._value.get()
        for ctx, _, _ in fleet.workers
        for name in ctx.table.backends
    )
    assert counted == sum(loads), (counted, loads)


@pytest.mark.timeout(180)
def test_a_user_behind_another_users_queue_is_served_next(
    fleet_of: Any, sims: tuple[A1111Simulator, A1111Simulator]
) -> None:
    realistic, anime = sims
    realistic.faults.delay_seconds = 0.1
    fleet = fleet_of(realistic.url, anime.url)
    alice, bob = _user(fleet, "alice"), _user(fleet, "bob")
    fleet.start_worker("worker-a")
    fleet.start_worker("worker-b")
    alice_jobs = fleet.submit(alice, _character(fleet, alice, "Sakura"), 12, "alice")
    bob_jobs = fleet.submit(bob, _character(fleet, bob, "Ken"), 2, "bob")
    fleet.go()
    jobs = fleet.finished(alice_jobs + bob_jobs)
    assert {j.state for j in jobs} == {"succeeded"}
    order = [j.id for j in sorted(jobs, key=lambda j: j.finished_at or j.created_at)]
    places = sorted(order.index(job_id) for job_id in bob_jobs)
    # First come, first served would finish bob's last (places 12 and 13).
    assert places[-1] <= 5, (places, order)


@pytest.mark.timeout(180)
def test_a_backend_is_not_planned_for_a_worker_with_no_free_thread(
    fleet_of: Any,
    sims: tuple[A1111Simulator, A1111Simulator],
    pool: tuple[A1111Simulator, A1111Simulator],
) -> None:
    """The README's pair, with the diving worker running one job at a time: while it runs
    one, the other worker's jobs get the second backend at once. Planned for the diving
    worker's queued jobs (no switch, older), that backend would wait for the busy worker,
    job after job."""
    for sim in pool:
        sim.faults.delay_seconds = 0.5
    fleet = fleet_of(sims[0].url, f"{pool[0].url},{pool[1].url}")
    alice = _user(fleet, "alice")
    diving_jobs = fleet.submit(alice, _character(fleet, alice, "Sakura"), 6, "diving")
    other = _character(fleet, alice, "Mika", model="other.safetensors")
    other_jobs = fleet.submit(alice, other, 3, "other")
    fleet.start_worker("worker-diving", checkpoints=["diving.safetensors"], threads=1)
    fleet.start_worker("worker-rest", checkpoints=["other.safetensors"])
    fleet.go()
    jobs = {j.id: j for j in fleet.finished(diving_jobs + other_jobs)}
    assert {j.state for j in jobs.values()} == {"succeeded"}
    with fleet.admin.db.session() as session:
        attempts = list(session.scalars(select(JobAttempt)).all())
    assert {a.worker for a in attempts if a.job_id in other_jobs} == {"worker-rest"}
    first_other = min(a.started_at for a in attempts if a.job_id in other_jobs)
    first_diving_end = min(jobs[i].finished_at or first_other for i in diving_jobs)
    # Before: the other jobs started only once the diving worker's first jobs had ended.
    assert first_other < first_diving_end, (first_other, first_diving_end)
