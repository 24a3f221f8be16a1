"""Turn a generate request into a queued Job, under the consistency contract."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from sqlalchemy.orm import Session

from charforge.config import GenerationDefaults
from charforge.db import repositories as repo
from charforge.db.models import Character, Job, User, utcnow
from charforge.domain.checkpoints import same_checkpoint
from charforge.domain.consistency import resolve
from charforge.domain.params import GenerateBody, GenerationParams, apply_defaults
from charforge.domain.prompt import compose_negative, compose_prompt
from charforge.domain.requirements import fit_to_route
from charforge.domain.routes import Route, RouteTable
from charforge.errors import InvalidInput
from charforge.safety import policy_of
from charforge.services import characters, permissions, quotas, templates
from charforge.services.characters import look_of, lora_suffix
from charforge.services.identity_plan import CapabilitiesOf, plan_identity


def submit(
    session: Session,
    owner: User,
    body: GenerateBody,
    table: RouteTable,
    defaults: GenerationDefaults,
    *,
    count: int = 1,
    capabilities: CapabilitiesOf | None = None,
    limits: quotas.Limits | None = None,
) -> Job:
    """``limits``: the global quotas (``quotas.Limits.of(settings)``); a user's own
    overrides apply either way."""
    permissions.check_nsfw(owner, body.nsfw)
    character = characters.get(session, owner, body.character_id)
    if body.character_name is not None and body.character_name.strip() != character.name.strip():
        # A page or script that sends the wrong pair would otherwise draw another character.
        raise InvalidInput(
            f"characterName '{body.character_name}' is not the name of character "
            f"{character.id} ('{character.name}').",
            field="characterName",
            hint="Send the character's current name, or leave characterName out.",
        )
    # A prompt template becomes the prompt here, so everything below (the content policy
    # included) sees the expanded text; the job records the expanded body.
    body = templates.expand(session, owner, body, character)
    _screen_prompt(session, body.prompt, character)
    requested_style = (
        table.normalize_style(body.art_style, field="artStyle") if body.art_style else None
    )
    if body.seed is None and character.seed is not None:
        body = body.model_copy(update={"seed": character.seed})  # the character's fixed seed
    # Every check on the request comes before anything about the character is written.
    params = apply_defaults(
        body,
        defaults,
        prompt=with_loras(compose_prompt(body.prompt, character.appearance), character),
        negative=compose_negative(
            join_negative(body.negative_prompt, character.negative_prompt), nsfw=body.nsfw
        ),
    )
    if body.style_transfer:
        return _submit_transfer(
            session, owner, body, character, params, table, count, capabilities, limits
        )
    resolution = resolve(look_of(character), requested_style, body.model, table)
    fitted, identity = _fit(session, character, body, params, resolution.route, table, capabilities)
    # An older character keeps what it was first resolved to, for every later image. A model
    # named only by the request is written back by the runner once it has really worked, so a
    # typo cannot bind the character to a checkpoint that does not exist.
    if resolution.write_back_style or resolution.write_back_model:
        route_model = same_checkpoint(resolution.checkpoint, resolution.route.checkpoint)
        won = repo.write_back_look(
            session,
            character.id,
            style=resolution.style if resolution.write_back_style else None,
            model=resolution.checkpoint if resolution.write_back_model and route_model else None,
        )
        session.refresh(character)
        if not won:  # another request decided first: follow what is stored now
            resolution = resolve(look_of(character), requested_style, body.model, table)
            fitted, identity = _fit(
                session, character, body, params, resolution.route, table, capabilities
            )
    return _queue(
        session,
        owner,
        body,
        character.id,
        resolution.style,
        resolution.checkpoint,
        character.model_hash,
        fitted,
        count,
        identity,
        None,
        limits,
        table,
    )


def _queue(
    session: Session,
    owner: User,
    body: GenerateBody,
    character_id: str,
    style: str,
    checkpoint: str,
    checkpoint_hash: str | None,
    fitted: GenerationParams,
    count: int,
    identity: dict[str, Any] | None,
    transfer: dict[str, str] | None,
    limits: quotas.Limits | None,
    table: RouteTable,
) -> Job:
    # Permissions and quotas before the row exists; a write-back made meanwhile is rolled
    # back with the session when one refuses.
    permissions.check_style(owner, style)
    permissions.check_checkpoint(owner, checkpoint)
    quotas.check(session, owner, limits or quotas.Limits(), count)
    if limits is not None and limits.answer_bytes is not None:
        check_answer_size(table.route(style), table, fitted, count, limits.answer_bytes)
    job = Job(
        owner_id=owner.id,
        character_id=character_id,
        state="queued",
        art_style=style,
        checkpoint=checkpoint,
        checkpoint_hash=checkpoint_hash,
        params=fitted.to_json(),
        user_prompt=body.prompt,
        request=body.model_dump(mode="json", by_alias=True, exclude_none=True),
        attempts=0,
        count=count,
        identity=identity,
        style_transfer=transfer,
        created_at=utcnow(),
    )
    session.add(job)
    session.flush()
    return job


def _submit_transfer(
    session: Session,
    owner: User,
    body: GenerateBody,
    character: Character,
    params: GenerationParams,
    table: RouteTable,
    count: int,
    capabilities: CapabilitiesOf | None,
    limits: quotas.Limits | None,
) -> Job:
    """Style transfer: the character on another style's route and checkpoint, carrying its
    appearance, negative prompt, LoRAs and references; the character itself is unchanged."""
    if not body.art_style:
        raise InvalidInput(
            "styleTransfer needs artStyle: the style to render the character in.",
            field="artStyle",
            hint=f"Send artStyle as one of: {', '.join(table.routes)}.",
        )
    target = table.normalize_style(body.art_style, field="artStyle")
    own = resolve(look_of(character), None, None, table)
    if body.model is not None and not same_checkpoint(body.model, table.route(target).checkpoint):
        raise InvalidInput(
            f"Style transfer renders on the {target} style's checkpoint "
            f"({table.route(target).checkpoint}); another model cannot be named with it.",
            field="model",
            hint="Leave model out with styleTransfer.",
        )
    route = table.route(target)
    fitted, identity = _fit(session, character, body, params, route, table, capabilities)
    transfer = {"from": own.style, "to": target}
    return _queue(
        session,
        owner,
        body,
        character.id,
        target,
        route.checkpoint,
        None,
        fitted,
        count,
        identity,
        transfer,
        limits,
        table,
    )


def _fit(
    session: Session,
    character: Character,
    body: GenerateBody,
    params: GenerationParams,
    route: Route,
    table: RouteTable,
    capabilities: CapabilitiesOf | None,
) -> tuple[GenerationParams, dict[str, Any] | None]:
    """The parameters as the route can run them, with the identity plan for that route."""
    identity = plan_identity(session, character, body.identity, route, table, capabilities)
    if identity is not None:
        params = replace(
            params,
            identity_strength=float(identity["strength"]),
            identity_required=bool(identity["required"]),
        )
    fitted = fit_to_route(
        params,
        hires_asked=body.hires is not None,
        route=route,
        table=table,
        clip_skip_asked=body.clip_skip is not None,
    )
    return fitted, identity


# Backends that send every image of a job in one JSON answer, base64-encoded (ComfyUI's images
# are fetched one by one; the local engine has no HTTP).
_ONE_ANSWER_KINDS = ("a1111", "runpod")
# A generated PNG takes about 1-2 bytes a pixel; 2, times base64's 4/3, errs on the large side.
_ANSWER_BYTES_PER_PIXEL = 2 * 4 / 3
_ANSWER_SLACK = 256 * 1024  # the infotext and parameters around the images


def check_answer_size(
    route: Route, table: RouteTable, params: GenerationParams, count: int, cap: int
) -> None:
    """Refuse a job whose images could not come back in one answer under the cap: better a
    clear 422 now than a 502 after the backend has spent minutes making them."""
    if not any(table.backends[name].kind in _ONE_ANSWER_KINDS for name in route.backends):
        return
    scale = params.hires_scale if params.hires else 1.0
    width, height = int(params.width * scale), int(params.height * scale)
    per_image = width * height * _ANSWER_BYTES_PER_PIXEL
    fitting = int((cap - _ANSWER_SLACK) // per_image)
    if count <= fitting:
        return
    mib = 1024 * 1024
    size = f"{width}x{height}{' (high-resolution pass included)' if params.hires else ''}"
    if fitting < 1:
        raise InvalidInput(
            f"An image of {size} could come back from the backend as about "
            f"{per_image / mib:.0f} MiB, over the {cap / mib:.0f} MiB this server reads from "
            "a backend in one answer.",
            field="hires" if params.hires else "width",
            hint="Ask for a smaller image, or have the operator raise "
            "CHARFORGE_BACKEND_MAX_RESPONSE_BYTES.",
            extra={"limit": cap, "setting": "CHARFORGE_BACKEND_MAX_RESPONSE_BYTES"},
        )
    raise InvalidInput(
        f"{count} images of {size} could come back from the backend as about "
        f"{count * per_image / mib:.0f} MiB in one answer, over the {cap / mib:.0f} MiB this "
        f"server reads; at this size at most {fitting} fit.",
        field="count",
        hint=f"Ask for at most {fitting} images per job (send several jobs for more), or have "
        "the operator raise CHARFORGE_BACKEND_MAX_RESPONSE_BYTES.",
        extra={"limit": fitting, "setting": "CHARFORGE_BACKEND_MAX_RESPONSE_BYTES"},
    )


def _screen_prompt(session: Session, prompt: str, character: Character) -> None:
    """The positive prompt's parts, then the whole (a scene and an appearance may each pass
    and together not), before anything is queued; the negative prompt is not restricted.
    The stored appearance is checked again: the policy may have been tightened since."""
    policy = policy_of(session)
    policy.check("prompt", prompt)
    policy.check("appearance", character.appearance, what="The character's appearance")
    whole = compose_prompt(prompt, character.appearance)
    policy.check("prompt", whole, what="The prompt with the character's appearance")


def join_negative(asked: str, own: str | None) -> str:
    """The request's negative prompt, then the character's own (what it must never show)."""
    own = (own or "").strip().strip(",").strip()
    if not own or own.lower() in asked.lower():
        return asked
    return f"{asked}, {own}" if asked else own


def with_loras(prompt: str, character: Character) -> str:
    tags = lora_suffix(character)
    return f"{prompt}, {tags}" if tags else prompt
