"""Sign-in state and CSRF protection for the pages.

The session is a signed cookie (Starlette's SessionMiddleware: HttpOnly, SameSite=Lax, Secure
when ``CHARFORGE_COOKIE_SECURE``) holding the user id and a random CSRF token. Every form
carries the token and every state-changing request must echo it (form field or
``X-CSRF-Token`` header), so another site cannot act for a signed-in user.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path

from fastapi import Request

from charforge.config import Settings
from charforge.container import Container
from charforge.db import repositories as repo
from charforge.db.models import User
from charforge.errors import CharforgeError

CSRF_FIELD = "csrf_token"
CSRF_HEADER = "x-csrf-token"


class NotSignedIn(Exception):
    """Raised by pages that need a user; rendered as a redirect to the sign-in page."""

    def __init__(self, next_url: str) -> None:
        super().__init__(next_url)
        self.next_url = next_url


class CsrfFailed(CharforgeError):
    code = "csrf_failed"
    status = 403


SECRET_KEY_MIN = 32


def secret_key(settings: Settings) -> str:
    """The configured key, else one generated once and kept in the data dir (mode 600).

    A short or empty key would let anyone sign a session cookie, so it is refused.
    """
    if settings.secret_key is not None:
        key = settings.secret_key.get_secret_value()
        if len(key) < SECRET_KEY_MIN:
            raise ValueError(
                f"CHARFORGE_SECRET_KEY must be at least {SECRET_KEY_MIN} characters "
                "(or unset, to have one generated into the data dir)"
            )
        return key
    path: Path = settings.data_dir / "secret_key"
    key = path.read_text().strip() if path.exists() else ""
    if len(key) < SECRET_KEY_MIN:
        # Written whole to a temp file and renamed into place: never seen half-written.
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".secret_key.{secrets.token_hex(4)}")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as handle:
            handle.write(secrets.token_urlsafe(48))
            handle.flush()
            os.fsync(handle.fileno())
        try:
            os.link(tmp, path)  # fails if another process made one meanwhile: use theirs
        except FileExistsError:
            if len(path.read_text().strip()) < SECRET_KEY_MIN:
                os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
        key = path.read_text().strip()
    return key


def csrf_token(request: Request) -> str:
    token = request.session.get("csrf")
    if not isinstance(token, str):
        token = secrets.token_urlsafe(32)
        request.session["csrf"] = token
    return token


def check_csrf(request: Request, submitted: str | None) -> None:
    expected = request.session.get("csrf")
    given = submitted or request.headers.get(CSRF_HEADER)
    if (
        not expected
        or not given
        or not secrets.compare_digest(str(expected).encode(), given.encode("utf-8", "replace"))
    ):
        raise CsrfFailed(
            "This form has expired or did not come from charforge.",
            hint="Reload the page and submit it again.",
        )


def sign_in(request: Request, user: User) -> None:
    request.session.clear()  # nothing from before sign-in carries over
    request.session["uid"] = user.id
    request.session["epoch"] = user.session_epoch
    csrf_token(request)


def sign_out(request: Request, container: Container) -> None:
    """Ends this user's sessions on every device: the cookie is signed data, so a copy kept
    elsewhere stays valid until the user's session epoch moves on."""
    uid = request.session.get("uid")
    request.session.clear()
    if isinstance(uid, int):
        with container.db.session() as session:
            user = repo.user_by_id(session, uid)
            if user is not None:
                user.session_epoch += 1


def signed_in_user(request: Request, container: Container) -> User | None:
    uid = request.session.get("uid")
    if not isinstance(uid, int):
        return None
    with container.db.session() as session:
        user = repo.user_by_id(session, uid)
    if user is None or request.session.get("epoch") != user.session_epoch:
        return None
    return user


def require_user(request: Request, container: Container) -> User:
    user = signed_in_user(request, container)
    if user is None:
        target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
        raise NotSignedIn(target)
    return user
