"""Every worker log line about a job names it: a retry on a failing backend, a success whose
progress is followed by the WebUI watcher's thread, and a cancel whose lease is lost. Lines
come from the job's own thread and from threads serving it (the A1111 watcher, the lease
renewer, the interrupt it starts); ContextVars do not flow into those by themselves."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from charforge.observability import logs
from charforge.simulator import A1111Simulator, Faults, SimulatorSettings
from tests.conftest import Live
from tests.jobs.conftest import create_character, job_of, submit

# Loggers whose lines, while a job runs, are about it.
_WORKER = ("charforge.jobs.", "charforge.backends.")
# The pool's health monitor and its probes: about a backend, whichever job runs.
_NOT_A_JOBS = ("health", "probe")


class Kept(logging.Handler):
    """Every record of ``charforge.*``, with the request and job ids of the emitting thread
    (the filter runs in that thread, as the real handler's does)."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.addFilter(logs.ContextFilter())
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.fixture(scope="module")
def nowebui_sim() -> Iterator[A1111Simulator]:
    """A WebUI started with --nowebui: no /internal/progress, which the watcher's thread
    finds out (and logs) while it follows the first job's task."""
    sim = A1111Simulator(
        SimulatorSettings(
            models=["diving.safetensors", "other.safetensors"], name="sim-nowebui", nowebui=True
        )
    )
    sim.start()
    yield sim
    sim.stop()


@pytest.fixture
def kept() -> Iterator[Kept]:
    handler = Kept()
    logger = logging.getLogger("charforge")
    level = logger.level
    logger.setLevel(logging.DEBUG)
    logger.addHandler(handler)
    yield handler
    logger.removeHandler(handler)
    logger.setLevel(level)


@pytest.fixture
def first_and_second(
    nowebui_sim: A1111Simulator, second_anime_sim: A1111Simulator
) -> Iterator[tuple[A1111Simulator, A1111Simulator]]:
    for sim in (nowebui_sim, second_anime_sim):
        sim.reset()
    yield nowebui_sim, second_anime_sim
    for sim in (nowebui_sim, second_anime_sim):
        sim.faults = Faults()


def test_a_thread_started_during_a_job_logs_with_its_id(kept: Kept) -> None:
    said = logging.getLogger("charforge.jobs.test")
    token = logs.job_id.set("job-1")
    try:
        logs.start_thread(said.info, "carried", name="carried").join(5)
        plain = threading.Thread(target=said.info, args=("plain",))
        plain.start()
        plain.join(5)
        carried = logs.CarriedContext()
    finally:
        logs.job_id.reset(token)
    later = threading.Thread(target=carried.run, args=(said.info, "later"))
    later.start()
    later.join(5)
    ids = {r.getMessage(): getattr(r, "job_id", None) for r in kept.records}
    assert ids == {"carried": "job-1", "plain": None, "later": "job-1"}


def run_job(
    live: Live, client: httpx.Client, character: str, cancel_when: Any = None, **extra: Any
) -> tuple[str, dict[str, Any], float, float, list[float]]:
    """Submit, (cancel once ``cancel_when(job)``), wait until its attempt in this process has
    ended; returns the id, the final job, when it began and ended, and the progress seen."""
    began = time.time()
    job_id = submit(client, character, **extra)["id"]
    seen: list[float] = []
    deadline = time.monotonic() + 30
    while (job := job_of(client, job_id))["state"] not in ("succeeded", "failed", "cancelled"):
        assert time.monotonic() < deadline, job
        if job["state"] == "running" and job["progress"]:
            seen.append(job["progress"])
        if cancel_when is not None and cancel_when(job):
            assert client.post(f"/api/jobs/{job_id}/cancel").json()["state"] == "cancelled"
            cancel_when = None
        time.sleep(0.05)
    while job_id in live.container.runner.attempts:  # a cancelled one is still unwinding
        assert time.monotonic() < deadline
        time.sleep(0.05)
    time.sleep(0.5)  # an interrupt sent off its own thread, the watcher's last look
    return job_id, job_of(client, job_id), began, time.time(), seen


def test_every_worker_log_line_about_a_job_carries_its_id(
    live_factory: Any,
    sims: tuple[A1111Simulator, A1111Simulator],
    first_and_second: tuple[A1111Simulator, A1111Simulator],
    kept: Kept,
) -> None:
    first, second = first_and_second
    # A short lease: the renewer (its own thread) renews every 2/3 s while a job runs.
    live: Live = live_factory(sims[0].url, f"{first.url},{second.url}", job_lease=2.0)
    deadline = time.monotonic() + 10
    while not all(s.checked for s in live.container.pool.statuses()):  # the pool's order
        assert time.monotonic() < deadline
        time.sleep(0.02)
    client = live.user("alice")
    character = create_character(client)
    runs = []

    # A success on the first WebUI, its progress followed by the watcher's thread.
    first.faults.delay_seconds = 1.5
    runs.append(run_job(live, client, character, steps=20))
    job, seen = runs[-1][1], runs[-1][4]
    assert job["state"] == "succeeded" and job["backend"] == "anime-cartoon-fantasy", job
    assert any(0 < p < 1 for p in seen), seen

    # A retry: the first WebUI fails, the second makes the image.
    first.faults = Faults(fail_status=500, fail_message="CUDA out of memory")
    runs.append(run_job(live, client, character))
    job = runs[-1][1]
    assert job["state"] == "succeeded", job
    assert [a["outcome"] for a in job["attemptHistory"]] == ["retried", "succeeded"]

    # A cancel while it runs: the API interrupts its task, the renewer finds its lease gone.
    first.faults = Faults(delay_seconds=10.0)
    runs.append(
        run_job(
            live,
            client,
            character,
            cancel_when=lambda j: j["state"] == "running" and first.current_task is not None,
        )
    )
    job = runs[-1][1]
    assert job["state"] == "cancelled" and job["images"] == [], job
    first.faults = Faults()

    about_jobs = 0
    for job_id, _, began, ended, _ in runs:
        records = [
            r
            for r in kept.records
            if began <= r.created <= ended
            and r.name.startswith(_WORKER)
            and not (r.threadName or "").startswith(_NOT_A_JOBS)
        ]
        about_jobs += len(records)
        # The rule: each carries the job's id, or names it.
        unnamed = [
            (r.threadName, r.name, r.getMessage())
            for r in records
            if getattr(r, "job_id", None) != job_id and job_id not in r.getMessage()
        ]
        assert not unnamed, f"lines about job {job_id} that do not name it: {unnamed}"
        # Off a request's thread (the worker's own threads and its helpers) the id is the
        # record's field, which JSON logs carry and a log pipeline filters on.
        fieldless = [
            (r.threadName, r.name, r.getMessage())
            for r in records
            if getattr(r, "request_id", None) is None and getattr(r, "job_id", None) != job_id
        ]
        assert not fieldless, f"worker lines about job {job_id} without its job_id: {fieldless}"
    assert about_jobs >= 5  # the success, the retry and its success, the cancel, ...
    # The watcher's thread did log, and what it logged is the first job's.
    (watcher_line,) = [r for r in kept.records if "no /internal/progress" in r.getMessage()]
    assert (watcher_line.threadName or "").startswith("a1111-watch")
    assert getattr(watcher_line, "job_id", None) == runs[0][0]
