"""The ``charforge`` command line: what every command shares (the app, errors, settings)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import typer
from rich.console import Console
from rich.markup import escape

from charforge.config import Settings, SettingsError, load_settings
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
