"""Identity conditioning on a RunPod worker, which cannot be asked what it has installed.

The a1111 worker gets A1111's ControlNet units (``a1111.controlnet``) with ``reference_only``,
which needs no model file (the worker's models cannot be listed); the comfyui worker gets the
ComfyUI adapter's IPAdapter graph (``comfyui.identity``) and the references in
``input.images``. A worker found without them (the job fails: "Script 'controlnet' not
found", "Cannot execute because node IPAdapterUnifiedLoader does not exist") is remembered
for a while, so default jobs go without at once, and the probe reports it.
"""

from __future__ import annotations

import threading
import time

from charforge.backends.a1111.controlnet import REFERENCE_ONLY
from charforge.backends.base import BackendRequest, IdentityUse
from charforge.backends.comfyui.graph import Graph
from charforge.backends.comfyui.identity import (
    INSTALL_HINT,
    IPADAPTER_NODES,
    NO_PLACEHOLDER,
    WORKFLOW_HINT,
    WORKFLOW_METHOD,
    has_placeholder,
    method_label,
    preset_for,
)
from charforge.backends.identity_rule import without
from charforge.domain.capabilities import Capability

# How long a worker found without the extension or nodes is taken to lack them.
MISSING_SECONDS = 300.0
CONTROLNET_HINT = (
    "Use a worker image with the ControlNet extension (sd-webui-controlnet) installed, or send "
    "identity.strength=0."
)
NO_CONTROLNET = "its A1111 worker has no ControlNet extension"


def names_ipadapter(text: str) -> str | None:
    """The IPAdapter node class a worker's failure says ComfyUI does not have."""
    return next((node for node in IPADAPTER_NODES if f"node {node} does not exist" in text), None)


class RunPodIdentity:
    def __init__(self, backend: str, worker: str, template: Graph | None) -> None:
        self._backend, self._worker, self._template = backend, worker, template
        self._lock = threading.Lock()
        self._missing: tuple[float, str] | None = None  # when, and why
        self._working = False  # a job was conditioned since the last miss

    def label(self, style: str) -> str:
        if self._worker != "comfyui":
            return REFERENCE_ONLY.label
        return WORKFLOW_METHOD if self._template is not None else method_label(preset_for(style))

    def known_missing(self) -> str | None:
        """Why the worker cannot condition, when that was found out recently (or its
        workflow has no placeholder)."""
        if self._template is not None and not has_placeholder(self._template):
            return NO_PLACEHOLDER
        with self._lock:
            missing = self._missing
        if missing is not None and time.monotonic() - missing[0] < MISSING_SECONDS:
            return missing[1]
        return None

    def found_missing(self, why: str) -> None:
        with self._lock:
            self._missing, self._working = (time.monotonic(), why), False

    def found_working(self) -> None:
        with self._lock:
            self._missing, self._working = None, True

    def without(self, request: BackendRequest, why: str) -> IdentityUse:
        if self._worker != "comfyui":
            hint = CONTROLNET_HINT
        else:
            hint = WORKFLOW_HINT if why == NO_PLACEHOLDER else INSTALL_HINT
        return without(request, self._backend, why, hint=hint)

    def probed(self) -> tuple[frozenset[Capability] | None, str | None]:
        """``ProbeResult.lacking`` and ``identity_method``: known only from jobs (or the
        workflow), else None (not known)."""
        if self.known_missing() is not None:
            return frozenset({Capability.REFERENCE_IMAGE}), None
        with self._lock:
            working = self._working
        return (frozenset(), self.label("realistic")) if working else (None, None)
