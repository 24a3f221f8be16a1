"""First-run setup, sign-in, sign-out and the account page (API tokens)."""

from __future__ import annotations

import threading
from typing import Annotated

from fastapi import APIRouter, Form, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from starlette.concurrency import run_in_threadpool

from charforge.db import repositories as repo
from charforge.errors import CharforgeError, LoginThrottled
from charforge.services import quotas, users
from charforge.web.render import container_of, page
from charforge.web.session import check_csrf, require_user, sign_in, sign_out, signed_in_user

router = APIRouter(include_in_schema=False)
# Setup creates the one first admin: checking "no users yet" and creating one must not
# interleave between two requests.
_SETUP_LOCK = threading.Lock()


class _SetupClosed(Exception):
    pass


FormStr = Annotated[str, Form()]


def _no_users(request: Request) -> bool:
    with container_of(request).db.session() as session:
        return repo.count_users(session) == 0


def _safe_next(target: str | None) -> str:
    # Only local paths: never bounce a user to another site after sign-in.
    if target and target.startswith("/") and not target.startswith("//"):
        return target
    return "/characters"


@router.get("/")
def home(request: Request) -> Response:
    if _no_users(request):
        return RedirectResponse("/setup", status_code=303)
    if signed_in_user(request, container_of(request)) is None:
        return RedirectResponse("/login", status_code=303)
    return RedirectResponse("/characters", status_code=303)


@router.get("/setup", response_class=HTMLResponse)
def setup_form(request: Request) -> Response:
    if not _no_users(request):
        return RedirectResponse("/login", status_code=303)
    return page(request, "setup.html", None, error=None, name="")


@router.post("/setup")
async def setup(
    request: Request, name: FormStr, password: FormStr, confirm: FormStr, csrf_token: FormStr
) -> Response:
    check_csrf(request, csrf_token)
    c = container_of(request)

    def create() -> Response:
        with _SETUP_LOCK, c.db.session() as session:
            if repo.count_users(session):  # someone was quicker: setup is closed
                return RedirectResponse("/login", status_code=303)
            if password != confirm:
                return page(
                    request, "setup.html", None, 422, error="The passwords differ.", name=name
                )
            try:
                user = users.create_user(session, name, password, is_admin=True)
                if repo.count_users(session) != 1:  # another process won the race
                    raise _SetupClosed()
            except _SetupClosed:
                session.rollback()
                return RedirectResponse("/login", status_code=303)
            except CharforgeError as exc:
                session.rollback()
                return page(
                    request,
                    "setup.html",
                    None,
                    422,
                    error=exc.message + " " + (exc.hint or ""),
                    name=name,
                )
            sign_in(request, user)
        return RedirectResponse("/characters", status_code=303)

    return await run_in_threadpool(create)


@router.get("/login", response_class=HTMLResponse)
def login_form(request: Request, next: str | None = None) -> Response:
    if _no_users(request):
        return RedirectResponse("/setup", status_code=303)
    return page(request, "login.html", None, error=None, name="", next=_safe_next(next))


@router.post("/login")
async def login(
    request: Request,
    name: FormStr,
    password: FormStr,
    csrf_token: FormStr,
    next: Annotated[str, Form()] = "/characters",
) -> Response:
    check_csrf(request, csrf_token)
    c = container_of(request)

    def verify() -> Response:
        address = request.client.host if request.client else "unknown"
        try:
            with c.db.session() as session:
                user = users.authenticate(
                    session,
                    name,
                    password,
                    address,
                    attempts=c.settings.login_attempts,
                    window=c.settings.login_window_seconds,
                )
        except LoginThrottled as exc:
            minutes = max(1, round(exc.retry_after / 60))
            response = page(
                request,
                "login.html",
                None,
                429,
                error=f"Too many failed sign-ins. Try again in about {minutes} minute(s).",
                name=name,
                next=_safe_next(next),
            )
            response.headers["Retry-After"] = str(exc.retry_after)
            return response
        if user is None:
            return page(
                request,
                "login.html",
                None,
                401,
                error="Wrong user name or password.",
                name=name,
                next=_safe_next(next),
            )
        sign_in(request, user)
        return RedirectResponse(_safe_next(next), status_code=303)

    return await run_in_threadpool(verify)


@router.post("/logout")
def logout(request: Request, csrf_token: FormStr) -> Response:
    check_csrf(request, csrf_token)
    sign_out(request, container_of(request))
    return RedirectResponse("/login", status_code=303)


@router.get("/account", response_class=HTMLResponse)
def account(request: Request) -> Response:
    c = container_of(request)
    user = require_user(request, c)
    with c.db.session() as session:
        tokens = list(users.list_tokens(session, user))
        used = quotas.usage(session, user, quotas.Limits.of(c.settings))
    return page(request, "account.html", user, tokens=tokens, new_token=None, usage=used)


@router.post("/account/tokens", response_class=HTMLResponse)
def create_token(
    request: Request, csrf_token: FormStr, label: Annotated[str, Form()] = "web"
) -> Response:
    check_csrf(request, csrf_token)
    c = container_of(request)
    user = require_user(request, c)
    with c.db.session() as session:
        _, token = users.create_token(session, user, label.strip() or "web")
        tokens = list(users.list_tokens(session, user))
        used = quotas.usage(session, user, quotas.Limits.of(c.settings))
    # Shown once, on this response only; the database keeps just its hash.
    return page(request, "account.html", user, tokens=tokens, new_token=token, usage=used)


@router.post("/account/tokens/{token_id}/revoke")
def revoke_token(request: Request, token_id: int, csrf_token: FormStr) -> Response:
    check_csrf(request, csrf_token)
    c = container_of(request)
    user = require_user(request, c)
    with c.db.session() as session:
        users.revoke_token(session, user, token_id)
    return RedirectResponse("/account", status_code=303)
