"""The scheduler's rules, on plain data."""

from __future__ import annotations

from charforge.jobs.scheduler import Fairness, FreeBackend, Policy, QueuedJob, plan

POOL = ("a", "b", "c", "busy-0", "busy-1")


def job(
    job_id: str, checkpoint: str, *, owner: int = 1, at: float = 0.0, **extra: object
) -> QueuedJob:
    return QueuedJob(job_id, owner, checkpoint, POOL, queued_at=at, **extra)  # type: ignore[arg-type]


def run(
    queued: list[QueuedJob],
    free: list[FreeBackend],
    busy: list[str | None] | None = None,  # checkpoints of busy backends of the pool
    *,
    now: float = 1.0,
    fairness: Fairness | None = None,
    policy: Policy | None = None,
    healthy: set[str] | None = None,
) -> dict[str, str]:
    assigned = plan(
        queued,
        free,
        [(f"busy-{i}", c) for i, c in enumerate(busy or [])],
        now=now,
        fairness=fairness or Fairness(),
        policy=policy or Policy(max_wait=60),
        healthy=healthy,
    )
    return {j.id: backend for j, backend in assigned}


def test_jobs_go_to_the_backend_that_has_their_checkpoint_loaded() -> None:
    free = [FreeBackend("a", 1, "x.safetensors"), FreeBackend("b", 1, "y.safetensors")]
    assert run([job("1", "y.safetensors"), job("2", "x.safetensors", at=0.1)], free) == {
        "1": "b",
        "2": "a",
    }


def test_a_checkpoint_name_matches_with_or_without_folder_or_hash() -> None:
    free = [FreeBackend("a", 1, "anime/diving.safetensors [abc1234567]")]
    assert run([job("1", "diving.safetensors")], [*free]) == {"1": "a"}


def test_a_backend_switches_only_when_no_other_is_on_the_checkpoint_and_ahead() -> None:
    # "b" runs x; two x jobs are queued: "a" (on y, nothing for y) does not switch for them...
    queued = [job("1", "x.safetensors"), job("2", "x.safetensors", at=0.1)]
    assert run(queued, [FreeBackend("a", 1, "y.safetensors")], ["x.safetensors"]) == {}
    # ...but does when nobody is on x,
    assert run(queued, [FreeBackend("a", 1, "y.safetensors")], ["z.safetensors"]) == {"1": "a"}
    # ...and when x's backlog outgrows what its backends get through soon.
    many = [job(str(i), "x.safetensors", at=i) for i in range(9)]
    assert run(many, [FreeBackend("a", 1, "y.safetensors")], ["x.safetensors"]) == {"0": "a"}


def test_free_backends_split_between_checkpoints_instead_of_all_switching() -> None:
    queued = [job(str(i), "x" if i % 2 else "y", at=i) for i in range(8)]
    free = [FreeBackend(n, 1, None) for n in POOL[:2]]
    assigned = run(queued, free)
    assert sorted(queued[int(i)].checkpoint for i in assigned) == ["x", "y"]


def test_an_overdue_job_is_not_starved_by_grouping() -> None:
    # "a" has x loaded and x jobs keep coming; the old y job has waited past max_wait.
    queued = [job("old-y", "y.safetensors", at=0.0)] + [
        job(f"x{i}", "x.safetensors", at=50.0 + i) for i in range(5)
    ]
    on_x = [FreeBackend("a", 1, "x.safetensors")]
    assert run(queued, on_x, ["y.safetensors"], now=30.0) == {"x0": "a"}  # not yet due
    on_x = [FreeBackend("a", 1, "x.safetensors")]
    assert run(queued, on_x, ["y.safetensors"], now=61.0) == {"old-y": "a"}


def test_fifo_within_a_checkpoint() -> None:
    queued = [job("late", "x", at=5.0), job("early", "x", at=1.0)]
    assert run(queued, [FreeBackend("a", 1, "x")], now=6.0) == {"early": "a"}


def test_users_take_turns_within_a_checkpoint() -> None:
    fairness = Fairness()
    alice = [job(f"alice-{i}", "x", owner=1, at=float(i)) for i in range(5)]
    bob = [job("bob-0", "x", owner=2, at=10.0)]
    first = run(alice + bob, [FreeBackend("a", 1, "x")], now=11.0, fairness=fairness)
    assert first == {"alice-0": "a"}
    fairness.running[1] -= 1  # alice's job finished
    second = run(alice[1:] + bob, [FreeBackend("a", 1, "x")], now=12.0, fairness=fairness)
    assert second == {"bob-0": "a"}  # bob waited less, but alice was just served


def test_a_retry_waits_out_its_backoff_and_avoids_the_backend_that_failed_it() -> None:
    retry = job("1", "x", not_before=5.0, avoid=frozenset({"a"}))
    assert run([retry], [FreeBackend("a", 1, "x"), FreeBackend("b", 1, "y")], now=4.0) == {}
    assert run([retry], [FreeBackend("a", 1, "x"), FreeBackend("b", 1, "y")], now=5.0) == {"1": "b"}


def test_a_failed_backend_is_used_again_when_the_pool_has_no_other_healthy_one() -> None:
    retry = job("1", "x", avoid=frozenset({"a"}))
    assert run([retry], [FreeBackend("a", 1, "x")], healthy={"a"}) == {"1": "a"}
    # While another healthy backend exists (busy now), the job waits for it instead.
    assert run([retry], [FreeBackend("a", 1, "x")], ["x"], healthy={"a", "busy-0"}) == {}


def test_a_backend_takes_as_many_jobs_as_it_has_free_slots() -> None:
    queued = [job(str(i), "x", at=float(i)) for i in range(3)]
    assert run(queued, [FreeBackend("a", 2, "x")]) == {"0": "a", "1": "a"}


def test_jobs_only_go_to_backends_of_their_route() -> None:
    other_route = QueuedJob("1", 1, "x", ("z",), queued_at=0.0)
    assert run([other_route], [FreeBackend("a", 1, "x")]) == {}
