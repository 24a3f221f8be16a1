"""The ``charforge`` command line: what every command shares (the app, errors, settings)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import typer
from rich.console import Console
from rich.markup import escape
from sqlalchemy.engine import make_url

from charforge.config import Settings, SettingsError, load_settings
from charforge.db.engine import normalize_url
from charforge.errors import CharforgeError

app = typer.Typer(
    no_args_is_help=True, add_completion=False, help="The ``charforge`` command line."
)
users_app = typer.Typer(no_args_is_help=True, help="Manage user accounts.")
tokens_app = typer.Typer(no_args_is_help=True, help="Manage API tokens.")
characters_app = typer.Typer(no_args_is_help=True, help="Manage characters.")
app.add_typer(users_app, name="users")
app.add_typer(tokens_app, name="tokens")
app.add_typer(characters_app, name="characters")

out = Console()
err = Console(stderr=True)
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


def _sqlite_file(settings: Settings) -> Path | None:
    """The SQLite file the settings name, or None for another database."""
    url = make_url(normalize_url(settings.effective_database_url))
    if url.get_backend_name() != "sqlite" or not url.database or url.database == ":memory:":
        return None
    return Path(url.database).resolve()


def _require_database(settings: Settings) -> None:
    """Commands that read users, tokens or characters never create a new, empty SQLite file
    (and then say a user is missing): run without the server's environment, they say so."""
    path = _sqlite_file(settings)
    if path is None or path.exists():
        return
    unset = not any(os.environ.get(v) for v in ("CHARFORGE_DATA_DIR", "CHARFORGE_DATABASE_URL"))
    raise _fail(
        f"No charforge database at {path}"
        + (
            " (CHARFORGE_DATA_DIR and CHARFORGE_DATABASE_URL are not set, so ./data was looked in)."
            if unset
            else "."
        ),
        hint="Run this with the server's environment (CHARFORGE_DATA_DIR or "
        "CHARFORGE_DATABASE_URL). A new install starts with `charforge users add NAME --admin "
        "--password-stdin` or `charforge serve`.",
        code=2,
    )


@contextmanager
def _opened(settings: Settings | None = None, *, create: bool = False) -> Iterator[Any]:
    """The container for one command: a charforge error ends it with its message and hint.
    Without ``create``, a database that does not exist yet is an error, not a new file."""
    settings = settings or _settings()
    if not create:
        from charforge.domain.routes import build_route_table

        try:  # a wrong backend setting is the first thing to say
            build_route_table(settings)
        except ValueError as exc:
            raise _fail(str(exc), code=2) from exc
        _require_database(settings)
    container = _container(settings)
    try:
        yield container
    except CharforgeError as exc:
        raise _fail(exc.message, exc.hint) from exc
    finally:
        container.close()


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


@contextmanager
def _running_jobs_here(container: Any) -> Iterator[None]:
    """A command that runs jobs in its own process: in distributed mode it sends heartbeats
    like a worker (consuming no queue), or the servers' sweepers would take it for dead and
    take its jobs back mid-run."""
    if not container.settings.broker_url:
        yield
        return
    from charforge.jobs.heartbeat import Heartbeat

    beat = Heartbeat(str(container.settings.broker_url), container.runner.worker, [], 0)
    beat.start()
    try:
        yield
    finally:
        beat.stop()
