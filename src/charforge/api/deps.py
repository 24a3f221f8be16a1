"""Request dependencies: the container, a unit of work, and the signed-in API user."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from charforge.container import Container
from charforge.db.models import User
from charforge.errors import Forbidden, Unauthorized
from charforge.services import users

_bearer = HTTPBearer(auto_error=False, description="A token from `charforge tokens create NAME`")


def get_container(request: Request) -> Container:
    container: Container = request.app.state.container
    return container


ContainerDep = Annotated[Container, Depends(get_container)]


def current_user(
    container: ContainerDep,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> User:
    hint = "Send 'Authorization: Bearer TOKEN'; create a token with `charforge tokens create NAME`."
    if credentials is None:
        raise Unauthorized("This route needs an API token.", hint=hint)
    # Its own short unit of work: routes commit theirs before answering, never after.
    with container.db.session() as session:
        user = users.user_for_token(session, credentials.credentials)
    if user is None:
        raise Unauthorized("The API token is not valid (unknown or revoked).", hint=hint)
    return user


CurrentUser = Annotated[User, Depends(current_user)]


def admin_user(user: CurrentUser) -> User:
    """An administrator; anyone else gets 403 (they are signed in, so the route's existence
    is no secret)."""
    if not user.is_admin:
        raise Forbidden(
            "Only an administrator may do this.",
            hint="Ask an administrator (created with `charforge users add NAME --admin`).",
        )
    return user


AdminUser = Annotated[User, Depends(admin_user)]
