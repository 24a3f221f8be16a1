"""``charforge backends check``: every route's backends, and every backend once."""

from __future__ import annotations

from typing import Annotated, Any

import typer
from rich.markup import escape

from charforge.cli.common import _fail, _opened, app, err, out

backends_app = typer.Typer(
    invoke_without_command=True,
    help="Check the backends of every route (plain `charforge backends` runs the check).",
)
app.add_typer(backends_app, name="backends")


@backends_app.callback()
def backends(ctx: typer.Context) -> None:
    if ctx.invoked_subcommand is None:
        check_backends(as_json=False)


@backends_app.command("check")
def check_backends(
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
) -> None:
    """For every route, each backend's kind, reachability, latency, whether the route's
    checkpoint is there (and its hash), jobs running and the loaded checkpoint. Exits 1 when
    a route has no working backend."""
    import json as json_module
    from dataclasses import asdict

    from rich.table import Table

    from charforge.db import repositories as repo
    from charforge.services.backend_checks import check_routes

    with _opened(create=True) as container:
        checks = check_routes(container.table, container.pool, max_age=0.0)
        with container.db.session() as session:
            running = repo.running_on_backends(session)  # every process's, from the database
        broken = [c.route.style for c in checks if not c.working]
        if as_json:
            report = [
                {
                    "route": c.route.style,
                    "checkpoint": c.route.checkpoint,
                    "working": c.working,
                    "backends": [
                        {**asdict(b), "working": b.working, "running": running.get(b.name, 0)}
                        for b in c.backends
                    ],
                }
                for c in checks
            ]
            out.print_json(json_module.dumps(report))
        elif out.width >= _TABLE_WIDTH:
            out.print(_check_table(Table, checks, running))
            out.print(_server_table(Table, checks, running))
        else:  # a narrow terminal, or piped without COLUMNS: a table would be unreadable
            _plain_report(checks, running)
        fleet_problem = _fleet(container) if container.settings.broker_url else None
        if fleet_problem:
            raise _fail(*fleet_problem)
        if broken:
            raise _fail(
                f"no working backend for: {', '.join(broken)}",
                hint="Start the backend (A1111/Forge with --api, ComfyUI, the RunPod endpoint), "
                "put the checkpoint where it looks for models, or fix the RUNPOD_*_URL / "
                "[backends] entry the failing backend comes from.",
            )


# The tables' ten columns need about this many; narrower, one line per fact reads better.
_TABLE_WIDTH = 120


def _plain_report(checks: list[Any], running: dict[str, int]) -> None:
    """The same facts as the tables, a few per line, for 80 columns or a pipe."""
    for check in sorted(checks, key=lambda c: c.route.style):
        out.print(
            f"[bold]route {check.route.style}[/]: checkpoint {escape(check.route.checkpoint)}"
        )
        for b in check.backends:
            state = "[green]up[/]" if b.reachable else f"[red]down[/]: {escape(b.error or '')}"
            present = {True: "present", False: "[red]missing[/]", None: "unknown"}
            out.print(f"  backend {b.name} ({escape(b.kind)}): {state}")
            latency = f"{b.latency_ms:.0f} ms" if b.latency_ms is not None else "-"
            out.print(
                f"    latency {latency}; checkpoint {present[b.checkpoint_present]}"
                f" (hash {b.checkpoint_hash or '-'}); running {running.get(b.name, 0)}"
            )
            out.print(f"    loaded {_loaded(b)}")
    seen: dict[str, Any] = {}
    for check in checks:
        for b in check.backends:
            seen.setdefault(b.name, b)
    out.print("[bold]backends[/] (each server once)")
    for name, b in sorted(seen.items()):
        aliases = f", also named {escape(', '.join(b.aliases))}" if b.aliases else ""
        out.print(
            f"  {name} ({escape(b.kind)}{aliases}): serves {', '.join(b.routes)};"
            f" identity {_identity(b)}"
        )


def _fleet(container: Any) -> tuple[str, str] | None:
    """Distributed mode: the broker answers and a live worker consumes every queue; prints
    what it found (to stderr, so --json stays one document) and returns the problem, if any."""
    from redis.exceptions import RedisError

    from charforge.jobs.celery_queue import unserved_queues
    from charforge.jobs.heartbeat import live_workers

    try:
        workers = live_workers(container.settings.broker_url)
    except RedisError as exc:
        return (
            f"the broker does not answer: {exc}",
            "Check CHARFORGE_BROKER_URL and that Redis is running.",
        )
    err.print("broker: [green]up[/]")
    for w in workers:
        err.print(f"worker {escape(w.worker)} on {escape(w.host)}: {', '.join(w.queues)}")
    if not workers:
        err.print("workers: [red]none alive[/]")
    missing = unserved_queues(container.table, workers)
    if missing:
        return (
            "no live worker consumes " + ", ".join(missing),
            "Start `charforge worker` (every queue) or one with --checkpoints for each; "
            "their jobs wait queued until one does.",
        )
    return None


def _check_table(table_class: Any, checks: list[Any], running: dict[str, int]) -> Any:
    table = table_class(
        "route",
        "checkpoint",
        "backend",
        "kind",
        "reachable",
        "latency",
        "present",
        "hash",
        "running",
        "loaded",
        title="Routes and their backends",
    )
    for check in sorted(checks, key=lambda c: c.route.style):
        for b in check.backends:
            present = {True: "[green]yes[/]", False: "[red]missing[/]", None: "?"}[
                b.checkpoint_present
            ]
            table.add_row(
                check.route.style,
                escape(check.route.checkpoint),
                b.name,
                escape(b.kind),
                "[green]up[/]" if b.reachable else f"[red]down[/]: {escape(b.error or '')}",
                f"{b.latency_ms:.0f} ms" if b.latency_ms is not None else "-",
                present,
                b.checkpoint_hash or "-",
                str(running.get(b.name, 0)),
                _loaded(b),
            )
    return table


def _loaded(check: Any) -> str:
    if check.load_failed:
        return f"[red]? (failed to load {escape(check.load_failed)})[/]"
    return escape(check.loaded or "-")


def _server_table(table_class: Any, checks: list[Any], running: dict[str, int]) -> Any:
    """Each backend once: one server, whatever names and routes point at it, has one slot,
    one loaded checkpoint and one health state."""
    table = table_class(
        "backend",
        "also named",
        "kind",
        "serves",
        "reachable",
        "running",
        "loaded",
        "identity",
        title="Backends (each server once)",
    )
    seen: dict[str, Any] = {}
    for check in checks:
        for b in check.backends:
            seen.setdefault(b.name, b)
    for name, b in sorted(seen.items()):
        table.add_row(
            name,
            escape(", ".join(b.aliases) or "-"),
            escape(b.kind),
            ", ".join(b.routes),
            "[green]up[/]" if b.reachable else "[red]down[/]",
            str(running.get(name, 0)),
            _loaded(b),
            _identity(b),
        )
    return table


def _identity(check: Any) -> str:
    """How the backend conditions on reference images, or that it cannot."""
    if "reference_image" not in check.capabilities:
        return "[yellow]none[/] (no ControlNet / IPAdapter)" if check.reachable else "-"
    return escape(check.identity_method or "?")
