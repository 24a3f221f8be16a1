"""What sd-webui-controlnet 1.1.455 does to one txt2img, as observed on A1111 1.10.1.

- Units come from ``alwayson_scripts.controlnet.args``; A1111 copies at most
  ``control_net_unit_count`` (3) of them, and non-dict entries are dropped. Each one is parsed
  (``controlnet_units.parse_unit``): a bad unit fails the whole request with HTTP 500.
- Only units with ``enabled: true`` count. ``get_enabled_units`` writes ``ControlNet N`` (N
  counting enabled units) into ``extra_generation_params`` *before* anything is processed, so
  the infotext names a unit even when it then fails.
- Processing a unit can fail; A1111's ``ScriptRunner.process`` logs the exception and the image
  is generated without the unit (still HTTP 200): a model that is not installed ("model not
  found: None"), ``model: "None"`` for a module that needs one, no input image ("controlnet is
  enabled but no input image is given"), an image that does not decode ("Invalid encoded
  image"), or one with an alpha channel (``parse_image`` asserts 3 channels).
- An applied unit changes the picture: here its reference is blended in, with
  ``alpha = 0.25 * weight * (guidance_end - guidance_start)`` (at most 0.5), so weight 0 gives
  the very same pixels as no unit. Each applied unit with ``save_detected_map`` (the default)
  appends its detected map to ``images``, after the generated ones: for reference and
  IP-Adapter modules the input picture fitted to the first-pass size with the unit's resize
  mode ("Crop and Resize" centre-crops), an edge or grey map for the line/depth modules.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import io
from dataclasses import dataclass
from typing import Any

from PIL import Image, ImageFilter, ImageOps, UnidentifiedImageError

from charforge.simulator.alwayson import controlnet_args
from charforge.simulator.controlnet_units import (
    UNIT_COUNT,
    ControlNetUnit,
    UnitError,
    find_model,
    parse_unit,
)
from charforge.simulator.txt2img import GenerationError

NO_IMAGE = "ValueError: controlnet is enabled but no input image is given"
NO_MODEL_SELECTED = "RuntimeError: You have not selected any ControlNet Model."
BAD_IMAGE = "HTTPException: Invalid encoded image"
LOCAL_URL = "HTTPException: Request to local resource not allowed"
ALPHA_IMAGE = "AssertionError: the input image has an alpha channel (parse_image wants 3)"
_EDGE_MODULES = ("canny", "invert", "lineart", "softedge", "scribble", "mlsd", "t2ia_sketch")
_GREY_MODULES = ("depth", "normal", "segmentation", "oneformer", "threshold")


@dataclass
class UnitRun:
    """One enabled unit and what became of it."""

    index: int
    """N in ``ControlNet N``: the position among the enabled units."""
    slot: int
    """The position in ``alwayson_scripts.controlnet.args``."""
    unit: ControlNetUnit
    model: str | None = None
    """The installed model title it resolved to (None for model-free modules)."""
    reference: Image.Image | None = None
    image_sha256: str | None = None
    """sha256 of the decoded image bytes the request carried."""
    skipped: str | None = None
    """The exception A1111 logged instead of applying the unit; None when applied."""

    @property
    def applied(self) -> bool:
        return self.skipped is None

    @property
    def alpha(self) -> float:
        span = max(self.unit.guidance_end - self.unit.guidance_start, 0.0)
        return min(0.25 * self.unit.weight * span, 0.5)

    def record(self) -> dict[str, Any]:
        unit = self.unit
        return {
            "unit": self.index,
            "slot": self.slot,
            "module": unit.module,
            "model": unit.model,
            "model_resolved": self.model,
            "weight": unit.weight,
            "resize_mode": unit.resize_mode,
            "guidance_start": unit.guidance_start,
            "guidance_end": unit.guidance_end,
            "control_mode": unit.control_mode,
            "save_detected_map": unit.save_detected_map,
            "image_sha256": self.image_sha256,
            "image_size": list(self.reference.size) if self.reference is not None else None,
            "applied": self.applied,
            "skipped": self.skipped,
        }


class ControlNetRun:
    """The enabled units of one txt2img."""

    def __init__(self, units: list[UnitRun]) -> None:
        self.units = units

    @property
    def applied(self) -> list[UnitRun]:
        return [u for u in self.units if u.applied]

    def infotext(self) -> dict[str, str]:
        """The ``ControlNet N`` entries of ``extra_generation_params``."""
        return {f"ControlNet {u.index}": u.unit.serialize() for u in self.units}

    def apply(self, picture: Image.Image) -> Image.Image:
        """The picture as the applied units change it (unchanged at weight 0)."""
        for run in self.applied:
            if run.reference is None or run.alpha <= 0:
                continue
            reference = fit(run.reference, picture.size, run.unit.resize_mode)
            picture = Image.blend(picture.convert("RGB"), reference, run.alpha)
        return picture

    def detected_maps(self, size: tuple[int, int]) -> list[Image.Image]:
        """One map per applied unit that keeps ``save_detected_map``."""
        maps = []
        for run in self.applied:
            if run.unit.save_detected_map and run.reference is not None:
                maps.append(detected_map(run.unit, run.reference, size))
        return maps

    def records(self) -> list[dict[str, Any]]:
        return [u.record() for u in self.units]


def prepare(args: list[Any] | None, installed_models: list[str]) -> ControlNetRun:
    """Parse the units (``UnitError`` on a bad one) and decide which ones apply."""
    units: list[tuple[int, ControlNetUnit]] = []
    for slot, value in enumerate((args or [])[:UNIT_COUNT]):
        if isinstance(value, dict):
            units.append((slot, parse_unit(value)))
    runs: list[UnitRun] = []
    for slot, unit in units:
        if unit.enabled:
            runs.append(_resolve(UnitRun(len(runs), slot, unit), installed_models))
    return ControlNetRun(runs)


def _resolve(run: UnitRun, installed_models: list[str]) -> UnitRun:
    """``controlnet_main_entry`` for one unit: the model is loaded before the image is read."""
    unit = run.unit
    if not unit.preprocessor.model_free:
        if unit.model in ("", "None"):
            run.skipped = NO_MODEL_SELECTED
            return run
        run.model = find_model(unit.model, installed_models)
        if run.model is None:
            run.skipped = "RuntimeError: model not found: None"
            return run
    try:
        encoded = _image_field(unit.image)
        if encoded is None:
            run.skipped = NO_IMAGE
            return run
        run.reference, run.image_sha256 = decode_image(encoded)
    except UnitError as exc:
        run.skipped = f"{exc.error}: {exc.message}"
    return run


def _image_field(value: Any) -> Any:
    """The first picture of ``image`` in any of the shapes ``get_input_images_rgba`` takes."""
    if value is None:
        return None
    if isinstance(value, (list, tuple)):
        if not value:
            raise UnitError("ValueError", f"{value} is not a valid 'image' field value")
        if isinstance(value[0], dict):
            value = value[0]
        elif len(value) == 2:
            return value[0]
        else:
            raise UnitError("AssertionError", "an [image, mask] pair was expected")
    if isinstance(value, dict):
        found = value.get("image")
        if found is None:
            raise UnitError("AssertionError", "the image dict has no 'image'")
        return found
    return value


def decode_image(encoded: Any) -> tuple[Image.Image, str]:
    """``api.decode_base64_to_image`` (base64 or a ``data:image/...`` URL) then ``parse_image``;
    returns the picture and the sha256 of the decoded bytes."""
    if not isinstance(encoded, str):
        raise UnitError("ValueError", f"Unrecognized image format {encoded}.")
    if encoded.startswith(("http://", "https://")):
        raise UnitError(*LOCAL_URL.split(": ", 1))
    if encoded.startswith("data:image/"):
        try:
            encoded = encoded.split(";")[1].split(",")[1]
        except IndexError as exc:
            raise UnitError("IndexError", "list index out of range") from exc
    try:
        data = base64.b64decode(encoded)
        opened = Image.open(io.BytesIO(data))
        opened.load()
    except (binascii.Error, ValueError, UnidentifiedImageError, OSError) as exc:
        raise UnitError(*BAD_IMAGE.split(": ", 1)) from exc
    picture: Image.Image = ImageOps.exif_transpose(opened)
    if picture.mode in ("RGB", "P") and isinstance(picture.info.get("transparency"), bytes):
        picture = picture.convert("RGBA")  # images.fix_png_transparency
    if len(picture.getbands()) not in (1, 3):
        raise UnitError(*ALPHA_IMAGE.split(": ", 1))
    return picture.convert("RGB"), hashlib.sha256(data).hexdigest()


def fit(picture: Image.Image, size: tuple[int, int], resize_mode: str) -> Image.Image:
    """The picture at ``size`` the way the unit's resize mode makes it."""
    picture = picture.convert("RGB")
    if resize_mode == "Just Resize":
        return picture.resize(size, Image.Resampling.LANCZOS)
    if resize_mode == "Resize and Fill":
        return ImageOps.pad(picture, size, Image.Resampling.LANCZOS, color=(0, 0, 0))
    return ImageOps.fit(picture, size, Image.Resampling.LANCZOS)  # Crop and Resize


def detected_map(
    unit: ControlNetUnit, reference: Image.Image, size: tuple[int, int]
) -> Image.Image:
    """A stand-in for the preprocessor's output (exact for reference and IP-Adapter modules)."""
    fitted = fit(reference, size, unit.resize_mode)
    name = unit.preprocessor.name
    if name == "invert":
        return ImageOps.invert(fitted)
    if name.startswith(_EDGE_MODULES):
        return fitted.convert("L").filter(ImageFilter.FIND_EDGES).convert("RGB")
    if name.startswith(_GREY_MODULES):
        return fitted.convert("L").convert("RGB")
    return fitted


def controlnet_for(
    alwayson_scripts: dict[str, Any] | None, *, installed: bool, models: list[str]
) -> ControlNetRun | None:
    """The ControlNet work of one txt2img (None without the extension); a unit that does not
    parse raises the ``GenerationError`` A1111 answers with (HTTP 500)."""
    if not installed:
        return None
    try:
        return prepare(controlnet_args(alwayson_scripts), list(models))
    except UnitError as exc:
        raise GenerationError(exc.error, exc.message) from exc


def with_controlnet(extra: dict[str, Any], run: ControlNetRun | None) -> dict[str, Any]:
    """``extra_generation_params`` with the ``ControlNet N`` entries where A1111 puts them:
    scripts' ``process`` runs before ``p.init`` adds the hires entries and before the LoRA
    hashes, so they come right after the schedule type."""
    if run is None or not run.units:
        return extra
    head = {k: v for k, v in extra.items() if k == "Schedule type"}
    tail = {k: v for k, v in extra.items() if k != "Schedule type"}
    return {**head, **run.infotext(), **tail}
