"""Fleet throughput in distributed mode: bench/fleet.py's workload (200 jobs over 3 checkpoints
on 4 A1111 simulators, the same start state, users and job picks) run by real ``charforge
worker`` processes on PostgreSQL and Redis (Celery) instead of the embedded dispatcher.

Each layout is a set of worker command lines: ``one`` (one ``charforge worker``), ``pair``
(the README's pair: ``charforge worker`` plus ``charforge worker --checkpoints
diving.safetensors``), ``two`` (two plain workers) and ``per-checkpoint`` (one worker per
checkpoint, each with ``--checkpoints X``). Per layout: a fresh PostgreSQL database
(``charforge_bench_<random>``, dropped at the end), an emptied Redis database, fresh
simulators, and workers started with the same settings as bench/fleet.py's ``pipelined`` run
(given to them as environment variables). Once every worker's heartbeat is in Redis and its
Celery consumer answers a ping, the jobs are written through the service layer
(``generation.submit``) in this process and sent to the checkpoints' queues by
``CeleryJobQueue.submit``, the server's side; the run ends when the database shows every job
final.

Figures per layout: makespan (first submit -> every job final, polled every 50 ms), direct
(the same generations, in the same order per simulator, sent back to back by a plain HTTP
loop: ``replay``), eff (direct) = direct / makespan, the simulators' checkpoint switches, the
job states, and makespan / makespan of the embedded ``pipelined`` run of bench/fleet.py, which
runs in the same invocation (unless ``--no-embedded``). Per backend the lanes of
bench/fleet.py (images, switches, busy, last end, GPU idle); per worker the jobs it ran and
the switches it counted (its own ``charforge_checkpoint_switches``, read from its
``--metrics-port``).

Run: ``.venv/bin/python -m bench.fleet_distributed [--jobs 200] [--seed 7] [--layout NAME
...] [--database-url URL] [--redis-url URL] [--no-embedded]``. Needs PostgreSQL and Redis.
The charforge measured is the one Python imports (printed first): put a source tree first on
PYTHONPATH to measure another. Prints figures; asserts nothing about time.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any
from unittest import mock

import httpx
import psycopg
from redis import Redis
from sqlalchemy.engine import make_url

import charforge
from bench.fleet import (
    BACKENDS,
    CHECKPOINTS,
    IMAGE_SECONDS,
    STYLES,
    SWITCH_SECONDS,
    USERS,
    Result,
    Scenario,
    backend_names,
    best_makespan,
    checkpoint_counts,
    fleet,
    lanes,
    plans,
    print_lanes,
    replay,
    run,
    settings_values,
    start_state,
    write_jobs,
)
from charforge.config import Settings
from charforge.container import Container, build_runner
from charforge.db import repositories as repo
from charforge.db.migrate import upgrade
from charforge.db.models import JobAttempt, utcnow
from charforge.jobs.celery_queue import FINAL_STATES, CeleryJobQueue, make_celery
from charforge.jobs.heartbeat import live_workers
from charforge.jobs.inline import InlineJobQueue
from charforge.jobs.runner import RunnerContext
from charforge.jobs.scheduler import Policy

PIPELINED = Scenario("pipelined", pipeline=True)  # bench/fleet.py's default run
LAYOUTS: dict[str, list[list[str]]] = {
    "one": [[]],
    "pair": [[], ["--checkpoints", "diving.safetensors"]],
    "two": [[], []],
    "per-checkpoint": [["--checkpoints", checkpoint] for checkpoint in CHECKPOINTS],
}
DEFAULT_DATABASE_URL = os.environ.get(
    "CHARFORGE_TEST_PG", "postgresql://postgres@127.0.0.1:5432/postgres"
)
DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/13"
RUN_TIMEOUT = 600.0
START_TIMEOUT = 120.0
POLL_SECONDS = 0.05
CLOSE_ENOUGH = 1.10  # "within 10 % of embedded"


# -- PostgreSQL and Redis ------------------------------------------------------------------


@contextmanager
def fresh_database(admin_url: str) -> Iterator[str]:
    """A new, empty database on the server of ``admin_url`` (an existing database to connect
    to), dropped at the end even when its workers still hold connections."""
    admin = make_url(admin_url).set(drivername="postgresql")  # psycopg takes libpq URLs only
    name = f"charforge_bench_{secrets.token_hex(6)}"
    libpq = admin.render_as_string(hide_password=False)
    with psycopg.connect(libpq, autocommit=True, connect_timeout=5) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        yield admin.set(database=name).render_as_string(hide_password=False)
    finally:
        with psycopg.connect(libpq, autocommit=True, connect_timeout=5) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def flush(redis_url: str, ours: frozenset[str] = frozenset()) -> None:
    """Empty the broker's database, unless workers other than ``ours`` beat in it (a test run
    picks database numbers at random: emptying it under the test would break it)."""
    others = [w for w in live_workers(redis_url) if w.worker not in ours]
    if others:
        raise RuntimeError(
            f"{redis_url} is in use by live charforge workers "
            f"({', '.join(w.worker for w in others)}); pick another --redis-url"
        )
    client: Redis = Redis.from_url(redis_url, socket_connect_timeout=3)
    try:
        client.flushdb()
    finally:
        client.close()


# -- worker processes ----------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


class Worker:
    """One ``charforge worker`` process; its output goes to a file (a full pipe would block
    it), and it serves its metrics on a port of its own."""

    def __init__(self, index: int, options: list[str], env: dict[str, str], logs: Path) -> None:
        self.index, self.options, self.env = index, options, env
        self.metrics_port = free_port()
        self.log_path = logs / f"worker-{index}.log"
        self._log: IO[str] | None = None
        self.proc: subprocess.Popen[str] | None = None

    @property
    def command(self) -> str:
        return " ".join(["charforge worker", *self.options])

    @property
    def worker_id(self) -> str:
        """What the worker calls itself in heartbeats and job_attempts (container.worker_id)."""
        assert self.proc is not None
        return f"{socket.gethostname()}:{self.proc.pid}"

    def start(self) -> Worker:
        self._log = self.log_path.open("a")
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "charforge",
                "worker",
                *self.options,
                "--metrics-port",
                str(self.metrics_port),
            ],
            stdout=self._log,
            stderr=subprocess.STDOUT,
            text=True,
            env=self.env,
        )
        return self

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def tail(self, chars: int = 3000) -> str:
        text = self.log_path.read_text() if self.log_path.exists() else ""
        return text[-chars:]

    def crashed(self) -> str:
        assert self.proc is not None
        return (
            f"worker {self.index} ({self.command}) exited with {self.proc.returncode}; the end "
            f"of its log:\n{self.tail()}"
        )

    def switches_counted(self) -> int | None:
        """The worker's own count of checkpoint switches (charforge_checkpoint_switches)."""
        try:
            text = httpx.get(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=5).text
        except httpx.HTTPError:
            return None
        return int(
            sum(
                float(line.rsplit(" ", 1)[1])
                for line in text.splitlines()
                if line.startswith("charforge_checkpoint_switches_total{")
            )
        )

    def stop(self) -> None:
        """SIGINT (Celery's warm shutdown: running jobs finish), then kill."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self._log is not None:
            self._log.close()
            self._log = None


def worker_env(values: dict[str, Any]) -> dict[str, str]:
    """Settings field values as the environment variables a worker reads them from."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CHARFORGE_", "RUNPOD_"))}
    aliases = {
        "runpod_realistic_url": "RUNPOD_REALISTIC_URL",
        "runpod_anime_cartoon_fantasy_url": "RUNPOD_ANIME_CARTOON_FANTASY_URL",
    }
    for field, value in values.items():
        name = aliases.get(field, f"CHARFORGE_{field.upper()}")
        if isinstance(value, dict | list):
            env[name] = json.dumps(value)  # pydantic-settings reads complex fields as JSON
        elif isinstance(value, bool):
            env[name] = "true" if value else "false"
        else:
            env[name] = str(value)
    return env


def settings_from(env: dict[str, str], values: dict[str, Any]) -> Settings:
    """The Settings a worker builds from ``env``, which this process uses too; checked against
    ``values`` so that no value is lost or changed on its way through a variable."""
    with mock.patch.dict(os.environ, env, clear=True):
        settings, meant = Settings(), Settings(**values)
    if settings != meant:
        raise RuntimeError(f"the workers would read other settings: {settings} != {meant}")
    return settings


def wait_until_live(workers: list[Worker], settings: Settings) -> float:
    """Until every worker's heartbeat is in Redis and its Celery consumer answers a ping (the
    heartbeat starts before Celery consumes: a job sent then would wait for its start)."""
    began = time.perf_counter()
    deadline = began + START_TIMEOUT
    broker = str(settings.broker_url)
    wanted = {w.worker_id for w in workers}
    app = make_celery(settings)
    try:
        while True:
            for worker in workers:
                if not worker.alive():
                    raise RuntimeError(worker.crashed())
            beating = {w.worker for w in live_workers(broker)}
            if wanted <= beating:
                answered = app.control.ping(timeout=0.5) or []
                consuming = {name for reply in answered for name in reply}
                if all(any(f"-{w}@" in name for name in consuming) for w in wanted):
                    return time.perf_counter() - began
            if time.perf_counter() > deadline:
                tails = "\n".join(w.crashed() if not w.alive() else w.tail() for w in workers)
                raise RuntimeError(
                    f"workers not live after {START_TIMEOUT:.0f} s (heartbeats: "
                    f"{sorted(beating)}, wanted {sorted(wanted)}):\n{tails}"
                )
            time.sleep(0.2)
    finally:
        app.close()


# -- one layout ----------------------------------------------------------------------------


@dataclass
class Distributed:
    layout: str
    result: Result
    commands: list[str]
    jobs_per_worker: list[int]
    switches_per_worker: list[int | None]
    startup_seconds: float  # workers started -> all live
    send_seconds: float  # CeleryJobQueue.submit of every job (inside the makespan)


def run_layout(layout: str, n: int, seed: int, admin_url: str, redis_url: str) -> Distributed:
    flush(redis_url)
    with (
        fresh_database(admin_url) as database_url,
        fleet() as sims,
        tempfile.TemporaryDirectory(prefix="charforge-bench-") as tmp,
    ):
        values = {
            **settings_values(Path(tmp) / "data", sims, PIPELINED),  # the image store they share
            "database_url": database_url,
            "broker_url": redis_url,
        }
        env = worker_env(values)
        settings = settings_from(env, values)
        runner = build_runner(settings)
        # The server's side, without its sweeper: nothing here can lose a message, and a
        # server's container would also start probing the backends (the workers do that).
        queue = CeleryJobQueue(settings, runner)
        upgrade(runner.db.engine)
        workers = [Worker(i, options, env, Path(tmp)) for i, options in enumerate(LAYOUTS[layout])]
        try:
            for worker in workers:
                worker.start()
            startup = wait_until_live(workers, settings)
            tickets, written = write_jobs(runner.db, runner.table, settings, n, seed)

            started = time.perf_counter()  # the first job reaches the broker now
            wall_start = utcnow()
            for ticket in tickets:
                queue.submit(ticket)
            sent = time.perf_counter() - started
            states = wait_final(runner, workers, n, started)
            makespan = time.perf_counter() - started

            with runner.db.session() as session:
                attempts: list[JobAttempt] = [
                    a for t in tickets for a in repo.attempts_of(session, t.id)
                ]
            counted = [w.switches_counted() for w in workers]
            by_worker = Counter(a.worker for a in attempts)
            per_worker = [by_worker.get(w.worker_id, 0) for w in workers]
        finally:
            for worker in workers:
                worker.stop()
            runner.pool.close()
            runner.db.dispose()
            # A killed worker's heartbeat outlives it for a while: it is ours all the same.
            flush(redis_url, frozenset(w.worker_id for w in workers if w.proc is not None))
        names = backend_names()
        result = Result(
            policy=layout,
            makespan=makespan,
            switches=sum(sim.checkpoint_loads for sim in sims),
            switches_seen=sum(c or 0 for c in counted),
            states={k: v for k, v in states.items() if v},
            per_backend=lanes(names, sims, attempts, wall_start),
            submit_seconds=written,
            sequences=plans(sims),
        )
        return Distributed(
            layout,
            result,
            [w.command for w in workers],
            per_worker,
            counted,
            startup,
            sent,
        )


def wait_final(
    runner: RunnerContext,
    workers: list[Worker],
    n: int,
    started: float,
    timeout: float = RUN_TIMEOUT,
) -> dict[str, int]:
    """Poll the job states until all ``n`` are final; a dead worker or the timeout ends the
    run with the worker logs' tails."""
    while True:
        with runner.db.session() as session:
            states = repo.job_counts(session)
        if sum(states.get(s, 0) for s in FINAL_STATES) >= n:
            return states
        for worker in workers:
            if not worker.alive():
                raise RuntimeError(worker.crashed())
        if time.perf_counter() - started > timeout:
            tails = "\n".join(f"--- worker {w.index} ({w.command}):\n{w.tail()}" for w in workers)
            raise RuntimeError(f"not all jobs final after {timeout:.0f} s: {states}\n{tails}")
        time.sleep(POLL_SECONDS)


def run_embedded(n: int, seed: int) -> Result:
    """bench/fleet.py's ``pipelined`` run: the model-aware dispatcher in this process."""

    def make_queue(c: Container) -> InlineJobQueue:
        return InlineJobQueue(c.runner, policy=Policy())

    return run(PIPELINED, make_queue, n, seed)


# -- output --------------------------------------------------------------------------------


def print_header(n: int, seed: int, admin_url: str, redis_url: str) -> float:
    counts = checkpoint_counts(n, seed)
    holders = {c: list(start_state().values()).count(c) for c in CHECKPOINTS}
    best, fewest = best_makespan(counts, holders)
    print(f"charforge from {Path(charforge.__file__).parent}")
    print(
        f"{BACKENDS} simulators, {IMAGE_SECONDS:g} s per image, {SWITCH_SECONDS:g} s per "
        f"checkpoint switch; {n} jobs over {len(STYLES)} checkpoints in random order (seed "
        f"{seed}: {', '.join(f'{c} {k}' for c, k in counts.items())}), {USERS} users; every "
        f"route's pool = all {BACKENDS} backends"
    )
    print("start state (backend i loads checkpoint i % 3):")
    for i, (backend, checkpoint) in enumerate(start_state().items()):
        print(f"  sim{i} = {backend:<24} {checkpoint}")
    print(
        f"best possible makespan from this start = {best:.2f} s with {fewest} switches; "
        f"PostgreSQL via {make_url(admin_url).render_as_string(hide_password=True)}, "
        f"broker {redis_url}"
    )
    print("layouts:")
    for name, lines in LAYOUTS.items():
        print(f"  {name:<15} " + " + ".join(" ".join(["charforge worker", *o]) for o in lines))
    return best


def report(
    embedded: Result | None,
    runs: list[Distributed],
    direct: dict[str, float],
    failed: dict[str, str],
    best: float,
) -> None:
    print()
    print(
        f"{'run':<15} {'makespan':>9} {'direct':>7} {'eff (direct)':>12} {'eff (best)':>10} "
        f"{'switches':>8} {'vs embedded':>11}  jobs"
    )
    rows = ([embedded] if embedded else []) + [d.result for d in runs]
    for r in rows:
        name = "embedded" if r is embedded else r.policy
        same = direct.get(name)
        versus = f"{r.makespan / embedded.makespan:10.2f}x" if embedded else "          -"
        states = ", ".join(f"{k} {v}" for k, v in sorted(r.states.items()))
        print(
            f"{name:<15} {r.makespan:8.2f}s "
            f"{f'{same:6.2f}s' if same else '      -'} "
            f"{f'{same / r.makespan:12.3f}' if same else '           -'} "
            f"{best / r.makespan:10.3f} {r.switches:8d} {versus}  {states}"
        )
    for layout, error in failed.items():
        print(f"{layout:<15} FAILED: {error.splitlines()[0]}")
    print()
    print(
        "makespan: first job sent -> every job final (database polled every "
        f"{POLL_SECONDS * 1000:.0f} ms). direct: the same generations, in the same order per "
        "simulator, sent back to back by a plain HTTP loop; eff (direct) = direct / makespan. "
        "eff (best): best possible makespan / makespan. switches: models loaded by the "
        "simulators (the initial load not counted). vs embedded: makespan / embedded makespan."
    )
    if embedded is not None:
        print(
            f"embedded (bench/fleet.py pipelined, SQLite, in-process dispatcher): "
            f"{embedded.overhead_ms:.1f} ms/image of charforge's own work"
        )
        print_lanes(embedded)
    for d in runs:
        r = d.result
        print(
            f"{d.layout}: workers live {d.startup_seconds:.2f} s after their start; sending "
            f"the {sum(r.states.values())} messages took {d.send_seconds:.2f} s (in the "
            f"makespan); job rows written in {r.submit_seconds:.2f} s before (not in it); "
            f"{r.overhead_ms:.1f} ms/image of charforge's own work"
        )
        for index, (command, jobs, counted) in enumerate(
            zip(d.commands, d.jobs_per_worker, d.switches_per_worker, strict=True)
        ):
            seen = "?" if counted is None else str(counted)
            print(f"  worker {index}: {command:<58} {jobs:4d} jobs, {seen} switches counted")
        print_lanes(r)
    if embedded is not None:
        for d in runs:
            ratio = d.result.makespan / embedded.makespan
            close = "yes" if ratio <= CLOSE_ENOUGH else "no"
            print(
                f"{d.layout}: within {round((CLOSE_ENOUGH - 1) * 100)} % of embedded: {close} "
                f"({d.result.makespan:.2f} s vs {embedded.makespan:.2f} s, {ratio:.2f}x)"
            )
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    print(f"host: {os.cpu_count()} CPUs, load average {load}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=200)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument(
        "--layout",
        nargs="+",
        action="extend",
        choices=list(LAYOUTS),
        help="layouts to run (default: all)",
    )
    parser.add_argument(
        "--database-url",
        default=DEFAULT_DATABASE_URL,
        help="an existing database on the PostgreSQL server where each layout's own database "
        "is created (default: $CHARFORGE_TEST_PG or %(default)s)",
    )
    parser.add_argument(
        "--redis-url",
        default=DEFAULT_REDIS_URL,
        help="the broker: a Redis database this bench may empty (default %(default)s)",
    )
    parser.add_argument(
        "--no-embedded", action="store_true", help="skip bench/fleet.py's pipelined run"
    )
    args = parser.parse_args()
    logging.basicConfig(level=logging.ERROR)
    # A plain `kill` must also stop the workers and drop the databases (the finally blocks).
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))

    began = time.perf_counter()
    best = print_header(args.jobs, args.seed, args.database_url, args.redis_url)
    embedded = None
    direct: dict[str, float] = {}
    if not args.no_embedded:
        embedded = run_embedded(args.jobs, args.seed)
        direct["embedded"] = replay(embedded.sequences)
    runs: list[Distributed] = []
    failed: dict[str, str] = {}
    for layout in args.layout or list(LAYOUTS):
        try:
            done = run_layout(layout, args.jobs, args.seed, args.database_url, args.redis_url)
        except RuntimeError as exc:  # a crashed or stuck worker: say so, run the next one
            print(f"\n{layout}: {exc}", file=sys.stderr)
            failed[layout] = str(exc)
            continue
        runs.append(done)
        direct[layout] = replay(done.result.sequences)
    report(embedded, runs, direct, failed, best)
    print(f"whole run: {time.perf_counter() - began:.0f} s")


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:  # the workers are stopped and the databases dropped by now
        print("interrupted", file=sys.stderr)
        sys.exit(130)
