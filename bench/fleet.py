"""Fleet throughput: 200 jobs over 3 checkpoints on 4 A1111 simulators, dispatched by the
model-aware scheduler (jobs/scheduler.py ``plan``) and by naive round robin (``round_robin``).

Each simulator takes 0.2 s per image and 1.0 s more whenever its loaded checkpoint must
change; every simulator serves all 3 checkpoints and every style's pool is all 4 backends.
Backend i starts with checkpoint i % 3 loaded. Jobs are written through the service layer
(``generation.submit``) and handed to the embedded dispatcher (``InlineJobQueue``).

Runs: the model-aware scheduler with pipelining (the default: each backend's next job is
prepared while one runs and waits at its door), without it, and with the 4 servers named
in both RUNPOD_* variables (one server is one backend: 4 backends, not 8); naive round robin
without pipelining as the baseline.

Efficiency is printed two ways: against the no-switch ideal (jobs x 0.2 s / 4, which no plan
can reach when one checkpoint's jobs outweigh its initial holders) and against the best
makespan any plan could reach from this start state (``best_makespan``: the fewest switches
that let every checkpoint finish in time, jobs divisible).

Run: ``.venv/bin/python -m bench.fleet [--jobs 200] [--seed 7] [--jobs-per-holder 4]``.
Prints figures; asserts nothing about time.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import random
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx

from charforge.config import Settings
from charforge.container import Container, build_runner
from charforge.db import repositories as repo
from charforge.db.engine import Database
from charforge.db.models import JobAttempt, utcnow
from charforge.domain.params import GenerateBody
from charforge.domain.routes import RouteTable
from charforge.jobs.inline import InlineJobQueue, Planner
from charforge.jobs.scheduler import FreeBackend, Policy, QueuedJob, round_robin
from charforge.jobs.tickets import JobTicket
from charforge.services import characters, generation, users

BACKENDS = 4
IMAGE_SECONDS = 0.2
SWITCH_SECONDS = 1.0
# style -> checkpoint; each style is its own route, served by the whole fleet.
STYLES = {
    "anime": "diving.safetensors",
    "realistic": "cyberrealistic.safetensors",
    "fantasy": "dreamshaper.safetensors",
}
CHECKPOINTS = list(STYLES.values())
USERS = 5
# Small images: rendering costs next to nothing against the simulated 0.2 s.
TINY = {"width": 64, "height": 64, "steps": 1, "hires": False}
GOAL_EFFICIENCY = 0.95
GOAL_SWITCH_SHARE = 0.1  # fewer than a tenth of the naive run's switches


@dataclass(frozen=True)
class Scenario:
    name: str
    pipeline: bool
    both_vars: bool = False  # every server named in both RUNPOD_* variables
    naive: bool = False


def best_makespan(jobs: dict[str, int], holders: dict[str, int]) -> tuple[float, int]:
    """The shortest makespan any plan could reach, and its switches: time T is feasible when
    the checkpoints whose work outlasts their initial holders (by T) get extra backends,
    each of which pays one switch, and the whole fleet's work fits in 4 x T. Jobs are
    taken as divisible, so this is a bound, not always reachable."""

    def extra(limit: float) -> int:
        need = 0
        for checkpoint, count in jobs.items():
            beyond = count * IMAGE_SECONDS - holders.get(checkpoint, 0) * limit
            if beyond > 0:
                need += int(-(-beyond // (limit - SWITCH_SECONDS)))  # ceiling
        return need

    def feasible(limit: float) -> bool:
        if limit <= SWITCH_SECONDS:
            return False
        switches = extra(limit)
        work = sum(jobs.values()) * IMAGE_SECONDS + switches * SWITCH_SECONDS
        return work <= BACKENDS * limit + 1e-9

    low, high = 0.0, sum(jobs.values()) * IMAGE_SECONDS + BACKENDS * SWITCH_SECONDS
    for _ in range(60):
        middle = (low + high) / 2
        low, high = (low, middle) if feasible(middle) else (middle, high)
    return high, extra(high)


@dataclass
class Lane:
    """One backend's share of a run, from the simulator and the job_attempts rows."""

    images: int  # generations the simulator ran
    switches: int  # models the simulator loaded
    busy: float  # seconds inside attempts (claim to finish: charforge's work included)
    last: float  # seconds from the first submit to its last attempt's end

    @property
    def idle(self) -> float:
        """Seconds the simulator had nothing to render before its last job ended."""
        return self.last - (self.images * IMAGE_SECONDS + self.switches * SWITCH_SECONDS)

    def overhead_ms(self) -> float:
        """Per image, what an attempt took beyond the simulated image and switch time."""
        simulated = self.images * IMAGE_SECONDS + self.switches * SWITCH_SECONDS
        return (self.busy - simulated) / max(1, self.images) * 1000


@dataclass
class Result:
    policy: str
    makespan: float
    switches: int  # models really loaded by the simulators (initial loads not counted)
    switches_seen: int  # charforge's own count (charforge_checkpoint_switches)
    states: dict[str, int]
    per_backend: dict[str, Lane]
    submit_seconds: float
    # Per simulator, the checkpoints of the generations it ran, in order: what a direct
    # client replays (``replay``) to price the same plan without charforge.
    sequences: list[list[str]]

    @property
    def simulated(self) -> float:
        """The makespan had charforge added nothing per job: the busiest backend's images and
        switches at the simulated prices. It judges the plan apart from the host's speed."""
        return max(
            lane.images * IMAGE_SECONDS + lane.switches * SWITCH_SECONDS
            for lane in self.per_backend.values()
        )

    @property
    def overhead_ms(self) -> float:
        """Mean per image, over all backends, of attempt time beyond the simulated work."""
        lanes = self.per_backend.values()
        simulated = sum(la.images * IMAGE_SECONDS + la.switches * SWITCH_SECONDS for la in lanes)
        images = sum(la.images for la in lanes)
        return (sum(la.busy for la in lanes) - simulated) / max(1, images) * 1000


def backend_names(both_vars: bool = False) -> list[str]:
    """The names build_route_table gives the servers: two comma-separated env pools of two
    each, or (both_vars) all four in both variables, where each server is named once."""
    if both_vars:
        return ["realistic", "realistic-2", "realistic-3", "realistic-4"]
    return ["realistic", "realistic-2", "anime-cartoon-fantasy", "anime-cartoon-fantasy-2"]


def start_state(both_vars: bool = False) -> dict[str, str]:
    return {
        name: CHECKPOINTS[i % len(CHECKPOINTS)] for i, name in enumerate(backend_names(both_vars))
    }


@dataclass
class RemoteSim:
    """One simulator of the ``bench.sims`` process, driven over HTTP."""

    name: str
    url: str

    def state(self) -> dict[str, Any]:
        return dict(httpx.get(f"{self.url}/_simulator/state", timeout=10).json())

    @property
    def generations(self) -> int:
        return int(self.state()["generations"])

    @property
    def checkpoint_loads(self) -> int:
        return int(self.state()["checkpoint_loads"])


@contextmanager
def fleet() -> Iterator[list[RemoteSim]]:
    """Fresh simulators in a process of their own; backend i lists all checkpoints with
    checkpoint i % 3 first (loaded)."""
    specs = []
    for i in range(BACKENDS):
        first = i % len(CHECKPOINTS)
        specs.append(f"sim{i}=" + ",".join(CHECKPOINTS[first:] + CHECKPOINTS[:first]))
    process = subprocess.Popen(
        [sys.executable, "-m", "bench.sims", *specs],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert process.stdout is not None
        urls = json.loads(process.stdout.readline())
        sims = [RemoteSim(name, url) for name, url in urls.items()]
        for sim in sims:
            faults = {"delay_seconds": IMAGE_SECONDS, "switch_delay_seconds": SWITCH_SECONDS}
            httpx.post(f"{sim.url}/_simulator/faults", json=faults, timeout=10)
        yield sims
    finally:
        if process.stdin is not None:
            process.stdin.close()
        process.wait(timeout=30)


def settings_values(data_dir: Path, sims: list[RemoteSim], scenario: Scenario) -> dict[str, Any]:
    """The run's settings as field values: ``Settings(**values)`` here, environment variables
    for the worker processes of bench/fleet_distributed.py."""
    urls = [sim.url for sim in sims]
    everyone = backend_names(scenario.both_vars)
    routes: dict[str, dict[str, object]] = {
        style: {"checkpoint": checkpoint, "backends": everyone}
        for style, checkpoint in STYLES.items()
    }
    routes["cartoon"] = {"backends": everyone}  # a default style: must not name a lone backend
    if scenario.both_vars:
        realistic_urls = anime_urls = ",".join(urls)
    else:
        realistic_urls, anime_urls = ",".join(urls[:2]), ",".join(urls[2:])
    return {
        "data_dir": data_dir,  # SQLite in a fresh temporary folder (embedded runs)
        "runpod_realistic_url": realistic_urls,
        "runpod_anime_cartoon_fantasy_url": anime_urls,
        "routes": routes,  # validated into RouteConfig
        "pipeline": scenario.pipeline,
        # One attempt, no backoff: a failure shows up as a failed job, not as a retry's delay.
        "job_max_attempts": 1,
        "retry_backoff": 0.0,
        "retry_backoff_max": 0.0,
        "backend_timeout": 60.0,
        "probe_timeout": 5.0,
        # Health is not under test: no backend may be marked down by a slow probe mid-run.
        "health_failures": 100,
    }


def settings_for(data_dir: Path, sims: list[RemoteSim], scenario: Scenario) -> Settings:
    return Settings(**settings_values(data_dir, sims, scenario))


def naive_planner(order: list[str]) -> Planner:
    cursor = [0]

    def planner(
        queued: list[QueuedJob],
        free: list[FreeBackend],
        busy: list[tuple[str, str | None]],
        now: float,
    ) -> list[tuple[QueuedJob, str]]:
        return round_robin(queued, free, cursor=cursor, order=order)

    return planner


def write_jobs(
    db: Database, table: RouteTable, settings: Settings, n: int, seed: int
) -> tuple[list[JobTicket], float]:
    """The run's users, characters and ``n`` job rows, written through the service layer;
    returns the jobs' tickets and the seconds the job rows took (users and characters not
    counted)."""
    rng = random.Random(seed)
    with db.session() as session:
        owners = [users.create_user(session, f"user{u}", "bench-password") for u in range(USERS)]
        cast = {
            (owner.id, style): characters.create(
                session,
                owner,
                characters.CharacterFields(name=f"{style}-{owner.id}", art_style=style),
                table,
            ).id
            for owner in owners
            for style in STYLES
        }
        picks = [(rng.choice(owners), rng.choice(list(STYLES))) for _ in range(n)]

    began = time.perf_counter()
    with db.session() as session:
        jobs = [
            generation.submit(
                session,
                owner,  # detached but loaded: only its id is read
                GenerateBody(
                    prompt=f"{style} portrait {i}",
                    character_id=cast[(owner.id, style)],
                    **TINY,
                ),
                table,
                settings.defaults,
            )
            for i, (owner, style) in enumerate(picks)
        ]
        tickets = [JobTicket.of(job) for job in jobs]
    return tickets, time.perf_counter() - began


def lanes(
    names: list[str], sims: list[RemoteSim], attempts: list[JobAttempt], wall_start: datetime
) -> dict[str, Lane]:
    """Each backend's lane: images and switches from its simulator, busy time and last end
    from the attempt rows (``wall_start``: the first submit, in the rows' clock)."""
    per_backend = {}
    for backend, sim in zip(names, sims, strict=True):
        spans = [
            (a.started_at, a.finished_at or a.started_at) for a in attempts if a.backend == backend
        ]
        per_backend[backend] = Lane(
            images=sim.generations,
            switches=sim.checkpoint_loads,
            busy=sum((end - begin).total_seconds() for begin, end in spans),
            last=max(((end - wall_start).total_seconds() for _, end in spans), default=0.0),
        )
    return per_backend


def plans(sims: list[RemoteSim]) -> list[list[str]]:
    """Per simulator, the checkpoints of the generations it ran, in order (``replay``)."""
    return [[run["checkpoint"] for run in sim.state()["task_runs"].values()] for sim in sims]


def run(
    scenario: Scenario,
    make_queue: Callable[[Container], InlineJobQueue],
    n: int,
    seed: int,
) -> Result:
    with fleet() as sims, tempfile.TemporaryDirectory() as tmp:
        settings = settings_for(Path(tmp), sims, scenario)
        runner = build_runner(settings)
        container = Container(
            settings,
            runner.table,
            runner.db,
            runner.store,
            runner.pool,
            InlineJobQueue(runner),  # replaced below, once the container exists
            runner,
            runner.metrics,
        )
        container.queue = make_queue(container)
        container.start()
        try:
            names = backend_names(scenario.both_vars)
            assert sorted(container.table.backends) == sorted(names)  # one per server
            container.pool.probe(names, max_age=0.0)  # the scheduler starts knowing what's loaded
            loaded = {s.name: s.loaded for s in container.pool.statuses(names)}
            assert loaded == start_state(scenario.both_vars), loaded  # the setup, not a timing

            tickets, written = write_jobs(container.db, container.table, settings, n, seed)

            started = time.perf_counter()  # the first job reaches the dispatcher now
            wall_start = utcnow()
            for ticket in tickets:
                container.queue.submit(ticket)
            for ticket in tickets:
                container.queue.wait(ticket.id, timeout=600)
            makespan = time.perf_counter() - started

            with container.db.session() as session:
                states = repo.job_counts(session)
                attempts = [a for t in tickets for a in repo.attempts_of(session, t.id)]
            seen = sum(
                int(container.metrics.checkpoint_switches.labels(b)._value.get()) for b in names
            )
        finally:
            container.close()
        per_backend = lanes(names, sims, attempts, wall_start)
        sequences = plans(sims)
        return Result(
            policy=scenario.name,
            sequences=sequences,
            makespan=makespan,
            switches=sum(sim.checkpoint_loads for sim in sims),
            switches_seen=seen,
            states={k: v for k, v in states.items() if v},
            per_backend=per_backend,
            submit_seconds=written,
        )


def replay(sequences: list[list[str]]) -> float:
    """The makespan of a direct client: each simulator gets its sequence of generations back
    to back from one plain HTTP loop (no database, no store, no checks). Fresh simulators in
    the same start state; the same body size and steps as charforge's jobs."""
    with fleet() as sims:
        return send_back_to_back(
            {
                sim.url: [
                    {
                        "prompt": f"portrait {index}",
                        **{k: v for k, v in TINY.items() if k != "hires"},
                        "sampler_name": "DPM++ 2M",
                        "scheduler": "Karras",
                        "override_settings": {"sd_model_checkpoint": checkpoint},
                        "override_settings_restore_afterwards": False,
                    }
                    for index, checkpoint in enumerate(sequence)
                ]
                for sim, sequence in zip(sims, sequences, strict=True)
            }
        )


def send_back_to_back(bodies: dict[str, list[dict[str, Any]]]) -> float:
    """Seconds a plain HTTP client takes to send each simulator (by URL) its txt2img bodies
    one after the other, all simulators at once: what the stand-ins themselves cost."""

    def send_all(url: str) -> None:
        with httpx.Client(base_url=url, timeout=60) as client:
            for body in bodies[url]:
                client.post("/sdapi/v1/txt2img", json=body).raise_for_status()

    threads = [threading.Thread(target=send_all, args=(url,)) for url in bodies]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return time.perf_counter() - started


def checkpoint_counts(n: int, seed: int) -> dict[str, int]:
    """How many of the ``n`` jobs ask for each checkpoint (the run draws the same picks)."""
    rng = random.Random(seed)
    counts = dict.fromkeys(CHECKPOINTS, 0)
    for _ in range(n):
        rng.choice(range(USERS))  # the owner, drawn first in ``run``
        counts[STYLES[rng.choice(list(STYLES))]] += 1
    return counts


SCENARIOS = [
    Scenario("pipelined", pipeline=True),
    Scenario("no pipeline", pipeline=False),
    Scenario("both vars", pipeline=True, both_vars=True),
    Scenario("round robin", pipeline=False, naive=True),
]


def print_lanes(r: Result) -> None:
    print(
        f"  {'backend':<24} {'images':>6} {'switches':>8} {'busy':>7} {'last end':>8} "
        f"{'gpu idle':>8} {'own work/img':>12}"
    )
    for backend, lane in r.per_backend.items():
        print(
            f"  {backend:<24} {lane.images:6d} {lane.switches:8d} {lane.busy:6.2f}s "
            f"{lane.last:7.2f}s {lane.idle:7.2f}s {lane.overhead_ms():9.1f} ms"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=200)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--jobs-per-holder", type=int, default=Policy().jobs_per_holder)
    parser.add_argument("--max-wait", type=float, default=Policy().max_wait)
    parser.add_argument("--only", choices=[s.name for s in SCENARIOS], action="append")
    args = parser.parse_args()
    logging.basicConfig(level=logging.ERROR)

    policy = Policy(max_wait=args.max_wait, jobs_per_holder=args.jobs_per_holder)
    ideal = args.jobs * IMAGE_SECONDS / BACKENDS
    counts = checkpoint_counts(args.jobs, args.seed)
    holders = {c: list(start_state().values()).count(c) for c in CHECKPOINTS}
    best, fewest = best_makespan(counts, holders)
    print(
        f"{BACKENDS} simulators, {IMAGE_SECONDS:g} s per image, {SWITCH_SECONDS:g} s per "
        f"checkpoint switch; {args.jobs} jobs over {len(STYLES)} checkpoints in random order "
        f"(seed {args.seed}: {', '.join(f'{c} {k}' for c, k in counts.items())}), {USERS} "
        f"users; every route's pool = all {BACKENDS} backends"
    )
    print("start state (backend i loads checkpoint i % 3; names as charforge gives them):")
    for i, (backend, checkpoint) in enumerate(start_state().items()):
        print(f"  sim{i} = {backend:<24} {checkpoint}")
    print(f"model-aware policy: {policy}")
    print(
        f"no-switch ideal makespan = {args.jobs} x {IMAGE_SECONDS:g} s / {BACKENDS} = {ideal:.2f} s"
    )
    print(
        f"best possible makespan from this start = {best:.2f} s with {fewest} switches "
        f"(the fewest any plan needs)"
    )

    runs: list[Result] = []
    direct: dict[str, float] = {}
    for scenario in SCENARIOS:
        if args.only and scenario.name not in args.only:
            continue

        def make_queue(c: Container, scenario: Scenario = scenario) -> InlineJobQueue:
            if scenario.naive:
                order = backend_names(scenario.both_vars)
                return InlineJobQueue(c.runner, planner=naive_planner(order))
            return InlineJobQueue(c.runner, policy=policy)

        result = run(scenario, make_queue, args.jobs, args.seed)
        runs.append(result)
        if not scenario.naive:
            direct[scenario.name] = replay(result.sequences)

    print()
    print(
        f"{'run':<12} {'makespan':>9} {'direct':>7} {'eff (direct)':>12} {'eff (best)':>10} "
        f"{'eff (ideal)':>11} {'switches':>8}   {'plan-only':>9} {'plan eff':>8}  jobs"
    )
    for r in runs:
        states = ", ".join(f"{k} {v}" for k, v in sorted(r.states.items()))
        same = direct.get(r.policy)
        print(
            f"{r.policy:<12} {r.makespan:8.2f}s "
            f"{f'{same:6.2f}s' if same else '      -'} "
            f"{f'{same / r.makespan:12.3f}' if same else '           -'} "
            f"{best / r.makespan:10.3f} {ideal / r.makespan:11.3f} {r.switches:8d}   "
            f"{r.simulated:8.2f}s {best / r.simulated:8.3f}  {states}"
        )
    by_name = {r.policy: r for r in runs}
    aware, naive = by_name.get("pipelined"), by_name.get("round robin")
    if aware is not None and "pipelined" in direct:
        efficiency = direct["pipelined"] / aware.makespan
        met = efficiency >= GOAL_EFFICIENCY and aware.switches <= fewest
        print(
            f"goal (issue): efficiency >= {GOAL_EFFICIENCY:.2f} with <= {fewest} switches: "
            f"{efficiency:.3f} of a direct client running the same plan, {aware.switches} "
            f"switches -> {'met' if met else 'MISSED'}; against the best possible (no cost "
            f"per request at all) {best / aware.makespan:.3f}"
        )
    if aware is not None and naive is not None and naive.switches:
        share = aware.switches / naive.switches
        print(
            f"switches pipelined / round robin = {aware.switches}/{naive.switches} = "
            f"{share:.3f}; speed-up over round robin {naive.makespan / aware.makespan:.2f}x"
        )
    print()
    print(
        "makespan: first job handed to the dispatcher -> last job final. direct: the same "
        "generations, in the same order per simulator, sent back to back by a plain HTTP loop "
        "(what the stand-ins themselves cost); eff (direct): direct / makespan, charforge's "
        "own cost. eff (best): best possible makespan / makespan; eff (ideal): no-switch "
        "ideal / makespan. plan eff: best / plan-only. switches: "
        "models loaded by the simulators themselves (the initial load not counted). "
        "plan-only: the busiest backend's images x 0.2 s + switches x 1.0 s, i.e. the makespan "
        "had charforge added nothing per job."
    )
    for r in runs:
        print(
            f"{r.policy}: charforge's own work {r.overhead_ms:.1f} ms/image (attempt time "
            f"beyond the simulated work); charforge_checkpoint_switches metric = "
            f"{r.switches_seen}; job rows written in {r.submit_seconds:.2f} s before the first "
            "submit (not in the makespan)"
        )
        print_lanes(r)
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    print(
        f"host: {os.cpu_count()} CPUs, load average {load} (the simulators run in a process "
        "of their own)"
    )


if __name__ == "__main__":
    main()
