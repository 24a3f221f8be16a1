"""Mount the pages on the FastAPI app: session cookie, static files, HTML errors."""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import RedirectResponse, Response
from fastapi.staticfiles import StaticFiles
from starlette.middleware.sessions import SessionMiddleware
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from charforge.container import Container
from charforge.errors import CharforgeError
from charforge.web import (
    pages_auth,
    pages_batches,
    pages_characters,
    pages_gallery,
    pages_generate,
    pages_images,
    pages_references,
)
from charforge.web.render import page
from charforge.web.session import NotSignedIn, secret_key, signed_in_user

STATIC_DIR = Path(__file__).parent / "static"
# The pages have no inline script, style or handler (their JS and CSS are static files), so the
# policy can refuse every inline one: an injected <script> in a character's name would not run.
PAGE_CSP = (
    "default-src 'self'; img-src 'self' data: blob:; object-src 'none'; base-uri 'self'; "
    "frame-ancestors 'none'; form-action 'self'"
)
# FastAPI's /docs and /redoc load Swagger UI / ReDoc from a CDN and start them inline.
DOCS_CSP = (
    "default-src 'self'; script-src 'self' 'unsafe-inline' https://cdn.jsdelivr.net; "
    "style-src 'self' 'unsafe-inline' https://cdn.jsdelivr.net https://fonts.googleapis.com; "
    "font-src 'self' https://fonts.gstatic.com; img-src 'self' data: https:; worker-src blob:; "
    "object-src 'none'; base-uri 'self'; frame-ancestors 'none'"
)
_DOCS_PATHS = ("/docs", "/redoc")
_TITLES = {404: "Not found", 403: "Not allowed", 422: "Please check the form"}


def wants_html(request: Request) -> bool:
    return not request.url.path.startswith("/api/") and "text/html" in request.headers.get(
        "accept", ""
    )


def render_error(request: Request, exc: CharforgeError) -> Response:
    container: Container = request.app.state.container
    user = signed_in_user(request, container)
    return page(
        request,
        "error.html",
        user,
        exc.status,
        title=_TITLES.get(exc.status, "Something went wrong"),
        message=exc.message,
        hint=exc.hint,
    )


class ContentSecurityPolicy:
    """A pure ASGI middleware: the policy on every HTML answer (pages, error pages, /docs)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        policy = DOCS_CSP if scope["path"].startswith(_DOCS_PATHS) else PAGE_CSP

        async def send_with_policy(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                html = any(
                    k.lower() == b"content-type" and v.startswith(b"text/html") for k, v in headers
                )
                if html:
                    headers.append((b"content-security-policy", policy.encode()))
                    message = {**message, "headers": headers}
            await send(message)

        await self.app(scope, receive, send_with_policy)


def install_web(app: FastAPI) -> None:
    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    for module in (
        pages_auth,
        pages_references,
        pages_characters,
        pages_gallery,
        pages_images,
        pages_generate,
        pages_batches,
    ):
        app.include_router(module.router)

    @app.exception_handler(NotSignedIn)
    async def _sign_in_first(_request: Request, exc: NotSignedIn) -> Response:
        from urllib.parse import quote

        return RedirectResponse(f"/login?next={quote(exc.next_url)}", status_code=303)


def install_outer_web_middleware(app: FastAPI, container: Container) -> None:
    """The session cookie and the page policy, outside everything else (both read headers
    only): so even a page answered by the body limits knows who is signed in and has its CSP."""
    settings = container.settings
    app.add_middleware(
        SessionMiddleware,
        secret_key=secret_key(settings),
        session_cookie="charforge_session",
        max_age=settings.session_days * 86400,
        same_site="lax",
        https_only=settings.cookie_secure,
    )
    app.add_middleware(ContentSecurityPolicy)
