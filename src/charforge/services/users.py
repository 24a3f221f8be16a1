"""Users, passwords (argon2) and API tokens (random, stored as sha256)."""

from __future__ import annotations

import hashlib
import re
import secrets
from collections.abc import Sequence
from datetime import datetime, timedelta

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError
from sqlalchemy import delete, select
from sqlalchemy.orm import Session

from charforge.db import repositories as repo
from charforge.db.models import ApiToken, LoginFailure, User, utcnow
from charforge.errors import Conflict, InvalidInput, LoginThrottled, NotFound

TOKEN_PREFIX = "cf_"  # noqa: S105 - a marker, not a secret
PASSWORD_MIN = 8
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.@-]{0,63}$")
_hasher = PasswordHasher()


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def create_user(session: Session, name: str, password: str, *, is_admin: bool = False) -> User:
    name = name.strip()
    if not _NAME.match(name):
        raise InvalidInput(
            f"User name '{name}' is not allowed.",
            field="name",
            hint="Use 1-64 letters, digits, '.', '_', '-' or '@', starting with a letter or digit.",
        )
    if len(password) < PASSWORD_MIN:
        raise InvalidInput(
            f"The password is too short ({len(password)} characters).",
            field="password",
            hint=f"Use at least {PASSWORD_MIN} characters.",
        )
    if repo.user_by_name(session, name) is not None:
        raise Conflict(f"A user named '{name}' already exists.", field="name")
    user = User(name=name, password_hash=_hasher.hash(password), is_admin=is_admin)
    session.add(user)
    session.flush()
    return user


def verify_password(session: Session, name: str, password: str) -> User | None:
    user = repo.user_by_name(session, name)
    if user is None or not user.password_hash:
        _hasher.hash(password)  # same cost either way: no user-name oracle by timing
        return None
    try:
        _hasher.verify(user.password_hash, password)
    except (VerificationError, InvalidHashError):
        return None
    return user


def authenticate(
    session: Session,
    name: str,
    password: str,
    address: str,
    *,
    attempts: int,
    window: float,
    now: datetime | None = None,
) -> User | None:
    """Check a password under the sign-in throttle: after ``attempts`` failures within
    ``window`` seconds for the account or for the address, every try is a 429 (the right
    password included) until the oldest failure ages out. An account that does not exist is
    throttled the same way, so the answer never tells whether it exists."""
    now = now or utcnow()
    since = now - timedelta(seconds=window)
    keys = (("account", name.strip().lower()[:255]), ("address", (address or "unknown")[:255]))
    for scope, key in keys:
        times = session.scalars(
            select(LoginFailure.at)
            .where(LoginFailure.scope == scope, LoginFailure.key == key, LoginFailure.at >= since)
            .order_by(LoginFailure.at)
        ).all()
        if len(times) >= attempts:
            free_at = times[len(times) - attempts] + timedelta(seconds=window)
            raise LoginThrottled(
                "Too many failed sign-ins. Try again later.",
                retry_after=max(1.0, (free_at - now).total_seconds()),
                hint="Wait for the time in Retry-After. The limit is CHARFORGE_LOGIN_ATTEMPTS "
                "failures in CHARFORGE_LOGIN_WINDOW_SECONDS, per account and per address.",
            )
    user = verify_password(session, name, password)
    if user is None:
        # Old rows go as new ones come: the table stays the size of one window.
        session.execute(delete(LoginFailure).where(LoginFailure.at < since))
        session.add_all(LoginFailure(scope=scope, key=key, at=now) for scope, key in keys)
        return None
    session.execute(
        delete(LoginFailure).where(LoginFailure.scope == "account", LoginFailure.key == keys[0][1])
    )
    return user


def require_user(session: Session, name: str) -> User:
    user = repo.user_by_name(session, name)
    if user is None:
        raise NotFound(
            f"No user named '{name}'.", hint="Create one with `charforge users add NAME`."
        )
    return user


def create_token(session: Session, user: User, label: str = "default") -> tuple[ApiToken, str]:
    """Returns the row and the token itself, which is shown once and never stored."""
    token = TOKEN_PREFIX + secrets.token_urlsafe(32)
    row = ApiToken(
        user_id=user.id,
        name=label[:64] or "default",
        token_hash=hash_token(token),
        prefix=token[:10],
    )
    session.add(row)
    session.flush()
    return row, token


def user_for_token(session: Session, token: str) -> User | None:
    if not token.startswith(TOKEN_PREFIX):
        return None
    row = repo.token_by_hash(session, hash_token(token))
    if row is None:
        return None
    now = utcnow()
    if row.last_used_at is None or now - row.last_used_at > timedelta(minutes=1):
        row.last_used_at = now  # coarse, so reads don't turn into a write each
    return repo.user_by_id(session, row.user_id)


def list_tokens(session: Session, user: User) -> Sequence[ApiToken]:
    return repo.tokens_of(session, user.id)


def revoke_token(session: Session, user: User, token_id: int) -> None:
    for row in repo.tokens_of(session, user.id):
        if row.id == token_id:
            row.revoked_at = row.revoked_at or utcnow()
            return
    raise NotFound(f"No token {token_id} for user '{user.name}'.")
