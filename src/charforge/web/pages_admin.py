"""The admin page: withheld images to review, users with their permissions and usage, and
the audit log."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Form, Request
from fastapi.responses import FileResponse, HTMLResponse, RedirectResponse, Response

from charforge.db import repositories as repo
from charforge.db.models import User
from charforge.errors import Forbidden, InvalidInput, NotFound
from charforge.services import audit, permissions, quarantine, quotas
from charforge.web.render import container_of, page
from charforge.web.session import check_csrf, require_user

router = APIRouter(include_in_schema=False)
FormStr = Annotated[str, Form(max_length=4000)]


def _admin(request: Request) -> User:
    user = require_user(request, container_of(request))
    if not user.is_admin:
        raise Forbidden("Only an administrator may see this page.")
    return user


def _render(request: Request, admin: User, status: int = 200, error: str | None = None) -> Response:
    c = container_of(request)
    limits = quotas.Limits.of(c.settings)
    with c.db.session() as session:
        people = [
            (u, permissions.view(u), quotas.usage(session, u, limits))
            for u in repo.all_users(session)
        ]
        entries, _ = audit.page(session, 50, None)
        withheld, _ = quarantine.page(session, limit=_WITHHELD_SHOWN, cursor=None)
        waiting = quarantine.count(session)
    return page(
        request,
        "admin.html",
        admin,
        status,
        people=people,
        entries=list(entries),
        withheld=withheld,
        waiting=waiting,
        error=error,
    )


_WITHHELD_SHOWN = 50


@router.get("/admin", response_class=HTMLResponse)
def admin_page(request: Request) -> Response:
    return _render(request, _admin(request))


def _names(text: str) -> list[str] | None:
    names = [n.strip() for n in text.split(",") if n.strip()]
    return names or None  # empty: every name allowed


def _number(text: str, field: str) -> int | None:
    text = text.strip()
    if not text:
        return None  # empty: no limit
    if not text.isdigit() or len(text) > 7:
        raise InvalidInput(f"{field} must be a whole number, or empty for no limit.", field=field)
    return int(text)


@router.post("/admin/users/{name}", response_class=HTMLResponse)
def save_permissions(
    request: Request,
    name: str,
    csrf_token: FormStr,
    styles: FormStr = "",
    checkpoints: FormStr = "",
    images_per_day: FormStr = "",
    max_active_jobs: FormStr = "",
    nsfw: Annotated[str | None, Form(max_length=10)] = None,
) -> Response:
    check_csrf(request, csrf_token)
    admin = _admin(request)
    c = container_of(request)
    try:
        wanted: dict[str, Any] = {
            "nsfw": nsfw is not None,
            "styles": _names(styles),
            "checkpoints": _names(checkpoints),
            "imagesPerDay": _number(images_per_day, "imagesPerDay"),
            "maxActiveJobs": _number(max_active_jobs, "maxActiveJobs"),
        }
        with c.db.session() as session:
            target = repo.user_by_name(session, name)
            if target is None:
                raise NotFound(f"No user named '{name[:64]}'.")
            current = permissions.view(target)
            # Only what the form changed: a quota left at its default stays the default.
            patch = {k: v for k, v in wanted.items() if v != current[k]}
            if patch:
                permissions.update(session, admin.name, target, patch)
    except InvalidInput as exc:
        return _render(request, admin, 422, error=f"{name}: {exc.message}")
    return RedirectResponse("/admin", status_code=303)


@router.get("/admin/quarantine/{image_id}/file")
def withheld_file(request: Request, image_id: str) -> FileResponse:
    _admin(request)
    c = container_of(request)
    with c.db.session() as session:
        path = c.store.existing(quarantine.get(session, image_id).image.file_path)
    return FileResponse(path, media_type="image/png", headers={"Cache-Control": "no-store"})


@router.post("/admin/quarantine/{image_id}/release")
def release_withheld(request: Request, image_id: str, csrf_token: FormStr) -> Response:
    check_csrf(request, csrf_token)
    admin = _admin(request)
    with container_of(request).db.session() as session:
        quarantine.release(session, admin.name, image_id)
    return RedirectResponse("/admin#withheld", status_code=303)


@router.post("/admin/quarantine/{image_id}/delete")
def delete_withheld(request: Request, image_id: str, csrf_token: FormStr) -> Response:
    check_csrf(request, csrf_token)
    admin = _admin(request)
    c = container_of(request)
    with c.db.session() as session:
        path = quarantine.delete(session, admin.name, image_id)
    c.store.delete(path)
    return RedirectResponse("/admin#withheld", status_code=303)
