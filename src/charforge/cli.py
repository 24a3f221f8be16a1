"""The ``charforge`` command line."""

from __future__ import annotations

import shutil
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape

from charforge.config import Settings, SettingsError, load_settings
from charforge.errors import CharforgeError

app = typer.Typer(no_args_is_help=True, add_completion=False, help=__doc__)
users_app = typer.Typer(no_args_is_help=True, help="Manage user accounts.")
tokens_app = typer.Typer(no_args_is_help=True, help="Manage API tokens.")
characters_app = typer.Typer(no_args_is_help=True, help="Manage characters.")
app.add_typer(users_app, name="users")
app.add_typer(tokens_app, name="tokens")
app.add_typer(characters_app, name="characters")

out = Console()
err = Console(stderr=True)


def _fail(message: str, hint: str | None = None, code: int = 1) -> typer.Exit:
    # Messages carry brackets of their own ("[backends.x]", "name [hash]"): not markup.
    err.print(f"[bold red]error:[/] {escape(message)}", highlight=False)
    if hint:
        err.print(f"[yellow]hint:[/] {escape(hint)}", highlight=False)
    return typer.Exit(code)


def _settings(**overrides: Any) -> Settings:
    try:
        return load_settings(**overrides)
    except SettingsError as exc:
        raise _fail(str(exc), code=2) from exc


def _container(settings: Settings) -> Any:
    """Database upgraded, no workers: a command acts only on what it was asked."""
    from sqlalchemy.exc import OperationalError

    from charforge.container import build_container
    from charforge.db.migrate import upgrade

    try:
        container = build_container(settings)
        upgrade(container.db.engine)
    except ValueError as exc:
        raise _fail(str(exc), code=2) from exc
    except OperationalError as exc:
        raise _fail(
            f"Cannot open the database: {exc.orig}",
            hint="Check CHARFORGE_DATABASE_URL (or CHARFORGE_DATA_DIR for the SQLite default).",
            code=2,
        ) from exc
    return container


@contextmanager
def _opened(settings: Settings | None = None) -> Iterator[Any]:
    """The container for one command: a charforge error ends it with its message and hint."""
    container = _container(settings or _settings())
    try:
        yield container
    except CharforgeError as exc:
        raise _fail(exc.message, exc.hint) from exc
    finally:
        container.close()


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
) -> None:
    """Run jobs in distributed mode (needs CHARFORGE_BROKER_URL and a shared database)."""
    from charforge.container import build_runner
    from charforge.db.migrate import upgrade
    from charforge.jobs.celery_queue import RedisSlots, run_worker

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
    slots = RedisSlots(settings.broker_url, ttl=settings.job_lease)
    ctx = build_runner(settings, slots=slots)
    upgrade(ctx.db.engine)
    names = [c.strip() for c in checkpoints.split(",") if c.strip()] if checkpoints else None
    run_worker(
        settings,
        ctx,
        checkpoints=names,
        # A thread per backend slot: with pipelining, one generating and one at its door.
        concurrency=concurrency or max(1, sum(s.limit for s in ctx.pool.statuses())),
    )


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

    with _opened() as container:
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
        else:
            out.print(_check_table(Table, checks, running))
            out.print(_server_table(Table, checks, running))
        if broken:
            raise _fail(
                f"no working backend for: {', '.join(broken)}",
                hint="Start the backend (A1111/Forge with --api, ComfyUI, the RunPod endpoint), "
                "put the checkpoint where it looks for models, or fix the RUNPOD_*_URL / "
                "[backends] entry the failing backend comes from.",
            )


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
        "backend", "also named", "kind", "serves", "reachable", "running", "loaded", "identity"
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

    with _opened() as c:
        out.print(f"database at revision {current_revision(c.db.engine)}")


@users_app.command("add")
def users_add(
    name: str,
    admin: Annotated[bool, typer.Option("--admin", help="Make the user an administrator.")] = False,
    password_stdin: Annotated[
        bool, typer.Option("--password-stdin", help="Read the password from standard input.")
    ] = False,
) -> None:
    """Create a user."""
    from charforge.services import users

    if password_stdin:
        password = sys.stdin.readline().rstrip("\r\n")
    else:
        password = typer.prompt("Password", hide_input=True, confirmation_prompt=True)
    with _opened() as c, c.db.session() as session:
        user = users.create_user(session, name, password, is_admin=admin)
        role = "admin" if user.is_admin else "user"
    out.print(f"created {role} {name}")


@users_app.command("list")
def users_list() -> None:
    """List users."""
    from charforge.db import repositories as repo

    with _opened() as c, c.db.session() as session:
        for user in repo.all_users(session):
            out.print(f"{user.id}\t{user.name}\t{'admin' if user.is_admin else 'user'}")


def _names_option(given: str | None, every: bool, what: str) -> tuple[bool, list[str] | None]:
    if given is not None and every:
        raise _fail(f"Give --{what} or --all-{what}, not both.")
    if every:
        return True, None
    if given is None:
        return False, None
    return True, [n for n in (part.strip() for part in given.split(",")) if n]


@users_app.command("set")
def users_set(
    name: str,
    nsfw: Annotated[
        bool | None, typer.Option("--nsfw/--no-nsfw", help="May request NSFW images.")
    ] = None,
    styles: Annotated[str | None, typer.Option(help="Allowed styles, comma-separated.")] = None,
    all_styles: Annotated[bool, typer.Option("--all-styles", help="Every style.")] = False,
    checkpoints: Annotated[
        str | None, typer.Option(help="Allowed checkpoints, comma-separated.")
    ] = None,
    all_checkpoints: Annotated[
        bool, typer.Option("--all-checkpoints", help="Every checkpoint.")
    ] = False,
    images_per_day: Annotated[int | None, typer.Option(help="Own images-per-day quota.")] = None,
    no_image_limit: Annotated[
        bool, typer.Option("--no-image-limit", help="No images-per-day quota.")
    ] = False,
    max_active_jobs: Annotated[int | None, typer.Option(help="Own active-jobs limit.")] = None,
    no_job_limit: Annotated[
        bool, typer.Option("--no-job-limit", help="No active-jobs limit.")
    ] = False,
) -> None:
    """Change a user's permissions (absent options stay as they are); audited as "cli"."""
    from charforge.services import audit, permissions, users

    patch: dict[str, Any] = {} if nsfw is None else {"nsfw": nsfw}
    for key, given, every, what in (
        ("styles", styles, all_styles, "styles"),
        ("checkpoints", checkpoints, all_checkpoints, "checkpoints"),
    ):
        present, value = _names_option(given, every, what)
        if present:
            patch[key] = value
    for key, number, unlimited, flag in (
        ("imagesPerDay", images_per_day, no_image_limit, "--images-per-day"),
        ("maxActiveJobs", max_active_jobs, no_job_limit, "--max-active-jobs"),
    ):
        if number is not None and unlimited:
            raise _fail(f"Give {flag} or its no-limit option, not both.")
        if number is not None or unlimited:
            patch[key] = number
    with _opened() as c, c.db.session() as session:
        after = permissions.update(
            session, audit.CLI_ACTOR, users.require_user(session, name), patch
        )
    out.print(f"{name}: " + ", ".join(f"{k}={v}" for k, v in after.items()))


@tokens_app.command("create")
def tokens_create(
    name: Annotated[str, typer.Argument(help="The user the token acts for.")],
    label: Annotated[str, typer.Option(help="A label to recognise the token by.")] = "cli",
) -> None:
    """Create an API token; the token alone is printed on the last line."""
    from charforge.services import users

    with _opened() as c, c.db.session() as session:
        row, token = users.create_token(session, users.require_user(session, name), label)
        token_id = row.id
    err.print(f"token {token_id} for {name} (shown once; store it now):")
    print(token)


@tokens_app.command("list")
def tokens_list(name: str) -> None:
    """List a user's tokens (never the tokens themselves)."""
    from charforge.services import users

    with _opened() as c, c.db.session() as session:
        for row in users.list_tokens(session, users.require_user(session, name)):
            state = "revoked" if row.revoked_at else "active"
            out.print(f"{row.id}\t{row.prefix}…\t{row.name}\t{state}\t{row.created_at:%Y-%m-%d}")


@tokens_app.command("revoke")
def tokens_revoke(name: str, token_id: int) -> None:
    """Revoke one of a user's tokens by its id."""
    from charforge.services import users

    with _opened() as c, c.db.session() as session:
        users.revoke_token(session, users.require_user(session, name), token_id)
    out.print(f"revoked token {token_id}")


@characters_app.command("add")
def characters_add(
    name: str,
    user: Annotated[str, typer.Option(help="Owner of the character.")],
    style: Annotated[str | None, typer.Option(help="anime, cartoon, fantasy or realistic.")] = None,
    appearance: Annotated[str, typer.Option(help="Traits that must recur.")] = "",
    description: Annotated[str, typer.Option()] = "",
    model: Annotated[str | None, typer.Option(help="Checkpoint; default: the style's.")] = None,
) -> None:
    """Create a character; prints its id."""
    from charforge.services import characters, users
    from charforge.services.characters import CharacterFields

    fields = CharacterFields(
        name=name, description=description, appearance=appearance, art_style=style, model=model
    )
    with _opened() as c, c.db.session() as session:
        created = characters.create(session, users.require_user(session, user), fields, c.table)
        info = (created.id, created.primary_style, created.model)
    out.print(f"{info[0]}\t{name}\t{info[1] or '-'}\t{info[2] or '-'}")


@characters_app.command("list")
def characters_list(user: Annotated[str, typer.Option(help="Owner of the characters.")]) -> None:
    """List a user's characters."""
    from charforge.services import characters, users

    with _opened() as c, c.db.session() as session:
        for ch in characters.list_for(session, users.require_user(session, user)):
            out.print(f"{ch.id}\t{ch.name}\t{ch.primary_style or '-'}\t{ch.model or '-'}")


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
        run_to_end(container.runner, job_id, wait=settings.backend_timeout)
        with container.db.session() as session:
            done = repo.job(session, owner_id, job_id)
            if done is None:
                raise _fail(f"job {job_id} is gone: its character was deleted meanwhile")
            if done.state != "succeeded":
                message = done.error_message or "the job did not finish"
                raise _fail(f"job {job_id} {done.state}: {message}", done.error_hint)
            images = list(repo.images_of_job(session, job_id))
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


def _owner(session: Any, name: str | None) -> Any:
    from charforge.db import repositories as repo
    from charforge.services import users

    if name:
        return users.require_user(session, name)
    everyone = list(repo.all_users(session))
    if len(everyone) == 1:
        return everyone[0]
    if everyone:
        raise CharforgeError(
            "Several users exist; say whose character this is.", hint="Add --user NAME."
        )
    raise CharforgeError(
        "No user exists yet.", hint="Create one with `charforge users add NAME --password-stdin`."
    )


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
    run_simulator(settings, host, port)


def main() -> None:
    app()
