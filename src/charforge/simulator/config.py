"""The simulator's knobs: what it serves (settings) and how it misbehaves (faults)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal

Flavor = Literal["a1111", "forge"]


@dataclass
class Faults:
    """Ways to make the simulator fail. Mutable at run time; everything is off by default.

    The transport faults (``fail_status`` to ``drop_connection``) apply to
    ``POST /sdapi/v1/txt2img`` only, after the request has waited for its turn (one generation
    at a time) and after ``delay_seconds``, so ``delay_seconds`` plus ``fail_status=524``
    behaves like a proxy that gave up on a slow backend. ``nan_prompts`` and
    ``corrupt_checkpoints`` are errors that fail again: the same request fails every time.
    """

    fail_status: int | None = None
    """Answer with this status: 502 and 524 get a proxy's HTML page, anything else the
    flavor's JSON error body carrying ``fail_message``."""
    fail_message: str = "simulated failure"
    delay_seconds: float = 0.0
    """Sleep this long while holding the generation lock (a slow backend); ``/progress``
    advances meanwhile and ``/interrupt`` cuts it short."""
    ignore_checkpoint: bool = False
    """Ignore ``override_settings.sd_model_checkpoint`` and render with the current model."""
    switch_delay_seconds: float = 0.0
    """Extra sleep whenever the model in memory has to change."""
    malformed_json: bool = False
    """Answer 200 with a truncated body that is not JSON."""
    broken_image: bool = False
    """Answer 200 with valid JSON whose ``images[0]`` is base64 of bytes that are not a PNG."""
    drop_connection: bool = False
    """Close the TCP connection without writing a single byte of response."""
    nan_prompts: list[str] = field(default_factory=list)
    """A txt2img whose prompt contains one of these substrings fails at its first sampling
    step with A1111's ``NansException`` (HTTP 500), every time, like bad weights do."""
    corrupt_checkpoints: list[str] = field(default_factory=list)
    """Checkpoint file names (as in ``SimulatorSettings.models``) that are truncated on disk:
    loading one fails with ``SafetensorError`` "MetadataIncompleteBuffer". A checkpoint already
    in memory keeps working until something else is loaded."""

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def reset(self) -> None:
        """Switch every fault off again."""
        for f in dataclasses.fields(self):
            setattr(self, f.name, getattr(Faults(), f.name))


@dataclass
class SimulatorSettings:
    models: list[str]
    """Checkpoint file names relative to the models folder, e.g. ``["diving.safetensors"]``
    or ``["anime/diving.safetensors"]``. The first one is loaded at start.
    ``POST /sdapi/v1/refresh-checkpoints`` re-reads this list."""
    flavor: Flavor = "a1111"
    api_auth: tuple[str, str] | None = None
    """HTTP Basic credentials, like A1111's ``--api-auth user:pass``. Routes that extensions and
    the UI register on the app directly (``/sdapi/v1/loras``, ``/internal/*``) stay open."""
    name: str = "a1111-sim"
    loras: list[str] = field(default_factory=list)
    """LoRA file names relative to ``models/Lora``, e.g. ``["detail_tweaker.safetensors",
    "styles/outline.safetensors"]``. ``POST /sdapi/v1/refresh-loras`` re-reads this list (and
    so does a generation that names a LoRA it does not know yet, like A1111)."""
    lora_metadata: dict[str, dict[str, Any]] = field(default_factory=dict)
    """Optional safetensors metadata per LoRA file name; ``ss_output_name`` becomes the alias
    and ``sshs_model_hash`` the hash, as in A1111."""
    nowebui: bool = False
    """Like ``--nowebui``: API only. The UI's routes (``/internal/progress``,
    ``/internal/ping``) are then missing (404), as in A1111 1.10's ``api_only()``."""
    controlnet: bool = False
    """Whether the sd-webui-controlnet extension (1.1.455, API v3) is installed: its
    ``/controlnet/*`` routes and the ``controlnet`` always-on script. Without it those routes
    answer 404 and a txt2img naming the script answers 422 "Script 'controlnet' not found"."""
    controlnet_models: list[str] = field(default_factory=list)
    """ControlNet / IP-Adapter model files the extension lists, as titles ``name [hash]``, e.g.
    ``["ip-adapter-plus-face_sd15 [71693645]", "ip-adapter_sd15 [6a3f6166]"]``. A unit whose
    module needs a model that is not here is silently not applied (HTTP 200)."""
    upscalers: list[str] = field(default_factory=list)
    """Upscaler models added to ``models/ESRGAN`` and the like (e.g. ``["4x-UltraSharp"]``),
    listed by ``/sdapi/v1/upscalers`` after A1111's own."""
    photo_outputs: list[bytes] = field(default_factory=list)
    """Encoded pictures (PNG, JPEG, ...) to answer with instead of the placeholder: the N-th
    image generated since start (or ``reset()``) is ``photo_outputs[min(N, len - 1)]``, scaled
    and centre-cropped to the image's size. Seeds, infotexts and ControlNet detected maps are
    unchanged, and applied ControlNet units still blend their reference in."""


@dataclass(frozen=True)
class RecordedRequest:
    """One HTTP request as the simulator received it."""

    method: str
    path: str
    body: Any
    """Parsed JSON, or None when the body was empty or not JSON."""
    headers: dict[str, str] = field(default_factory=dict)
    """Header names in lower case; repeated headers are joined with ``", "``."""
    query: str = ""

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)
