"""/api/prompt-templates: the built-in templates (read-only) and the caller's own."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from fastapi import APIRouter, Response
from pydantic import ConfigDict, Field
from pydantic.alias_generators import to_camel

from charforge.api.deps import ContainerDep, CurrentUser
from charforge.api.openapi_errors import ErrorEnvelope
from charforge.api.schemas import Wire
from charforge.domain.params import PROMPT_MAX, GenerationSettings
from charforge.domain.templates import TemplateView
from charforge.services import templates
from charforge.services.templates import TemplateFields

router = APIRouter(tags=["prompt templates"])
_READ_ONLY: dict[int | str, dict[str, Any]] = {
    403: {"model": ErrorEnvelope, "description": "A built-in template (read-only)"}
}


class TemplateIn(Wire):
    """A template: ``{character}``, ``{appearance}`` and named slots such as ``{outfit}``;
    ``{{``/``}}`` for literal braces. In a PATCH, absent fields stay as they are."""

    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="forbid")

    name: str | None = Field(default=None, max_length=200)
    prompt: str | None = Field(default=None, max_length=PROMPT_MAX)
    negative_prompt: str | None = Field(default=None, max_length=PROMPT_MAX)
    # Generation settings (steps, sampler, width, hiresScale, ...) with the generate body's
    # limits; they fill what a request leaves out.
    params: GenerationSettings | None = None

    def fields(self) -> TemplateFields:
        return TemplateFields(self.name, self.prompt, self.negative_prompt, self.params)


class TemplateOut(Wire):
    id: str
    name: str
    prompt: str
    negative_prompt: str
    params: dict[str, Any]
    builtin: bool
    slots: list[str]
    created_at: datetime
    updated_at: datetime

    @classmethod
    def of(cls, t: TemplateView) -> TemplateOut:
        return cls(
            id=t.id,
            name=t.name,
            prompt=t.prompt,
            negative_prompt=t.negative_prompt,
            params=t.params,
            builtin=t.builtin,
            slots=t.slots,
            created_at=t.created_at,
            updated_at=t.updated_at,
        )


class TemplateList(Wire):
    items: list[TemplateOut]


@router.get("/api/prompt-templates", response_model=TemplateList)
def list_templates(user: CurrentUser, c: ContainerDep) -> TemplateList:
    with c.db.session() as session:
        return TemplateList(items=[TemplateOut.of(t) for t in templates.list_for(session, user)])


@router.post("/api/prompt-templates", status_code=201, response_model=TemplateOut)
def create_template(
    body: TemplateIn, user: CurrentUser, c: ContainerDep, response: Response
) -> TemplateOut:
    with c.db.session() as session:
        out = TemplateOut.of(templates.create(session, user, body.fields()))
    response.headers["Location"] = f"/api/prompt-templates/{out.id}"
    return out


@router.get("/api/prompt-templates/{template_id}", response_model=TemplateOut)
def get_template(template_id: str, user: CurrentUser, c: ContainerDep) -> TemplateOut:
    with c.db.session() as session:
        return TemplateOut.of(templates.get(session, user, template_id))


@router.patch(
    "/api/prompt-templates/{template_id}", response_model=TemplateOut, responses=_READ_ONLY
)
def update_template(
    template_id: str, body: TemplateIn, user: CurrentUser, c: ContainerDep
) -> TemplateOut:
    with c.db.session() as session:
        return TemplateOut.of(templates.update(session, user, template_id, body.fields()))


@router.delete("/api/prompt-templates/{template_id}", status_code=204, responses=_READ_ONLY)
def delete_template(template_id: str, user: CurrentUser, c: ContainerDep) -> Response:
    with c.db.session() as session:
        templates.delete(session, user, template_id)
    return Response(status_code=204)
