"""/batches: run a list of prompts for one character as one batch, and follow it.

The page reloads itself every few seconds while the batch runs (no script needed); each item
shows its state, its pictures as they arrive, and why it failed.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Form, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from pydantic import ValidationError

from charforge.api.routes.batches import BatchOut, batch_out, cancel_open_items
from charforge.db.models import User
from charforge.domain.batches import ITEMS_MAX
from charforge.domain.params import COUNT_MAX, PROMPT_MAX, GenerateBody
from charforge.errors import InvalidInput
from charforge.jobs.tickets import JobTicket
from charforge.services import batches, characters, quotas
from charforge.web.render import container_of, page
from charforge.web.session import check_csrf, require_user

router = APIRouter(include_in_schema=False)
FormStr = Annotated[str, Form(max_length=ITEMS_MAX * (PROMPT_MAX + 2))]
_RELOAD_SECONDS = 3


def _form_page(request: Request, user: User, status: int = 200, **values: Any) -> HTMLResponse:
    c = container_of(request)
    with c.db.session() as session:
        roster = list(characters.list_for(session, user))
        recent, _ = batches.page(session, user, limit=10, cursor=None)
        listed = [BatchOut.of(v) for v in recent]
    return page(
        request,
        "batches.html",
        user,
        status,
        roster=roster,
        batches=listed,
        values=values,
        items_max=ITEMS_MAX,
        count_max=COUNT_MAX,
    )


@router.get("/batches", response_class=HTMLResponse)
def batches_page(request: Request, characterId: str | None = None) -> Response:
    user = require_user(request, container_of(request))
    return _form_page(request, user, character_id=characterId or "")


def _prompts(text: str) -> list[str]:
    return [line.strip() for line in text.splitlines() if line.strip()]


@router.post("/batches", response_class=HTMLResponse)
def start_batch(
    request: Request,
    csrf_token: Annotated[str, Form(max_length=200)],
    character_id: Annotated[str, Form(max_length=64)] = "",
    prompts: FormStr = "",
    negative_prompt: Annotated[str, Form(max_length=PROMPT_MAX)] = "",
    count: Annotated[str, Form(max_length=4)] = "1",
) -> Response:
    check_csrf(request, csrf_token)
    c = container_of(request)
    user = require_user(request, c)
    values = {
        "character_id": character_id,
        "prompts": prompts,
        "negative_prompt": negative_prompt,
        "count": count,
    }
    lines = _prompts(prompts)
    try:
        if not lines:
            raise InvalidInput("Write at least one prompt, one a line.", field="prompts")
        if len(lines) > ITEMS_MAX:
            raise InvalidInput(
                f"{len(lines)} prompts: a batch takes at most {ITEMS_MAX}.", field="prompts"
            )
        if not count.isdigit() or not 1 <= int(count) <= COUNT_MAX:
            raise InvalidInput(f"Images per prompt: 1 to {COUNT_MAX}.", field="count")
        try:
            bodies = [
                GenerateBody(
                    prompt=line,
                    negative_prompt=negative_prompt,
                    character_id=character_id,
                    count=int(count),
                )
                for line in lines
            ]
        except ValidationError as exc:
            first = exc.errors()[0]
            raise InvalidInput(f"{first['loc'][0]}: {first['msg']}.", field="prompts") from exc
        with c.db.session() as session:
            batch, jobs = batches.submit_bodies(
                session,
                user,
                bodies,
                {"source": "page"},
                c.table,
                c.settings.defaults,
                capabilities=c.pool.capabilities,
                limits=quotas.Limits.of(c.settings),
                numbers=list(range(1, len(lines) + 1)),
            )
            tickets = [JobTicket.of(job) for job in jobs]
            batch_id = batch.id
    except InvalidInput as exc:
        return _form_page(request, user, exc.status, error=_readable(exc), **values)
    c.queue.submit_many(tickets)
    return RedirectResponse(f"/batches/{batch_id}", status_code=303)


def _readable(exc: InvalidInput) -> str:
    """items[3]: ... reads as "Prompt 3: ..." on the page (lines are counted from 1)."""
    message = exc.message
    if message.startswith("items["):
        number, _, rest = message[len("items[") :].partition("]: ")
        message = f"Prompt {number}: {rest}"
    return message


@router.get("/batches/{batch_id}", response_class=HTMLResponse)
def batch_page(request: Request, batch_id: str) -> Response:
    c = container_of(request)
    user = require_user(request, c)
    batch = batch_out(c, user, batch_id)
    running = batch.state in ("queued", "running")
    return page(
        request,
        "batch.html",
        user,
        batch=batch,
        running=running,
        reload_seconds=_RELOAD_SECONDS if running else None,
    )


@router.post("/batches/{batch_id}/cancel")
def cancel_batch_page(
    request: Request, batch_id: str, csrf_token: Annotated[str, Form(max_length=200)]
) -> Response:
    check_csrf(request, csrf_token)
    c = container_of(request)
    cancel_open_items(c, require_user(request, c), batch_id)
    return RedirectResponse(f"/batches/{batch_id}", status_code=303)
