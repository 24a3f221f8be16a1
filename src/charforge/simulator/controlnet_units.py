"""sd-webui-controlnet 1.1.455's preprocessors and its API unit (``internal_controlnet/args.py``).

What is reproduced:

- the preprocessor catalog the ``/controlnet/module_list`` and ``/control_types`` routes list
  (a representative subset of the 72 names, with their ``model_free`` flag and sliders);
- ``ControlNetUnit.from_dict`` as the API parses ``alwayson_scripts.controlnet.args``: the
  ``input_image`` / ``mask_image`` aliases, the field defaults (``enabled`` false, ``module``
  "none", ``model`` "None", ``weight`` 1 in 0..2, ``resize_mode`` "Crop and Resize",
  ``save_detected_map`` true, ...), the pydantic-v1 ``ValidationError`` text A1111 answers with
  (HTTP 500) for an unknown module or an out-of-range value, and ``bound_check_params``, which
  replaces ``processor_res`` / ``threshold_a`` / ``threshold_b`` outside the preprocessor's
  slider range (-1 by default) with the slider's default;
- ``ControlNetUnit.serialize``: the ``ControlNet N`` infotext value.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

UNIT_COUNT = 3
"""``control_net_unit_count``: A1111 copies at most this many units from the request."""
API_VERSION = 3

RESIZE_MODES = ("Just Resize", "Crop and Resize", "Resize and Fill")
_RESIZE_ALIASES = {
    "Inner Fit (Scale to Fit)": "Crop and Resize",
    "Outer Fit (Shrink to Fit)": "Resize and Fill",
    "Scale to Fit (Inner Fit)": "Crop and Resize",
    "Envelope (Outer Fit)": "Resize and Fill",
}
_CONTROL_MODES = (
    ("BALANCED", "Balanced"),
    ("PROMPT", "My prompt is more important"),
    ("CONTROL", "ControlNet is more important"),
)
_HR_OPTIONS = (
    ("BOTH", "Both"),
    ("LOW_RES_ONLY", "Low res only"),
    ("HIGH_RES_ONLY", "High res only"),
)


@dataclass(frozen=True)
class Slider:
    """``PreprocessorParameter``; ``api_json`` is what ``module_detail`` lists."""

    label: str = "EMPTY_LABEL"
    value: float = 0.5
    minimum: float = 0.0
    maximum: float = 1.0
    step: float = 0.01
    visible: bool = False

    def api_json(self) -> dict[str, Any]:
        return {
            "name": self.label,
            "value": self.value,
            "min": self.minimum,
            "max": self.maximum,
            "step": self.step,
        }


# The base class's resolution slider; the legacy preprocessors keep it (they set
# ``self.resolution``, not ``self.slider_resolution``).
RESOLUTION = Slider("Resolution", 512, 128, 2048, 8, visible=True)
HIDDEN = Slider()


@dataclass(frozen=True)
class Preprocessor:
    name: str
    label: str = ""
    model_free: bool = False
    tags: tuple[str, ...] = ()
    priority: int = 0
    slider_1: Slider = HIDDEN
    slider_2: Slider = HIDDEN

    @property
    def shown(self) -> str:
        return self.label or self.name

    def detail(self) -> dict[str, Any]:
        sliders = [s for s in (RESOLUTION, self.slider_1, self.slider_2) if s.visible]
        return {"model_free": self.model_free, "sliders": [s.api_json() for s in sliders]}

    @property
    def is_ip_adapter(self) -> bool:
        return self.name.startswith("ip-adapter") or "IP-Adapter" in self.tags


def _p(name: str, *tags: str, **extra: Any) -> Preprocessor:
    return Preprocessor(name, tags=tags, **extra)


_FIDELITY = Slider("Style Fidelity (only for Balanced mode)", 0.5, 0.0, 1.0, 0.01, visible=True)
_NOISE = Slider("Noise Augmentation", 0.0, 0.0, 1.0, 0.01, visible=True)
PREPROCESSORS: tuple[Preprocessor, ...] = (
    _p("none"),
    _p("invert", "Canny", "Lineart", "Scribble", "MLSD"),
    _p(
        "canny",
        "Canny",
        slider_1=Slider("Low Threshold", 100, 1, 255, 1, visible=True),
        slider_2=Slider("High Threshold", 200, 1, 255, 1, visible=True),
    ),
    *(_p(n, "Depth") for n in ("depth", "depth_leres", "depth_leres++", "depth_zoe")),
    *(_p(n, "Depth") for n in ("depth_anything", "depth_anything_v2", "depth_hand_refiner")),
    *(_p(n, "NormalMap") for n in ("normal_map", "normal_bae", "normal_dsine")),
    *(_p(n, "OpenPose") for n in ("openpose", "openpose_face", "openpose_faceonly")),
    *(_p(n, "OpenPose") for n in ("openpose_full", "openpose_hand", "dw_openpose_full")),
    *(_p(n, "OpenPose") for n in ("animal_openpose", "densepose", "densepose_parula")),
    _p("mlsd", "MLSD"),
    *(_p(n, "Lineart") for n in ("lineart", "lineart_coarse", "lineart_standard")),
    *(_p(n, "Lineart") for n in ("lineart_anime", "lineart_anime_denoise")),
    *(_p(n, "SoftEdge") for n in ("softedge_hed", "softedge_hedsafe", "softedge_pidinet")),
    *(_p(n, "SoftEdge") for n in ("softedge_pidisafe", "softedge_teed", "softedge_anyline")),
    *(_p(n, "Scribble") for n in ("scribble_hed", "scribble_pidinet", "scribble_xdog")),
    *(_p(n, "Segmentation") for n in ("segmentation", "oneformer_coco", "oneformer_ade20k")),
    _p("shuffle", "Shuffle"),
    *(_p(n, "Tile") for n in ("tile_resample", "tile_colorfix", "tile_colorfix+sharp")),
    _p("color", "T2I-Adapter"),
    _p("threshold"),
    *(_p(n, "Inpaint") for n in ("inpaint", "inpaint_only", "inpaint_only+lama")),
    *(_p(n, "Recolor") for n in ("recolor_luminance", "recolor_intensity")),
    _p("mediapipe_face"),
    *(
        _p(n, "Reference", model_free=True, slider_1=_FIDELITY)
        for n in ("reference_only", "reference_adain", "reference_adain+attn")
    ),
    *(
        _p(n, "Revision", model_free=True, slider_1=_NOISE)
        for n in ("revision_clipvision", "revision_ignore_prompt")
    ),
    _p("clip_vision", "T2I-Adapter", label="t2ia_style_clipvision"),
    _p("t2ia_sketch_pidi", "T2I-Adapter"),
    _p("t2ia_color_grid", "T2I-Adapter"),
    _p("ip-adapter-auto", "IP-Adapter", priority=1000),
    _p("ip-adapter_clip_sd15", "IP-Adapter", label="ip-adapter_clip_h", priority=100),
    _p("ip-adapter_clip_sdxl", "IP-Adapter", label="ip-adapter_clip_g", priority=100),
    _p("ip-adapter_clip_sdxl_plus_vith", "IP-Adapter", priority=100),
    *(_p(n, "IP-Adapter") for n in ("ip-adapter_face_id", "ip-adapter_face_id_plus")),
    _p("ip-adapter_pulid", "IP-Adapter"),
    *(_p(n, "Instant-ID") for n in ("instant_id_face_embedding", "instant_id_face_keypoints")),
)
_BY_LABEL = {p.shown: p for p in PREPROCESSORS}
_BY_NAME = {p.name: p for p in PREPROCESSORS}


def find_preprocessor(module: Any) -> Preprocessor | None:
    """``Preprocessor.get_preprocessor``: by UI label first, then by internal name."""
    if not isinstance(module, str):
        return None
    return _BY_LABEL.get(module, _BY_NAME.get(module))


def sorted_preprocessors() -> list[Preprocessor]:
    """``get_sorted_preprocessors``: "none" first, then by priority and label, descending."""
    rest = [p for p in PREPROCESSORS if p.name != "none"]
    rest.sort(key=lambda p: str(p.priority).zfill(8) + p.shown, reverse=True)
    return [_BY_NAME["none"], *rest]


def module_list(alias_names: bool) -> dict[str, Any]:
    """``GET /controlnet/module_list``: names (or UI labels) and each one's sliders."""
    ordered = sorted_preprocessors()
    names = [p.shown if alias_names else p.name for p in ordered]
    return {
        "module_list": names,
        "module_detail": {n: p.detail() for n, p in zip(names, ordered, strict=True)},
    }


_MODEL_FILTER_ALIASES = {
    "ip-adapter": ("ip_adapter", "ipadapter"),
    "instant-id": ("instant_id", "instantid"),
    "openpose": ("openpose", "densepose"),
    "t2i-adapter": ("t2i_adapter", "t2iadapter", "t2ia"),
    "segmentation": ("seg",),
    "normalmap": ("normal",),
}


def control_types(models: list[str]) -> dict[str, Any]:
    """``GET /controlnet/control_types`` (``global_state.select_control_type`` per tag)."""
    tags = sorted({tag for p in PREPROCESSORS for tag in p.tags})
    answer: dict[str, Any] = {
        "All": {
            "module_list": [p.shown for p in PREPROCESSORS],
            "model_list": ["None", *models],
            "default_option": "none",
            "default_model": "None",
        }
    }
    for tag in tags:
        modules = [p.shown for p in sorted_preprocessors() if tag in p.tags or p.name == "none"]
        filters = (tag.lower(), *_MODEL_FILTER_ALIASES.get(tag.lower(), ()))
        wanted = ["None", *(m for m in models if any(f in m.lower() for f in filters))]
        answer[tag] = {
            "module_list": modules,
            "model_list": wanted,
            "default_option": modules[1] if len(modules) > 1 else modules[0],
            "default_model": wanted[1] if len(wanted) > 1 else "None",
        }
    return {"control_types": answer}


def find_model(search: str | None, installed: list[str]) -> str | None:
    """``find_closest_lora_model_name``: an exact title, else a case-insensitive file-name
    match, else the shortest name containing ``search``."""
    if not search:
        return None
    if search in installed:
        return search
    names = {title.rsplit(" [", 1)[0].lower(): title for title in installed}
    lowered = search.lower()
    if lowered in names:
        return names[lowered]
    applicable = sorted((n for n in names if lowered in n), key=len)
    return names[applicable[0]] if applicable else None


# --------------------------------------------------------------------------- the unit


class UnitError(Exception):
    """What ``ControlNetUnit.from_dict`` raises: (exception class name, message)."""

    def __init__(self, error: str, message: str) -> None:
        super().__init__(message)
        self.error = error
        self.message = message


@dataclass
class ControlNetUnit:
    """The fields of ``internal_controlnet.args.ControlNetUnit`` that the API uses."""

    enabled: bool = False
    module: str = "none"
    model: str = "None"
    weight: float = 1.0
    image: Any = None
    mask: Any = None
    resize_mode: str = "Crop and Resize"
    low_vram: bool = False
    processor_res: float = -1
    threshold_a: float = -1
    threshold_b: float = -1
    guidance_start: float = 0.0
    guidance_end: float = 1.0
    pixel_perfect: bool = False
    control_mode: str = "Balanced"
    hr_option: str = "Both"
    save_detected_map: bool = True
    raw: dict[str, Any] = field(default_factory=dict, repr=False)

    @property
    def preprocessor(self) -> Preprocessor:
        found = find_preprocessor(self.module)
        assert found is not None  # validated
        return found

    def serialize(self) -> str:
        """``ControlNetUnit.serialize``: the ``ControlNet N`` infotext value."""
        values = {
            "Module": self.module,
            "Model": self.model,
            "Weight": self.weight,
            "Resize Mode": self.resize_mode,
            "Processor Res": self.processor_res,
            "Threshold A": self.threshold_a,
            "Threshold B": self.threshold_b,
            "Guidance Start": self.guidance_start,
            "Guidance End": self.guidance_end,
            "Pixel Perfect": self.pixel_perfect,
            "Control Mode": self.control_mode,
        }
        if not all("," not in str(v) and ":" not in str(v) for v in values.values()):
            return ""  # the extension logs "Unexpected tokens encountered" and writes ""
        return ", ".join(f"{key}: {value}" for key, value in values.items())


_TRUE = {"1", "on", "t", "true", "y", "yes"}
_FALSE = {"0", "off", "f", "false", "n", "no"}


def _bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.lower() in _TRUE | _FALSE:
        return value.lower() in _TRUE
    raise _FieldError("value could not be parsed to a boolean", "type_error.bool")


def _float(value: Any) -> float:
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            pass
    raise _FieldError("value is not a valid float", "type_error.float")


def _int(value: Any) -> int:
    if isinstance(value, (int, float)):
        return int(value)
    if isinstance(value, str):
        try:
            return int(value)
        except ValueError:
            pass
    raise _FieldError("value is not a valid integer", "type_error.integer")


def _ranged(low: float, high: float) -> Any:
    def parse(value: Any) -> float:
        number = _float(value)
        if number < low:
            raise _FieldError(
                f"ensure this value is greater than or equal to {low}",
                "value_error.number.not_ge",
                f"limit_value={low}",
            )
        if number > high:
            raise _FieldError(
                f"ensure this value is less than or equal to {high}",
                "value_error.number.not_le",
                f"limit_value={high}",
            )
        return number

    return parse


def _enum(enum: str, members: tuple[tuple[str, str], ...]) -> Any:
    def parse(value: Any) -> str:
        for _, text in members:
            if value == text:
                return text
        permitted = ", ".join(repr(text) for _, text in members)
        shown = ", ".join(f"<{enum}.{key}: {text!r}>" for key, text in members)
        raise _FieldError(
            f"value is not a valid enumeration member; permitted: {permitted}",
            "type_error.enum",
            f"enum_values=[{shown}]",
        )

    return parse


def _module(value: Any) -> str:
    if find_preprocessor(value) is None:
        raise _FieldError(f"module({value}) not found in supported modules.", "value_error")
    return str(value)


def _model(value: Any) -> str:
    if value is None:
        raise _FieldError("none is not an allowed value", "type_error.none.not_allowed")
    return str(value)


def _resize_mode(value: Any) -> str:
    if isinstance(value, str):
        value = _RESIZE_ALIASES.get(value, value)
        if value in RESIZE_MODES:
            return str(value)
        raise _FieldError(f"{value!r} is not a valid ResizeMode", "value_error")
    raise _FieldError("", "assertion_error")  # `assert isinstance(value, ResizeMode)`


class _FieldError(Exception):
    def __init__(self, message: str, kind: str, ctx: str = "") -> None:
        super().__init__(message)
        self.text = message
        self.kind = kind
        self.ctx = ctx


_FIELDS: tuple[tuple[str, Any], ...] = (
    ("enabled", _bool),
    ("module", _module),
    ("model", _model),
    ("weight", _ranged(0.0, 2.0)),
    ("resize_mode", _resize_mode),
    ("low_vram", _bool),
    ("processor_res", _int),
    ("threshold_a", _float),
    ("threshold_b", _float),
    ("guidance_start", _ranged(0.0, 1.0)),
    ("guidance_end", _ranged(0.0, 1.0)),
    ("pixel_perfect", _bool),
    ("control_mode", _enum("ControlMode", _CONTROL_MODES)),
    ("hr_option", _enum("HiResFixOption", _HR_OPTIONS)),
    ("save_detected_map", _bool),
)


def _aliases(values: dict[str, Any]) -> dict[str, Any]:
    """``legacy_field_alias`` and ``mask_alias``, which run before pydantic does."""
    values = dict(values)
    for alias, key in (("guidance", "guidance_end"), ("lowvram", "low_vram")):
        if alias in values:
            if key in values:
                raise UnitError("AssertionError", f"Conflict of field '{alias}' and '{key}'")
            values[key] = values[alias]
    if "input_image" in values:
        if "image" in values:
            raise UnitError("AssertionError", "Conflict of field 'input_image' and 'image'")
        values["image"] = values["input_image"]
    if values.get("mask_image") is not None:
        if values.get("mask") is not None:
            raise UnitError("ValueError", "Cannot specify both 'mask' and 'mask_image'!")
        values["mask"] = values["mask_image"]
    return values


def parse_unit(given: dict[str, Any]) -> ControlNetUnit:
    """``ControlNetUnit.from_dict``; raises ``UnitError`` as A1111 would (HTTP 500)."""
    values = _aliases(given)
    unit = ControlNetUnit(image=values.get("image"), mask=values.get("mask"), raw=given)
    errors: list[tuple[str, _FieldError]] = []
    for name, parse in _FIELDS:
        if name not in values and name != "module":  # check_module runs on the default too
            continue
        try:
            setattr(unit, name, parse(values.get(name, unit.module)))
        except _FieldError as exc:
            errors.append((name, exc))
    failed = {name for name, _ in errors}
    if unit.enabled and "module" not in failed:
        _bound_check(unit, failed)
    ordered = unit.guidance_start <= unit.guidance_end
    if not {"guidance_start", "guidance_end"} & failed and not ordered:
        message = f"guidance_start({unit.guidance_start}) > guidance_end({unit.guidance_end})"
        errors.append(("__root__", _FieldError(message, "value_error")))
    if errors:
        count = len(errors)
        lines = [f"{count} validation error{'' if count == 1 else 's'} for ControlNetUnit"]
        for name, problem in errors:
            kind = f"type={problem.kind}" + (f"; {problem.ctx}" if problem.ctx else "")
            lines.append(f"{name}\n  {problem.text} ({kind})")
        raise UnitError("ValidationError", "\n".join(lines))
    return unit


def _bound_check(unit: ControlNetUnit, failed: set[str]) -> None:
    """``bound_check_params``: out-of-range (or -1) slider values become the defaults."""
    preprocessor = unit.preprocessor
    for name, slider in (
        ("processor_res", RESOLUTION),
        ("threshold_a", preprocessor.slider_1),
        ("threshold_b", preprocessor.slider_2),
    ):
        if name in failed:
            continue
        value = getattr(unit, name)
        if value < slider.minimum or value > slider.maximum:
            setattr(unit, name, slider.value)
