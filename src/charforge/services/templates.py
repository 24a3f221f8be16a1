"""Prompt templates: the built-in ones (read-only, shared) and each user's own (private), and
their expansion into a generate body.

``expand`` is what a generation (and every item of a batch) goes through: it turns
``templateId`` + ``variables`` into the prompt, adds the template's negative prompt after the
request's and fills the settings the request left out from the template's ``params``. A
missing, empty or extra variable is a 422 naming ``variables.<name>``, and every value is
screened by the content policy under that name before the whole prompt is.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from typing import Any

from sqlalchemy.orm import Session

from charforge.db import templates as rows
from charforge.db.models import Character, PromptTemplate, User, utcnow
from charforge.domain.params import PROMPT_MAX, GenerateBody, GenerationSettings
from charforge.domain.templates import (
    BUILTIN_BY_ID,
    BUILTINS,
    CHARACTER_SLOTS,
    TemplateView,
    parse,
    render,
    slots_of,
)
from charforge.errors import Conflict, Forbidden, InvalidInput, NotFound
from charforge.safety import policy_of

NAME_MAX = 100


@dataclass
class TemplateFields:
    """Parsed input; in an update, None means "leave as is"."""

    name: str | None = None
    prompt: str | None = None
    negative_prompt: str | None = None
    params: GenerationSettings | None = None


def view_of(row: PromptTemplate) -> TemplateView:
    return TemplateView(
        id=row.id,
        name=row.name,
        prompt=row.prompt,
        negative_prompt=row.negative_prompt or "",
        params=dict(row.params or {}),
        builtin=False,
        created_at=row.created_at,
        updated_at=row.updated_at,
        slots=slots_of(parse(row.prompt)),
    )


def list_for(session: Session, owner: User) -> list[TemplateView]:
    """The built-in templates, then the user's own by name."""
    own = rows.list_owned(session, PromptTemplate, owner.id)
    return [*BUILTINS, *(view_of(row) for row in own)]


def get(
    session: Session, owner: User, template_id: str, *, field: str | None = None
) -> TemplateView:
    builtin = BUILTIN_BY_ID.get(template_id)
    if builtin is not None:
        return builtin
    return view_of(_own(session, owner, template_id, field=field))


def _own(
    session: Session, owner: User, template_id: str, *, field: str | None = None
) -> PromptTemplate:
    row = rows.get_owned(session, PromptTemplate, owner.id, template_id)
    if row is None:
        raise NotFound(
            f"No prompt template {template_id} among yours or the built-in ones.",
            field=field,
            hint="GET /api/prompt-templates lists the templates you can use.",
        )
    return row


def _writable(session: Session, owner: User, template_id: str) -> PromptTemplate:
    builtin = BUILTIN_BY_ID.get(template_id)
    if builtin is not None:
        raise Forbidden(
            f"'{builtin.name}' is a built-in template; built-in templates cannot be changed or "
            "deleted.",
            hint="Copy it: POST /api/prompt-templates with its name (or a new one), prompt, "
            "negativePrompt and params, then change your copy.",
        )
    return _own(session, owner, template_id)


def _checked(session: Session, fields: TemplateFields) -> TemplateFields:
    if fields.name is not None:
        fields.name = fields.name.strip()
        if not 1 <= len(fields.name) <= NAME_MAX:
            raise InvalidInput(f"A template name needs 1 to {NAME_MAX} characters.", field="name")
    if fields.prompt is not None:
        fields.prompt = fields.prompt.strip()
        if not 1 <= len(fields.prompt) <= PROMPT_MAX:
            raise InvalidInput(
                f"A template's prompt needs 1 to {PROMPT_MAX} characters.", field="prompt"
            )
        parse(fields.prompt, field="prompt")  # stray braces and bad slot names: 422 now
    policy = policy_of(session)
    policy.check("name", fields.name)
    policy.check("prompt", fields.prompt)
    return fields


def _save(session: Session, row: PromptTemplate, owner: User) -> None:
    rows.save_named(session, row, owner.id, _taken)


def _taken(name: str) -> Conflict:
    return Conflict(
        f"You already have a prompt template named '{name}'.",
        field="name",
        hint="Pick another name, or change that template with PATCH.",
    )


def _params_json(settings: GenerationSettings | None) -> dict[str, Any]:
    if settings is None:
        return {}
    return settings.model_dump(mode="json", by_alias=True, exclude_none=True)


def create(session: Session, owner: User, fields: TemplateFields) -> TemplateView:
    fields = _checked(session, fields)
    if not fields.name or not fields.prompt:
        raise InvalidInput(
            "A template needs a name and a prompt.", field="name" if not fields.name else "prompt"
        )
    now = utcnow()
    row = PromptTemplate(
        owner_id=owner.id,
        name=fields.name,
        prompt=fields.prompt,
        negative_prompt=(fields.negative_prompt or "").strip(),
        params=_params_json(fields.params),
        created_at=now,
        updated_at=now,
    )
    _save(session, row, owner)
    return view_of(row)


def update(session: Session, owner: User, template_id: str, fields: TemplateFields) -> TemplateView:
    row = _writable(session, owner, template_id)
    fields = _checked(session, fields)
    if fields.name is not None:
        row.name = fields.name
    if fields.prompt is not None:
        row.prompt = fields.prompt
    if fields.negative_prompt is not None:
        row.negative_prompt = fields.negative_prompt.strip()
    if fields.params is not None:
        row.params = _params_json(fields.params)  # replaced whole, as it was sent
    row.updated_at = utcnow()
    _save(session, row, owner)
    return view_of(row)


def delete(session: Session, owner: User, template_id: str) -> None:
    session.delete(_writable(session, owner, template_id))
    session.flush()


# -- expansion -------------------------------------------------------------------------------


def expand(session: Session, owner: User, body: GenerateBody, character: Character) -> GenerateBody:
    """``body`` with its template expanded (see the module's docstring); a body without one
    is returned as it is, once it is known to have a prompt. The result names no template,
    so submitting it again (a replay, a batch's second look) expands nothing twice."""
    if body.template_id is None:
        if body.variables is not None:
            raise InvalidInput(
                "variables fill the slots of a prompt template; this request names none.",
                field="variables",
                hint="Send templateId with variables, or leave variables out.",
            )
        if not body.prompt:
            raise InvalidInput(
                "A prompt is required (or a templateId with its variables).",
                field="prompt",
                hint="Describe the scene, or name a prompt template (GET /api/prompt-templates).",
            )
        return body
    # Whose template it is comes first: another user's id is a 404 like one that is not there.
    template = get(session, owner, body.template_id, field="templateId")
    if body.prompt:
        raise InvalidInput(
            f"Send either a prompt or a templateId: template '{template.name}' makes the prompt.",
            field="prompt",
            hint="Leave prompt out, or leave templateId and variables out.",
        )
    values = _variables(session, template, body.variables or {})
    values.update(character=character.name, appearance=character.appearance or "")
    prompt = render(parse(template.prompt), values)
    if not 1 <= len(prompt) <= PROMPT_MAX:
        raise InvalidInput(
            f"Template '{template.name}' with these variables makes a prompt of {len(prompt)} "
            f"characters; it must have 1 to {PROMPT_MAX}.",
            field="variables",
            hint="Shorten the variables' values.",
        )
    data = body.model_dump(exclude_unset=True, exclude={"template_id", "variables"})
    data["prompt"] = prompt
    data["negative_prompt"] = _joined(body.negative_prompt, template.negative_prompt)
    settings = GenerationSettings.model_validate(template.params)
    for name in settings.model_fields_set - body.model_fields_set:
        data[name] = getattr(settings, name)  # the template's settings fill what was not sent
    return GenerateBody.model_validate(data)


def _variables(session: Session, template: TemplateView, given: dict[str, str]) -> dict[str, str]:
    """The request's values for the template's named slots: none missing, none extra."""
    named = [slot for slot in template.slots if slot not in CHARACTER_SLOTS]
    listed = ", ".join(named) or "none"
    for key in given:
        if key in CHARACTER_SLOTS:
            raise InvalidInput(
                f"{{{key}}} is filled from the character; it is not a variable.",
                field=f"variables.{key}",
                hint=f"Leave variables.{key} out. Template '{template.name}' takes: {listed}.",
            )
        if key not in named:
            close = difflib.get_close_matches(key, named, n=1)
            raise InvalidInput(
                f"Template '{template.name}' has no slot {{{key}}}; its slots are: {listed}.",
                field=f"variables.{key}",
                hint=(f"Did you mean {close[0]}? " if close else "")
                + "Send exactly the template's named slots.",
            )
    for slot in named:
        if not given.get(slot, "").strip():
            raise InvalidInput(
                f"Template '{template.name}' needs a value for {{{slot}}}.",
                field=f"variables.{slot}",
                hint=f"Every slot needs a value: {listed}.",
            )
    policy = policy_of(session)
    for slot in named:
        policy.check(f"variables.{slot}", given[slot], what=f"The value of {{{slot}}}")
    return {slot: given[slot].strip() for slot in named}


def _joined(asked: str, own: str) -> str:
    """The request's negative prompt, then the template's (unless it already holds it)."""
    own = own.strip().strip(",").strip()
    if not own or own.lower() in asked.lower():
        return asked
    return f"{asked}, {own}" if asked else own
