"""The FastAPI application, built around a container (nothing is built at import time)."""

from __future__ import annotations

import re
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request, Response

from charforge import __version__
from charforge.api.errors import install_error_handlers
from charforge.api.limits import BodyLimits
from charforge.api.openapi_errors import install_error_docs
from charforge.api.routes import (
    admin,
    admin_policy,
    admin_quarantine,
    batches,
    cards,
    characters,
    generate,
    generation_options,
    health,
    images,
    jobs,
    presets,
    references,
    styles,
    templates,
)
from charforge.container import Container
from charforge.observability import logs
from charforge.web import pages_admin
from charforge.web.app import install_outer_web_middleware, install_web, render_error, wants_html

_SANE_ID = re.compile(r"[A-Za-z0-9._-]{1,64}")


def create_app(container: Container, *, manage_lifecycle: bool = True) -> FastAPI:
    """``manage_lifecycle``: start the container with the app and close it on shutdown."""

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        if manage_lifecycle and not container.started:
            container.start()
        try:
            yield
        finally:
            if manage_lifecycle:
                container.close()

    app = FastAPI(
        title="charforge",
        version=__version__,
        description="Characters that keep their look across every generated image.",
        lifespan=lifespan,
    )
    app.state.container = container
    install_error_handlers(app, html=(wants_html, render_error))
    for module in (
        health,
        cards,
        characters,
        references,
        images,
        generate,
        jobs,
        batches,
        styles,
        admin,
    ):
        app.include_router(module.router)
    app.include_router(admin_policy.router)
    app.include_router(admin_quarantine.router)
    for extra in (templates, presets, generation_options):  # issue 13: templates, presets
        app.include_router(extra.router)
    install_web(app)
    app.include_router(pages_admin.router)
    install_error_docs(app)

    @app.middleware("http")
    async def request_ids(
        request: Request, call_next: Callable[[Request], Awaitable[Response]]
    ) -> Response:
        # A caller's own id (a proxy's X-Request-ID) is kept when it is sane, so one request
        # can be followed across the proxy's logs and ours.
        given = request.headers.get("x-request-id", "")
        rid = given if _SANE_ID.fullmatch(given) else uuid.uuid4().hex
        token = logs.request_id.set(rid)
        try:
            response = await call_next(request)
        finally:
            logs.request_id.reset(token)
        response.headers["X-Request-ID"] = rid
        return response

    if container.settings.demo:

        @app.middleware("http")
        async def mark_simulated(
            request: Request, call_next: Callable[[Request], Awaitable[Response]]
        ) -> Response:
            response = await call_next(request)
            response.headers["X-Charforge-Simulated"] = "true"
            return response

    # Added late, so outside the app's own middleware: a body over its limit is refused before
    # anything reads it. Only the session and CSP middlewares (headers only) sit outside it.
    app.add_middleware(
        BodyLimits,
        max_json_bytes=container.settings.max_json_bytes,
        html=(wants_html, render_error),
    )
    install_outer_web_middleware(app, container)
    return app
