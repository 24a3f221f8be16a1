"""Fleet throughput: 200 jobs over 3 checkpoints on 4 A1111 simulators, dispatched by the
model-aware scheduler (jobs/scheduler.py ``plan``) and by naive round robin (``round_robin``).

Each simulator takes 0.2 s per image and 1.0 s more whenever its loaded checkpoint must
change; every simulator serves all 3 checkpoints and every style's pool is all 4 backends.
Backend i starts with checkpoint i % 3 loaded. Jobs are written through the service layer
(``generation.submit``) and handed to the embedded dispatcher (``InlineJobQueue``).

Run: ``.venv/bin/python -m bench.fleet [--jobs 200] [--seed 7] [--jobs-per-holder 4]``.
Prints figures; asserts nothing about time.
"""

from __future__ import annotations

import argparse
import logging
import os
import random
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path

from charforge.config import Settings
from charforge.container import Container, build_runner
from charforge.db import repositories as repo
from charforge.db.models import utcnow
from charforge.domain.params import GenerateBody
from charforge.jobs.inline import InlineJobQueue, Planner
from charforge.jobs.scheduler import FreeBackend, Policy, QueuedJob, round_robin
from charforge.jobs.tickets import JobTicket
from charforge.services import characters, generation, users
from charforge.simulator import A1111Simulator, SimulatorSettings

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
GOAL_EFFICIENCY = 0.9
GOAL_SWITCH_SHARE = 0.1  # fewer than a tenth of the naive run's switches


@dataclass
class Lane:
    """One backend's share of a run, from the simulator and the job_attempts rows."""

    images: int  # generations the simulator ran
    switches: int  # models the simulator loaded
    busy: float  # seconds inside attempts (claim to finish: charforge's work included)
    last: float  # seconds from the first submit to its last attempt's end

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


def backend_names() -> list[str]:
    """The names build_route_table gives the two comma-separated env pools below."""
    return ["realistic", "realistic-2", "anime-cartoon-fantasy", "anime-cartoon-fantasy-2"]


def start_state() -> dict[str, str]:
    return {name: CHECKPOINTS[i % len(CHECKPOINTS)] for i, name in enumerate(backend_names())}


@contextmanager
def fleet() -> Iterator[list[A1111Simulator]]:
    """Fresh simulators; backend i lists all checkpoints with checkpoint i % 3 first (loaded)."""
    with ExitStack() as stack:
        sims = []
        for i in range(BACKENDS):
            first = i % len(CHECKPOINTS)
            models = CHECKPOINTS[first:] + CHECKPOINTS[:first]
            sim = A1111Simulator(SimulatorSettings(models=models, name=f"sim{i}"))
            sim.faults.delay_seconds = IMAGE_SECONDS
            sim.faults.switch_delay_seconds = SWITCH_SECONDS
            stack.enter_context(sim)
            sims.append(sim)
        yield sims


def settings_for(data_dir: Path, sims: list[A1111Simulator]) -> Settings:
    urls = [sim.url for sim in sims]
    everyone = backend_names()
    routes: dict[str, dict[str, object]] = {
        style: {"checkpoint": checkpoint, "backends": everyone}
        for style, checkpoint in STYLES.items()
    }
    routes["cartoon"] = {"backends": everyone}  # a default style: must not name a lone backend
    return Settings(
        data_dir=data_dir,  # SQLite in a fresh temporary folder
        runpod_realistic_url=",".join(urls[:2]),
        runpod_anime_cartoon_fantasy_url=",".join(urls[2:]),
        routes=routes,  # validated into RouteConfig
        # One attempt, no backoff: a failure shows up as a failed job, not as a retry's delay.
        job_max_attempts=1,
        retry_backoff=0.0,
        retry_backoff_max=0.0,
        backend_timeout=60.0,
        probe_timeout=5.0,
        # Health is not under test: no backend may be marked down by a slow probe mid-run.
        health_failures=100,
    )


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


def run(name: str, make_queue: Callable[[Container], InlineJobQueue], n: int, seed: int) -> Result:
    with fleet() as sims, tempfile.TemporaryDirectory() as tmp:
        settings = settings_for(Path(tmp), sims)
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
            names = backend_names()
            container.pool.probe(names, max_age=0.0)  # the scheduler starts knowing what's loaded
            loaded = {s.name: s.loaded for s in container.pool.statuses(names)}
            assert loaded == start_state(), loaded  # the setup, not a timing

            rng = random.Random(seed)
            with container.db.session() as session:
                owners = [
                    users.create_user(session, f"user{u}", "bench-password") for u in range(USERS)
                ]
                cast = {
                    (owner.id, style): characters.create(
                        session,
                        owner,
                        characters.CharacterFields(name=f"{style}-{owner.id}", art_style=style),
                        container.table,
                    ).id
                    for owner in owners
                    for style in STYLES
                }
                picks = [(rng.choice(owners), rng.choice(list(STYLES))) for _ in range(n)]

            began = time.perf_counter()
            with container.db.session() as session:
                jobs = [
                    generation.submit(
                        session,
                        owner,  # detached but loaded: only its id is read
                        GenerateBody(
                            prompt=f"{style} portrait {i}",
                            character_id=cast[(owner.id, style)],
                            **TINY,
                        ),
                        container.table,
                        settings.defaults,
                    )
                    for i, (owner, style) in enumerate(picks)
                ]
                tickets = [JobTicket.of(job) for job in jobs]
            written = time.perf_counter() - began

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
        per_backend = {}
        for backend, sim in zip(names, sims, strict=True):
            spans = [
                (a.started_at, a.finished_at or a.started_at)
                for a in attempts
                if a.backend == backend
            ]
            per_backend[backend] = Lane(
                images=sim.generations,
                switches=sim.checkpoint_loads,
                busy=sum((end - begin).total_seconds() for begin, end in spans),
                last=max(((end - wall_start).total_seconds() for _, end in spans), default=0.0),
            )
        return Result(
            policy=name,
            makespan=makespan,
            switches=sum(sim.checkpoint_loads for sim in sims),
            switches_seen=seen,
            states={k: v for k, v in states.items() if v},
            per_backend=per_backend,
            submit_seconds=written,
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=200)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--jobs-per-holder", type=int, default=Policy().jobs_per_holder)
    parser.add_argument("--max-wait", type=float, default=Policy().max_wait)
    parser.add_argument("--only", choices=["model-aware", "round-robin"])
    args = parser.parse_args()
    logging.basicConfig(level=logging.ERROR)

    policy = Policy(max_wait=args.max_wait, jobs_per_holder=args.jobs_per_holder)
    ideal = args.jobs * IMAGE_SECONDS / BACKENDS
    print(
        f"{BACKENDS} simulators, {IMAGE_SECONDS:g} s per image, {SWITCH_SECONDS:g} s per "
        f"checkpoint switch; {args.jobs} jobs over {len(STYLES)} checkpoints in random order "
        f"(seed {args.seed}), {USERS} users; every route's pool = all {BACKENDS} backends"
    )
    print(
        "start state (backend i loads checkpoint i % 3; the names are those charforge gives "
        "two comma-separated env pools, each route overrides its pool to all four):"
    )
    for i, (backend, checkpoint) in enumerate(start_state().items()):
        print(f"  sim{i} = {backend:<24} {checkpoint}")
    print(f"model-aware policy: {policy}")
    print(f"ideal makespan = {args.jobs} x {IMAGE_SECONDS:g} s / {BACKENDS} = {ideal:.1f} s")

    runs: list[Result] = []
    if args.only != "round-robin":
        runs.append(
            run(
                "model-aware",
                lambda c: InlineJobQueue(c.runner, policy=policy),
                args.jobs,
                args.seed,
            )
        )
    if args.only != "model-aware":
        runs.append(
            run(
                "round-robin",
                lambda c: InlineJobQueue(c.runner, planner=naive_planner(backend_names())),
                args.jobs,
                args.seed,
            )
        )

    print()
    print(
        f"{'policy':<12} {'makespan':>9} {'efficiency':>10} {'switches':>8}   "
        f"{'plan-only makespan':>18} {'plan-only eff':>13}  jobs"
    )
    for r in runs:
        states = ", ".join(f"{k} {v}" for k, v in sorted(r.states.items()))
        print(
            f"{r.policy:<12} {r.makespan:8.2f}s {ideal / r.makespan:10.2f} {r.switches:8d}   "
            f"{r.simulated:17.2f}s {ideal / r.simulated:13.2f}  {states}"
        )
    if len(runs) == 2:
        aware, naive = runs
        share = aware.switches / naive.switches if naive.switches else float("nan")
        efficiency = ideal / aware.makespan
        print(
            f"switches model-aware / round-robin = {aware.switches}/{naive.switches} = "
            f"{share:.3f}; speed-up over round robin {naive.makespan / aware.makespan:.2f}x"
        )
        print(
            f"goal (issue): efficiency >= {GOAL_EFFICIENCY:.2f}: model-aware {efficiency:.2f} "
            f"-> {'met' if efficiency >= GOAL_EFFICIENCY else 'MISSED'}"
        )
        print(
            f"goal (issue): switches < {GOAL_SWITCH_SHARE:g} x naive: {share:.3f} "
            f"-> {'met' if share < GOAL_SWITCH_SHARE else 'MISSED'}"
        )
    print()
    print(
        "makespan: first job handed to the dispatcher -> last job final. switches: models "
        "loaded by the simulators themselves (the initial load not counted). plan-only: the "
        "busiest backend's images x 0.2 s + switches x 1.0 s, i.e. the makespan had charforge "
        "added nothing per job."
    )
    for r in runs:
        print(
            f"{r.policy}: mean overhead {r.overhead_ms:.1f} ms/image beyond the simulated work; "
            f"charforge_checkpoint_switches metric = {r.switches_seen}; job rows written in "
            f"{r.submit_seconds:.2f} s before the first submit (not in the makespan)"
        )
        print(
            f"  {'backend':<24} {'images':>6} {'switches':>8} {'busy':>7} {'last end':>8} "
            f"{'idle':>6} {'overhead/img':>12}"
        )
        for backend, lane in r.per_backend.items():
            print(
                f"  {backend:<24} {lane.images:6d} {lane.switches:8d} {lane.busy:6.2f}s "
                f"{lane.last:7.2f}s {lane.last - lane.busy:5.2f}s {lane.overhead_ms():9.1f} ms"
            )
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    print(f"host: {os.cpu_count()} CPUs, load average {load} (simulators share this process)")


if __name__ == "__main__":
    main()
