"""Key layouts of single-file Stable Diffusion checkpoints: the ones the WebUIs load and diffusers
does not, mapped to the layout diffusers reads. Nothing in this module imports torch.

What AUTOMATIC1111 (``modules/sd_models.py``, 1.10) and ComfyUI read besides the layout
diffusers converts from (``cond_stage_model.transformer.text_model.*`` for SD 1.x's CLIP):

- CLIP text-encoder weights without the ``text_model.`` level, as some merged and converted
  SD 1.x files have them: ``cond_stage_model.transformer.embeddings.*``, ``...encoder.*`` and
  ``...final_layer_norm.*``. diffusers finds no text encoder in those; A1111 renames exactly
  these three prefixes (``checkpoint_dict_replacements_sd1``), and so does charforge;
- a pickled ``.ckpt`` whose tensors sit under ``"state_dict"`` (nested ones too), beside
  training bookkeeping: ``global_step``, ``epoch``, PyTorch Lightning's version and callback
  state, numpy scalars. diffusers unwraps ``state_dict`` itself; the bookkeeping is read as
  inert placeholders (``engine``) and dropped, as A1111 drops it.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping
from typing import Any, TypeVar

T = TypeVar("T")

TEXT_ENCODER = "cond_stage_model.transformer."  # SD 1.x's CLIP ViT-L/14, original layout
TEXT_MODEL = TEXT_ENCODER + "text_model."  # where diffusers (and transformers 4.x) expect it
STATE_DICT = "state_dict"  # a .ckpt's tensors, as PyTorch Lightning saved them

# Prefix as saved -> prefix diffusers reads (A1111's checkpoint_dict_replacements_sd1).
TEXT_ENCODER_RENAMES: tuple[tuple[str, str], ...] = tuple(
    (TEXT_ENCODER + part, TEXT_MODEL + part)
    for part in ("embeddings.", "encoder.", "final_layer_norm.")
)

# The parts of an original (LDM) layout SD checkpoint and where their tensors live; the text
# encoder once renamed. SD 2.x keeps OpenCLIP under cond_stage_model.model., SDXL its two
# encoders under conditioner.embedders.
UNET = "model.diffusion_model."
VAE = "first_stage_model."
LDM_PARTS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("UNet", (UNET,)),
    ("VAE", (VAE,)),
    ("text encoder", (TEXT_MODEL, "cond_stage_model.model.", "conditioner.embedders.")),
)
# Families whose single files have another layout (diffusers reads them by its own rules).
OTHER_FAMILIES = ("joint_blocks.", "double_blocks.")  # SD3, Flux

_GROUPS = (
    UNET,
    "model_ema.",
    VAE,
    TEXT_MODEL,
    TEXT_ENCODER,
    "cond_stage_model.model.",
)
_SHOWN_GROUPS = 5


class CheckpointLayoutError(ValueError):
    """A single file that is not a checkpoint layout charforge can load, or not readable."""


def canonical_key(key: str) -> str:
    """The name diffusers reads for a tensor saved as ``key``."""
    for saved, wanted in TEXT_ENCODER_RENAMES:
        if key.startswith(saved):
            return wanted + key[len(saved) :]
    return key


def renamed_keys(keys: Iterable[str]) -> dict[str, str]:
    """Tensor names that need another name for diffusers (old -> new); empty for the layout
    diffusers reads as it is. A name already present wins over a renamed one."""
    present = set(keys)
    renames: dict[str, str] = {}
    for key in present:
        wanted = canonical_key(key)
        if wanted != key and wanted not in present:
            renames[key] = wanted
    return renames


def canonical_shapes(shapes: Mapping[str, T]) -> dict[str, T]:
    """``shapes`` (or any values by tensor name) under the names diffusers reads."""
    renames = renamed_keys(shapes)
    return {renames.get(key, key): value for key, value in shapes.items()}


def unwrap_state_dict(data: Any) -> Mapping[str, Any]:
    """The tensors of an unpickled ``.ckpt``: under ``"state_dict"`` (as often as it is nested,
    as diffusers unwraps it) or at the top; the rest of a wrapper is training bookkeeping."""
    while isinstance(data, Mapping) and isinstance(data.get(STATE_DICT), Mapping):
        data = data[STATE_DICT]
    return data if isinstance(data, Mapping) else {}


def layout_problem(keys: Iterable[str]) -> str | None:
    """Why these tensor names are no checkpoint layout charforge knows, or None when they are
    one (SD 1.x in any layout above, SD 2.x, SDXL, or a family diffusers reads by itself)."""
    names = [canonical_key(key) for key in keys]
    if not names:
        return "it holds no tensors"
    if any(family in key for key in names for family in OTHER_FAMILIES):
        return None
    missing = [
        part for part, prefixes in LDM_PARTS if not any(key.startswith(prefixes) for key in names)
    ]
    if not missing:
        return None
    return f"it has no {' and no '.join(missing)} weights under the key names charforge knows"


def _group(key: str) -> str:
    for prefix in _GROUPS:
        if key.startswith(prefix):
            return prefix
    parts = key.split(".")
    if parts[0] == "conditioner" and len(parts) > 3:
        return ".".join(parts[:3]) + "."
    return ".".join(parts[:2]) + "." if len(parts) > 2 else parts[0]


def layout_summary(keys: Iterable[str]) -> str:
    """Where a file's tensors are, by prefix and count: ``model.diffusion_model. (686), ...``."""
    counts = Counter(_group(key) for key in keys)
    shown = [f"{group} ({count})" for group, count in counts.most_common(_SHOWN_GROUPS)]
    if len(counts) > _SHOWN_GROUPS:
        shown.append(f"{len(counts) - _SHOWN_GROUPS} more")
    return ", ".join(shown) or "none"


def layout_error(file_name: str, keys: Iterable[str], problem: str, said: str) -> str:
    """The message of a CheckpointLayoutError: the file, what is wrong with it (and what
    diffusers ``said``), where its tensors are, and where SD 1.x keeps them."""
    return (
        f"{file_name} is not a checkpoint layout charforge can load: {problem} (diffusers: "
        f"{said[:120] or 'failed'}). Its tensors: {layout_summary(keys)}; SD 1.x keeps them "
        f"under {UNET}, {VAE} and {TEXT_ENCODER}[text_model.]"
    )
