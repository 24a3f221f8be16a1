"""/api/admin: users' permissions and quotas, and the audit log (administrators only)."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any

from fastapi import APIRouter, Query
from pydantic import ConfigDict, Field, StringConstraints
from pydantic.alias_generators import to_camel

from charforge.api.deps import AdminUser, ContainerDep
from charforge.api.schemas import Wire
from charforge.db import repositories as repo
from charforge.db.models import User
from charforge.errors import NotFound
from charforge.services import audit, permissions, quotas

router = APIRouter(prefix="/api/admin", tags=["admin"])

Name = Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=255)]


class PermissionsIn(Wire):
    """Absent keys stay as they are; ``null`` means unrestricted (no allow-list, no limit)."""

    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="forbid")
    # Strict: "yes" is not true and "5" is not a number here.
    nsfw: bool | None = Field(default=None, strict=True)
    styles: list[Name] | None = Field(default=None, max_length=100)
    checkpoints: list[Name] | None = Field(default=None, max_length=100)
    images_per_day: int | None = Field(default=None, ge=0, le=1_000_000, strict=True)
    max_active_jobs: int | None = Field(default=None, ge=0, le=1_000_000, strict=True)


class UserPatch(Wire):
    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="forbid")
    permissions: PermissionsIn


class PermissionsOut(Wire):
    nsfw: bool
    styles: list[str] | None
    checkpoints: list[str] | None
    images_per_day: int | None
    max_active_jobs: int | None


class UsageOut(Wire):
    images_today: int
    images_per_day: int | None
    active_jobs: int
    max_active_jobs: int | None


class UserOut(Wire):
    name: str
    is_admin: bool
    created_at: datetime
    permissions: PermissionsOut
    usage: UsageOut


class UserList(Wire):
    items: list[UserOut]


class AuditOut(Wire):
    id: int
    at: datetime
    actor: str
    action: str
    target: str
    before: dict[str, Any] | None
    after: dict[str, Any] | None


class AuditPage(Wire):
    items: list[AuditOut]
    next_cursor: str | None


def user_out(session: Any, user: User, limits: quotas.Limits) -> UserOut:
    used = quotas.usage(session, user, limits)
    return UserOut(
        name=user.name,
        is_admin=user.is_admin,
        created_at=user.created_at,
        permissions=PermissionsOut.model_validate(permissions.view(user)),
        usage=UsageOut(
            images_today=used.images_today,
            images_per_day=used.limits.images_per_day,
            active_jobs=used.active_jobs,
            max_active_jobs=used.limits.max_active_jobs,
        ),
    )


def _target(session: Any, name: str) -> User:
    user = repo.user_by_name(session, name)
    if user is None:
        raise NotFound(f"No user named '{name[:64]}'.", field="name")
    return user


@router.get("/users", response_model=UserList)
def list_users(_admin: AdminUser, c: ContainerDep) -> UserList:
    limits = quotas.Limits.of(c.settings)
    with c.db.session() as session:
        return UserList(items=[user_out(session, u, limits) for u in repo.all_users(session)])


@router.get("/users/{name}", response_model=UserOut)
def get_user(name: str, _admin: AdminUser, c: ContainerDep) -> UserOut:
    with c.db.session() as session:
        return user_out(session, _target(session, name), quotas.Limits.of(c.settings))


@router.patch("/users/{name}", response_model=UserOut)
def patch_user(name: str, body: UserPatch, admin: AdminUser, c: ContainerDep) -> UserOut:
    given = body.permissions
    patch = given.model_dump(include=given.model_fields_set, by_alias=True)
    with c.db.session() as session:
        target = _target(session, name)
        permissions.update(session, admin.name, target, patch)
        return user_out(session, target, quotas.Limits.of(c.settings))


@router.get("/audit", response_model=AuditPage)
def audit_log(
    _admin: AdminUser,
    c: ContainerDep,
    limit: Annotated[int, Query(ge=1, le=200)] = 50,
    cursor: Annotated[str | None, Query(max_length=32)] = None,
) -> AuditPage:
    with c.db.session() as session:
        rows, next_cursor = audit.page(session, limit, cursor)
        return AuditPage(
            items=[
                AuditOut(
                    id=r.id,
                    at=r.at,
                    actor=r.actor,
                    action=r.action,
                    target=r.target,
                    before=r.before,
                    after=r.after,
                )
                for r in rows
            ],
            next_cursor=next_cursor,
        )
