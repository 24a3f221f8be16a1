"""Identity conditioning through A1111's ControlNet extension (Forge has it built in).

What is installed is asked of the extension (``/controlnet/module_list``, ``/model_list``):
an IP-Adapter model when there is one (a face variant for realistic styles), otherwise
``reference_only``, which needs no model. One unit per reference image, weighted by the
strength; ``save_detected_map: false`` so that no preprocessor map is appended to the
answer (the answer parser keeps only the generated images in any case). A WebUI without the
extension answers 404 on those routes and 422 to any ``alwayson_scripts.controlnet``.
"""

from __future__ import annotations

import base64
import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from charforge.backends.base import BackendRequest, IdentityUse, ReferenceImage
from charforge.backends.identity_rule import asked, without
from charforge.domain.checkpoints import strip_hash
from charforge.domain.routes import BackendSpec
from charforge.errors import BackendRejected

if TYPE_CHECKING:
    from charforge.backends.a1111.client import A1111Client

_LIST_CACHE_SECONDS = 60.0
DEFAULT_UNITS = 3  # the extension's "Multi-ControlNet: Max models" default

_FACE_STYLES = frozenset({"realistic"})
# Names Forge gives its built-in IP-Adapter preprocessors, and the extension's.
_IP_MODULES = ("ip-adapter-auto", "ip-adapter_clip_sd15", "ip-adapter_clip_h")


@dataclass(frozen=True)
class ControlNetMethod:
    module: str
    model: str  # "None" for a model-free preprocessor such as reference_only
    label: str  # what images record as the identity method

    def units(
        self, references: tuple[ReferenceImage, ...], strength: float
    ) -> list[dict[str, Any]]:
        return [
            {
                "enabled": True,  # the extension's default is false: a unit without it is ignored
                "module": self.module,
                "model": self.model,
                "image": base64.b64encode(ref.png).decode("ascii"),
                "weight": strength,
                "resize_mode": "Crop and Resize",
                "control_mode": "Balanced",
                "pixel_perfect": False,
                "save_detected_map": False,
            }
            for ref in references
        ]

    def capped(
        self, references: tuple[ReferenceImage, ...], strength: float, unit_count: int
    ) -> tuple[list[dict[str, Any]], str]:
        """Units for the first references, as many as the extension takes (the first one is
        the character's main picture), and the label saying how many were used."""
        used = references[:unit_count]
        label = self.label
        if len(used) < len(references):
            label += f", {len(used)} of {len(references)} references"
        return self.units(used, strength), label


REFERENCE_ONLY = ControlNetMethod("reference_only", "None", "controlnet reference_only")


def choose_method(modules: list[str], models: list[str], *, style: str) -> ControlNetMethod | None:
    """The best identity method the extension offers for this style; None when none."""
    ip_models = [m for m in models if "ip-adapter" in m.lower() or "ip_adapter" in m.lower()]
    if ip_models:
        faces = [m for m in ip_models if "face" in m.lower()]
        plain = [m for m in ip_models if "face" not in m.lower()]
        # A face model keeps a photographic face; on drawn styles it fights the style.
        pick = (faces or plain)[0] if style in _FACE_STYLES else (plain or faces)[0]
        module = _module_for(pick, modules)
        if module is not None:
            return ControlNetMethod(module, pick, f"controlnet ip-adapter ({strip_hash(pick)})")
    if "reference_only" in modules:
        return REFERENCE_ONLY
    return None


def _module_for(model: str, modules: list[str]) -> str | None:
    lowered = model.lower()
    if "faceid" in lowered or "face_id" in lowered:
        wanted = [m for m in modules if "face_id" in m.lower()]
        return wanted[0] if wanted else None  # FaceID models need the InsightFace module
    for name in _IP_MODULES:
        if name in modules:
            return name
    return next((m for m in modules if m.lower().startswith("ip-adapter")), None)


def with_units(payload: dict[str, Any], units: list[dict[str, Any]]) -> dict[str, Any]:
    scripts = dict(payload.get("alwayson_scripts") or {})
    scripts["controlnet"] = {"args": units}
    return {**payload, "alwayson_scripts": scripts}


def units_reported(info: dict[str, Any], count: int) -> bool:
    """The extension names each unit it ran in the infotext (``ControlNet 0``, ...)."""
    extra = info.get("extra_generation_params")
    if not isinstance(extra, dict):
        return False
    return all(f"ControlNet {index}" in extra for index in range(count))


def script_missing(message: str) -> bool:
    """A1111's 422 for an ``alwayson_scripts`` entry it has no script for: "Script
    'controlnet' not found" (seen on 1.10) or "always on script controlnet not found"."""
    lowered = message.lower()
    return "controlnet" in lowered and "not found" in lowered


class ControlNetProbe:
    """What one WebUI's ControlNet extension offers (asked again at each health probe, and
    at most once a minute otherwise), and the units a request gets from it."""

    def __init__(self, spec: BackendSpec, http: A1111Client) -> None:
        self._spec, self._http = spec, http
        self._lock = threading.Lock()
        self._lists: tuple[float, tuple[list[str], list[str]] | None] | None = None
        # How many units a txt2img may carry (the extension's "Multi-ControlNet: Max models"
        # setting, 3 by default): units beyond it are dropped without a word.
        self.unit_count = DEFAULT_UNITS

    def forget(self) -> None:
        with self._lock:
            self._lists = None

    def lists(self, style: str | None = None) -> tuple[list[str], list[str]] | None:
        """(modules, models) of the extension; None when it is not installed."""
        with self._lock:
            cached = self._lists
        if cached is not None and time.monotonic() - cached[0] < _LIST_CACHE_SECONDS:
            return cached[1]
        try:
            modules = self._http.json(
                self._http.call("GET", "/controlnet/module_list", style=style), style
            )
            models = self._http.json(
                self._http.call("GET", "/controlnet/model_list", style=style), style
            )
            settings = self._http.json(
                self._http.call("GET", "/controlnet/settings", style=style), style
            )
        except BackendRejected as exc:
            if "404" not in exc.message:
                raise
            found = None
        else:
            names = modules.get("module_list") if isinstance(modules, dict) else None
            files = models.get("model_list") if isinstance(models, dict) else None
            found = (
                [m for m in names or [] if isinstance(m, str)],
                [m for m in files or [] if isinstance(m, str) and m != "None"],
            )
            count = settings.get("control_net_unit_count") if isinstance(settings, dict) else None
            self.unit_count = count if isinstance(count, int) and count > 0 else DEFAULT_UNITS
        with self._lock:
            self._lists = (time.monotonic(), found)
        return found

    def method(self, style: str) -> ControlNetMethod | None:
        lists = self.lists(style)
        return choose_method(*lists, style=style) if lists is not None else None

    def without(self, request: BackendRequest, why: str) -> IdentityUse:
        return without(
            request,
            self._spec.name,
            why,
            hint="Install the ControlNet extension (sd-webui-controlnet; Forge has it built in) "
            "on that WebUI, or send identity.strength=0.",
        )

    def conditioning(
        self, request: BackendRequest
    ) -> tuple[list[dict[str, Any]], IdentityUse | None]:
        """The units for this request, and what the image will say about identity."""
        p = request.params
        if not asked(request):
            return [], None
        method = self.method(request.style)
        if method is None:
            why = (
                "the WebUI has no ControlNet extension"
                if self.lists(request.style) is None
                else "its ControlNet extension has neither an IP-Adapter model nor reference_only"
            )
            return [], self.without(request, why)
        units, label = method.capped(request.references, p.identity_strength, self.unit_count)
        return units, IdentityUse(True, label)
