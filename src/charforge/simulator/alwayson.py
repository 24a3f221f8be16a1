"""A1111 1.10's check of ``alwayson_scripts`` on txt2img (``Api.init_script_args``).

Each key is looked up with ``script_name_to_index``: a case-insensitive match against the
titles of every txt2img script. A miss raises ``HTTPException(422, "Script 'NAME' not found")``
before the request is queued (the ``always on script NAME not found`` wording in the same
function is unreachable: ``get_script`` has already raised). A selectable script answers 422
"Cannot have a selectable script in the always on scripts params"; an empty key makes
``get_script`` return a tuple and the ``.alwayson`` check fails with an AttributeError (500).
"""

from __future__ import annotations

from typing import Any

from charforge.simulator.txt2img import GenerationError

CONTROLNET_TITLE = "ControlNet"
"""``sd-webui-controlnet``'s script title; ``alwayson_scripts`` keys match it case-insensitively."""

# (title, always-on) of the scripts a stock A1111 1.10 txt2img tab has.
BUILTIN_TXT2IMG_SCRIPTS: tuple[tuple[str, bool], ...] = (
    ("Refiner", True),  # modules/processing_scripts/refiner.py
    ("Seed", True),  # modules/processing_scripts/seed.py
    ("Sampler", True),  # modules/processing_scripts/sampler.py
    ("Comments", True),  # modules/processing_scripts/comments.py
    ("Extra options", True),  # extensions-builtin/extra-options-section
    ("Hypertile", True),  # extensions-builtin/hypertile
    ("Prompt matrix", False),  # scripts/prompt_matrix.py
    ("Prompts from file or textbox", False),  # scripts/prompts_from_file.py
    ("X/Y/Z plot", False),  # scripts/xyz_grid.py
)


def check_alwayson_scripts(
    alwayson_scripts: dict[str, Any] | None, *, controlnet: bool
) -> GenerationError | None:
    """What ``init_script_args`` raises for ``alwayson_scripts``, or None when it passes."""
    if not alwayson_scripts:
        return None
    titles = {title.lower(): alwayson for title, alwayson in BUILTIN_TXT2IMG_SCRIPTS}
    if controlnet:
        titles[CONTROLNET_TITLE.lower()] = True
    for name, value in alwayson_scripts.items():
        if name == "":
            return GenerationError("AttributeError", "'tuple' object has no attribute 'alwayson'")
        alwayson = titles.get(name.lower())
        if alwayson is None:
            return GenerationError("HTTPException", "", 422, detail=f"Script '{name}' not found")
        if not alwayson:
            detail = "Cannot have a selectable script in the always on scripts params"
            return GenerationError("HTTPException", "", 422, detail=detail)
        if value is None or isinstance(value, (bool, int, float)):
            kind = type(value).__name__ if value is not None else "NoneType"
            return GenerationError("TypeError", f"argument of type '{kind}' is not iterable")
    return None


def controlnet_args(alwayson_scripts: dict[str, Any] | None) -> list[Any] | None:
    """The ``args`` sent for the ControlNet script (whatever the key's case), if any."""
    for name, value in (alwayson_scripts or {}).items():
        if name.lower() == CONTROLNET_TITLE.lower() and isinstance(value, dict):
            args = value.get("args")
            return list(args) if isinstance(args, list) else None
    return None
