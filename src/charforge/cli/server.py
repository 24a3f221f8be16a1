"""Commands that run things: serve, worker, migrate, generate, simulate-a1111."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Annotated, Any

import typer

from charforge.cli.common import (
    _container,
    _fail,
    _opened,
    _owner,
    _running_jobs_here,
    _settings,
    app,
    err,
    out,
)
from charforge.config import Settings


@app.command()
def serve(
    host: Annotated[str, typer.Option(help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on.")] = 8000,
    demo: Annotated[
        bool, typer.Option(help="Start two A1111 simulators on the default routes (no GPU).")
    ] = False,
) -> None:
    """Start the web server and API (upgrades the database first)."""
    import uvicorn

    from charforge.api.app import create_app

    companions: list[Any] = []
    overrides: dict[str, Any] = {}
    if demo:
        from charforge.demo import start_demo_backends

        backends = start_demo_backends()
        companions.append(backends)
        overrides = backends.settings_overrides()
    settings = _settings(**overrides)
    container = _container(settings)
    container.companions.extend(companions)
    if demo:
        _demo_account(container)
        err.print(
            "[bold black on yellow] DEMO MODE [/] images come from built-in A1111 simulators "
            f"({settings.runpod_realistic_url}, {settings.runpod_anime_cartoon_fantasy_url}); "
            "they are labelled placeholders, not real generations."
        )
    if host not in ("127.0.0.1", "localhost", "::1") and not settings.cookie_secure:
        err.print(
            "[yellow]warning:[/] listening beyond this machine with session cookies sent over "
            "plain HTTP; put charforge behind HTTPS and set CHARFORGE_COOKIE_SECURE=true."
        )
    mode = "distributed (Celery)" if settings.broker_url else "embedded"
    err.print(
        f"charforge on http://{host}:{port}  (API docs: http://{host}:{port}/docs), {mode} mode"
    )
    _configure_logging(settings)
    uvicorn.run(create_app(container), host=host, port=port, log_config=None)


def _configure_logging(settings: Settings) -> None:
    from charforge.observability.logs import configure_logging

    configure_logging(settings.log_format, settings.log_level)


@app.command()
def worker(
    checkpoints: Annotated[
        str | None,
        typer.Option(
            help="Comma-separated route checkpoints whose queues to consume "
            "(default: every route's, plus jobs for characters' own models)."
        ),
    ] = None,
    concurrency: Annotated[
        int | None,
        typer.Option(help="Jobs run at once (default: one per backend slot).", min=1, max=256),
    ] = None,
    metrics_port: Annotated[
        int | None,
        typer.Option(
            help="Serve this worker's Prometheus metrics (backend requests, switches, retries,"
            " in flight) on http://HOST:PORT/metrics.",
            min=1,
            max=65535,
        ),
    ] = None,
    metrics_host: Annotated[
        str, typer.Option(help="Address for --metrics-port (keep it on an internal network).")
    ] = "127.0.0.1",
) -> None:
    """Run jobs in distributed mode (needs CHARFORGE_BROKER_URL and a shared database)."""
    from charforge.container import build_runner, worker_id
    from charforge.db.migrate import upgrade
    from charforge.jobs.celery_queue import run_worker
    from charforge.jobs.fleet_board import RedisSlots

    settings = _settings()
    if not settings.broker_url:
        raise _fail(
            "charforge worker needs a broker.",
            hint="Set CHARFORGE_BROKER_URL=redis://HOST:6379/0 (and CHARFORGE_DATABASE_URL to "
            "the PostgreSQL database the servers use); without them `charforge serve` runs "
            "jobs itself.",
            code=2,
        )
    _configure_logging(settings)
    names = [c.strip() for c in checkpoints.split(",") if c.strip()] if checkpoints else None
    if names:
        _known_checkpoints(settings, names)
    _reach_broker(settings.broker_url, settings.broker_wait_seconds)
    slots = RedisSlots(settings.broker_url, ttl=settings.job_lease, owner=worker_id())
    ctx = build_runner(settings, slots=slots)
    upgrade(ctx.db.engine)
    if metrics_port is not None:
        from prometheus_client import start_http_server

        try:
            start_http_server(metrics_port, addr=metrics_host, registry=ctx.metrics.registry)
        except OSError as exc:
            raise _fail(f"--metrics-port {metrics_port}: {exc}", code=2) from exc
        err.print(f"worker metrics on http://{metrics_host}:{metrics_port}/metrics")
    run_worker(
        settings,
        ctx,
        checkpoints=names,
        slots=slots,
        # A thread per backend slot: with pipelining, one generating and one at its door.
        concurrency=concurrency or max(1, sum(s.limit for s in ctx.pool.statuses())),
    )


def _known_checkpoints(settings: Settings, names: list[str]) -> None:
    """``--checkpoints`` names only what a route serves: a typo would consume a queue no
    server ever sends to, and the worker would idle for ever."""
    from charforge.domain.checkpoints import model_name
    from charforge.domain.routes import build_route_table

    try:
        table = build_route_table(settings)
    except ValueError as exc:
        raise _fail(str(exc), code=2) from exc
    known = sorted({r.checkpoint for r in table.routes.values()})
    served = {model_name(c) for c in known}
    unknown = [n for n in names if model_name(n) not in served]
    if unknown:
        raise _fail(
            f"--checkpoints names {', '.join(unknown)}, which no route serves.",
            hint=f"Name one or more of: {', '.join(known)} (or leave --checkpoints out to take "
            "every route's jobs and those of characters' own models).",
            code=2,
        )


def _reach_broker(url: str, wait: float) -> None:
    """Fail fast, naming the variable, instead of Celery retrying for ever with its own text."""
    import time

    from redis import Redis
    from redis.exceptions import RedisError

    client: Redis = Redis.from_url(url, socket_connect_timeout=2, socket_timeout=2)
    deadline = time.monotonic() + wait
    try:
        while True:
            try:
                client.ping()
                return
            except RedisError as exc:
                if time.monotonic() > deadline:
                    raise _fail(
                        f"Cannot reach the broker at {_redacted(url)} after {wait:.0f} s: {exc}",
                        hint="Check CHARFORGE_BROKER_URL (redis://HOST:6379/0) and that Redis "
                        "is running and reachable from this machine.",
                        code=2,
                    ) from exc
                time.sleep(1.0)
    finally:
        client.close()


def _redacted(url: str) -> str:
    from sqlalchemy.engine import make_url

    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # not a URL SQLAlchemy can read: show only its scheme
        return url.split("://", 1)[0] + "://..."


def _demo_account(container: Any) -> None:
    """A first run in demo mode gets a 'demo' admin and a token, printed once."""
    import secrets

    from charforge.db import repositories as repo
    from charforge.services import users

    with container.db.session() as session:
        if repo.count_users(session):
            return
        password = secrets.token_urlsafe(12)
        user = users.create_user(session, "demo", password, is_admin=True)
        _, token = users.create_token(session, user, "demo")
    err.print(f"Created user [bold]demo[/] (password {password}) with API token:\n{token}")


@app.command()
def migrate() -> None:
    """Upgrade the database to the current schema."""
    from charforge.db.migrate import current_revision

    with _opened(create=True) as c:
        out.print(f"database at revision {current_revision(c.db.engine)}")


@app.command()
def generate(
    character: Annotated[str, typer.Option(help="The character's name or id.")],
    prompt: Annotated[str, typer.Option(help="The scene to show the character in.")],
    negative: Annotated[str, typer.Option(help="What the image must not show.")] = "",
    out_file: Annotated[Path | None, typer.Option("--out", help="Copy the PNG here.")] = None,
    user: Annotated[
        str | None, typer.Option(help="Owner (needed when several users exist).")
    ] = None,
    seed: Annotated[int | None, typer.Option(help="Seed; default random.")] = None,
) -> None:
    """Generate one image of a character, on the checkpoint that made it."""
    from pydantic import ValidationError

    from charforge.db import images as image_rows
    from charforge.db import repositories as repo
    from charforge.domain.params import GenerateBody
    from charforge.jobs.runner import run_to_end
    from charforge.services import characters, generation, quotas

    settings = _settings()
    with _opened(settings) as container:
        try:
            with container.db.session() as session:
                owner = _owner(session, user)
                target = characters.find(session, owner, character)
                body = GenerateBody(
                    prompt=prompt, negative_prompt=negative, character_id=target.id, seed=seed
                )
                job = generation.submit(
                    session,
                    owner,
                    body,
                    container.table,
                    settings.defaults,
                    capabilities=container.pool.capabilities,
                    limits=quotas.Limits.of(settings),
                )
                job_id, owner_id = job.id, owner.id
        except ValidationError as exc:
            first = exc.errors()[0]
            raise _fail(f"{'.'.join(map(str, first['loc']))}: {first['msg']}") from exc
        # Run this one job here and nothing else: a server sharing the database keeps its own.
        with _running_jobs_here(container):
            run_to_end(container.runner, job_id, wait=settings.backend_timeout)
        with container.db.session() as session:
            done = repo.job(session, owner_id, job_id)
            if done is None:
                raise _fail(f"job {job_id} is gone: its character was deleted meanwhile")
            if done.state != "succeeded":
                message = done.error_message or "the job did not finish"
                raise _fail(f"job {job_id} {done.state}: {message}", done.error_hint)
            images = list(image_rows.images_of_job(session, job_id))
        for image in images:
            path = container.store.path(image.file_path)
            if out_file is not None:
                out_file.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(path, out_file)
                path = out_file
            out.print(
                f"{image.art_style} · {image.checkpoint} · {image.backend} · seed {image.seed} · "
                f"{image.width}x{image.height}" + (" · SIMULATED" if image.simulated else "")
            )
            print(path)


@app.command("simulate-a1111")
def simulate_a1111(
    port: Annotated[int, typer.Option(help="Port to listen on.")] = 7860,
    models: Annotated[
        str, typer.Option(help="Comma-separated checkpoint file names.")
    ] = "diving.safetensors",
    host: Annotated[str, typer.Option(help="Address to listen on.")] = "127.0.0.1",
    flavor: Annotated[str, typer.Option(help="a1111 or forge.")] = "a1111",
    api_auth: Annotated[str | None, typer.Option(help="user:password, like --api-auth.")] = None,
    loras: Annotated[str, typer.Option(help="Comma-separated LoRA file names (models/Lora).")] = "",
    nowebui: Annotated[
        bool, typer.Option(help="Like --nowebui: no per-task route (/internal/progress).")
    ] = False,
    controlnet: Annotated[
        bool,
        typer.Option(
            help="Act as if sd-webui-controlnet is installed: /controlnet/* routes and the"
            " controlnet always-on script (reference_only and friends need no model)."
        ),
    ] = False,
    controlnet_model: Annotated[
        list[str] | None,
        typer.Option(
            "--controlnet-model",
            metavar="NAME",
            help="A ControlNet / IP-Adapter model the extension lists, as 'name \\[hash]'"
            " (repeatable), e.g. 'ip-adapter_sd15 \\[6a3f6166]'.",
        ),
    ] = None,
    delay: Annotated[
        float,
        typer.Option(
            help="Seconds each generation takes, spread over its sampling steps (a GPU's pace;"
            ' change it at run time with POST /_simulator/faults {"delay_seconds": S}).',
            min=0.0,
            max=3600.0,
        ),
    ] = 0.0,
) -> None:
    """Run an A1111 WebUI stand-in that draws labelled placeholders (no GPU needed)."""
    from charforge.simulator import SimulatorSettings, run_simulator

    names = [m.strip() for m in models.split(",") if m.strip()]
    if not names:
        raise _fail("--models needs at least one checkpoint file name", code=2)
    if flavor not in ("a1111", "forge"):
        raise _fail(f"--flavor must be a1111 or forge, not {flavor!r}", code=2)
    auth = None
    if api_auth:
        user, sep, password = api_auth.partition(":")
        if not sep:
            raise _fail("--api-auth must look like user:password", code=2)
        auth = (user, password)
    err.print(f"A1111 simulator ({flavor}) with {', '.join(names)} on http://{host}:{port}")
    settings = SimulatorSettings(
        models=names,
        flavor=flavor,  # type: ignore[arg-type]
        api_auth=auth,
        loras=[n.strip() for n in loras.split(",") if n.strip()],
        nowebui=nowebui,
        controlnet=controlnet,
        controlnet_models=[m.strip() for m in controlnet_model or [] if m.strip()],
    )
    run_simulator(settings, host, port, delay_seconds=delay)
