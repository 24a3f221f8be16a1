"""Templates (autoescaped: nothing a user typed is ever rendered as markup) and page helpers."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fastapi import Request
from fastapi.responses import HTMLResponse
from fastapi.templating import Jinja2Templates

from charforge import __version__
from charforge.container import Container
from charforge.db.models import Character, User
from charforge.domain.capabilities import Capability
from charforge.domain.consistency import resolve
from charforge.domain.routes import Route
from charforge.services.characters import look_of
from charforge.web.identity_view import score_badge
from charforge.web.session import CSRF_FIELD, csrf_token

TEMPLATES = Jinja2Templates(directory=str(Path(__file__).parent / "templates"))
TEMPLATES.env.globals.update(score_badge=score_badge)
DEMO_BANNER = (
    "Demo mode: images come from the built-in A1111 simulator. They are labelled "
    "placeholders, not real generations."
)


def container_of(request: Request) -> Container:
    container: Container = request.app.state.container
    return container


def page(
    request: Request, template: str, user: User | None, status: int = 200, **context: Any
) -> HTMLResponse:
    c = container_of(request)
    base = {
        "user": user,
        "csrf_field": CSRF_FIELD,
        "csrf": csrf_token(request),
        "demo_banner": DEMO_BANNER if c.settings.demo else None,
        "version": __version__,
    }
    response = TEMPLATES.TemplateResponse(
        request, template, {**base, **context}, status_code=status
    )
    # Pages hold a CSRF token and sometimes a fresh API token: never framed, never cached.
    response.headers["X-Frame-Options"] = "DENY"
    response.headers["X-Content-Type-Options"] = "nosniff"
    response.headers["Cache-Control"] = "no-store"
    response.headers["Referrer-Policy"] = "same-origin"
    return response


def route_of(character: Character, container: Container) -> tuple[Route, str]:
    """The route and checkpoint the character's next image will really use (no write-back)."""
    resolution = resolve(look_of(character), None, None, container.table)
    return resolution.route, resolution.checkpoint


def route_can(character: Character, container: Container, capability: Capability) -> bool:
    """Whether any backend of the character's route can do ``capability``."""
    route, _ = route_of(character, container)
    return any(capability in container.table.backends[n].capabilities for n in route.backends)


def route_conditions(route: Route, container: Container) -> bool:
    """Whether a backend of ``route`` can steer images by reference images (as its last
    health check found it)."""
    return any(Capability.REFERENCE_IMAGE in container.pool.capabilities(n) for n in route.backends)


def indicator(character: Character, container: Container) -> str:
    route, checkpoint = route_of(character, container)
    return route.indicator_for(checkpoint)
