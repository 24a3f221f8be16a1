"""Users, API tokens and characters from the command line."""

from __future__ import annotations

import sys
from typing import Annotated, Any

import typer

from charforge.cli.common import (
    _fail,
    _opened,
    characters_app,
    err,
    out,
    tokens_app,
    users_app,
)


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
    with _opened(create=True) as c, c.db.session() as session:
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
