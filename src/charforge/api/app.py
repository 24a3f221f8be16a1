"""The FastAPI application, built around a container (nothing is built at import time)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request, Response

from charforge import __version__
from charforge.api.errors import install_error_handlers
from charforge.api.routes import characters, generate, health, images, jobs, styles
from charforge.container import Container
from charforge.web.app import install_web, render_error, wants_html


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
    for module in (health, characters, images, generate, jobs, styles):
        app.include_router(module.router)
    install_web(app, container)

    if container.settings.demo:

        @app.middleware("http")
        async def mark_simulated(
            request: Request, call_next: Callable[[Request], Awaitable[Response]]
        ) -> Response:
            response = await call_next(request)
            response.headers["X-Charforge-Simulated"] = "true"
            return response

    return app
