"""The consistency contract (DESIGN.md section 2): which checkpoint a character's image uses.

1. The stored character decides: its ``imageGeneration.model``, else the route of its
   ``artStyle.primaryStyle``; only a character made before styles were stored takes the
   request's ``artStyle``/``model``, else the fallback style. What was resolved for such an
   older character is written back, so every later image uses the same checkpoint.
2. A request that contradicts the stored character is refused (409 ``style_mismatch``).
3. After generation, the checkpoint that really ran is checked against the resolved one.
"""

from __future__ import annotations

from dataclasses import dataclass

from charforge.domain.checkpoints import ran_checkpoint, same_checkpoint, same_hash
from charforge.domain.routes import FALLBACK_STYLE, Route, RouteTable
from charforge.errors import CheckpointDrift, StyleMismatch, WrongCheckpoint


@dataclass(frozen=True)
class StoredLook:
    """What the character row holds about its style and checkpoint."""

    name: str
    primary_style: str | None
    model: str | None
    model_hash: str | None = None


@dataclass(frozen=True)
class Resolution:
    style: str
    checkpoint: str
    route: Route
    write_back_style: bool
    write_back_model: bool


def _mismatch(character: StoredLook, style: str, checkpoint: str, asked: str) -> StyleMismatch:
    return StyleMismatch(
        f"Character '{character.name}' uses the {style} style with {checkpoint}, "
        f"but the request asked for {asked}. A character is always rendered with the "
        "checkpoint that created it, so it keeps its look.",
        field="artStyle" if asked.startswith("style") else "model",
        hint=(
            "Leave artStyle and model out (the server uses the character's own), or send "
            f"artStyle={style} and model={checkpoint}. To show the character in another "
            'style, send "styleTransfer": true with that artStyle: it renders on that style\'s '
            "checkpoint and leaves the character's own style and model as they are."
        ),
    )


def _style_of(
    character: StoredLook,
    requested_style: str | None,
    requested_model: str | None,
    table: RouteTable,
) -> str:
    if character.primary_style is not None:
        return character.primary_style
    if character.model is not None:
        # Its own model but no style: the route that serves that model decides.
        by_model = table.route_for_checkpoint(character.model)
        if requested_style is not None and (
            by_model is None
            or same_checkpoint(table.route(requested_style).checkpoint, character.model)
        ):
            return requested_style
        return by_model.style if by_model else FALLBACK_STYLE
    if requested_style is not None:
        return requested_style
    by_model = table.route_for_checkpoint(requested_model) if requested_model else None
    return by_model.style if by_model else FALLBACK_STYLE


def resolve(
    character: StoredLook,
    requested_style: str | None,
    requested_model: str | None,
    table: RouteTable,
) -> Resolution:
    """Resolve style and checkpoint; ``requested_style`` is already normalized."""
    stored_style = character.primary_style
    stored_model = character.model
    style = _style_of(character, requested_style, requested_model, table)
    route = table.route(style)

    if stored_model is not None:
        checkpoint = stored_model
    elif stored_style is not None:
        checkpoint = route.checkpoint
    else:
        checkpoint = requested_model or route.checkpoint

    character_has_look = stored_model is not None or stored_style is not None
    if character_has_look and requested_style is not None and requested_style != style:
        raise _mismatch(character, style, checkpoint, f"style {requested_style}")
    if (
        character_has_look
        and requested_model is not None
        and not same_checkpoint(requested_model, checkpoint)
    ):
        raise _mismatch(character, style, checkpoint, f"model {requested_model}")

    return Resolution(
        style=style,
        checkpoint=checkpoint,
        route=route,
        write_back_style=stored_style is None,
        write_back_model=stored_model is None,
    )


# Where each kind of backend keeps its checkpoints, for the hint of a wrong-model refusal.
_MODEL_FOLDERS = {
    "a1111": "the WebUI's models/Stable-diffusion folder",
    "comfyui": "ComfyUI's models/checkpoints folder",
    "runpod": "the worker's models folder (its image or network volume)",
    "local": "the models folder (CHARFORGE_MODELS_DIR)",
}


def verify_checkpoint_ran(
    *,
    expected: str,
    expected_hash: str | None,
    reported: str | None,
    reported_hash: str | None,
    backend: str,
    kind: str = "a1111",
) -> None:
    """Refuse an image the backend made with another model than the one asked for."""
    if reported is None:
        raise WrongCheckpoint(
            f"Backend '{backend}' did not report which checkpoint it ran, so the image "
            f"cannot be proven to come from {expected}; it was discarded.",
            hint="Use an A1111/Forge version whose API returns info.sd_model_name."
            if kind in ("a1111", "runpod")
            else "Check that the backend's version is supported (see the README).",
        )
    if not ran_checkpoint(expected, reported):
        fallback = (
            f"A1111 silently falls back to another model when it cannot load '{expected}'. "
            "Check the WebUI console for a load error and "
            if kind in ("a1111", "runpod")
            else "Check the backend's log for a load error and "
        )
        raise WrongCheckpoint(
            f"Backend '{backend}' ran checkpoint '{reported}' instead of '{expected}'; the "
            "image was discarded rather than stored off-model.",
            hint=f"{fallback}that the file is in {_MODEL_FOLDERS.get(kind, 'its models folder')}.",
        )
    if expected_hash and reported_hash and not same_hash(expected_hash, reported_hash):
        raise CheckpointDrift(
            f"Backend '{backend}' has a different '{expected}' (hash {reported_hash}) than "
            f"the one this character was made with (hash {expected_hash}).",
            hint=(
                "The file was replaced on the backend. Restore the original weights, or "
                "update the character's checkpoint hash if the change was intended."
            ),
        )
