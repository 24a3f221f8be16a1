"""Identity conditioning on ComfyUI through cubiq/ComfyUI_IPAdapter_plus (and, in a user's
own workflow, whatever it wires to its ``{{reference_image}}`` placeholder).

Facts (IPAdapterPlus.py, ComfyUI's nodes.py and server.py):
- ``IPAdapterUnifiedLoader``: required ``model`` (MODEL), ``preset`` (a combo: "LIGHT - SD1.5
  only (low strength)", "STANDARD (medium strength)", "VIT-G (medium strength)", "PLUS (high
  strength)", "PLUS FACE (portraits)", "FULL FACE - SD1.5 only (portraits stronger)"),
  optional ``ipadapter``; returns (MODEL, IPADAPTER). It finds the IP-Adapter and CLIP vision
  files for the preset itself;
- ``IPAdapterAdvanced``: required ``model``, ``ipadapter``, ``image``, ``weight`` (-1..5),
  ``weight_type`` ("linear", ...), ``combine_embeds`` ("concat", "add", "subtract",
  "average", "norm average"), ``start_at``, ``end_at``, ``embeds_scaling`` ("V only", "K+V",
  ...); optional ``image_negative``, ``attn_mask``, ``clip_vision``; returns (MODEL,);
- ``LoadImage`` takes a file of ComfyUI's input folder by name (``image``), which ``POST
  /upload/image`` (multipart ``image``, ``type``, ``subfolder``, ``overwrite``) puts there;
- ``/object_info/{node}`` is ``{}`` for a node class the server does not have.

The graph: one ``LoadImage`` per reference (uploaded once per server, named by content hash),
an ``IPAdapterUnifiedLoader`` on the checkpoint's MODEL after any LoraLoader, then one
``IPAdapterAdvanced`` per reference chained on that model, and every KSampler (both passes
with hires) samples with the chain's end. Chained rather than one ``ImageBatch`` with
``combine_embeds: "average"``: ``ImageBatch`` rescales the second picture to the first one's
size, which distorts references of other proportions, while each adapter centre-crops its
own picture for CLIP vision; and the weights add up, so each adapter gets strength / number
of references and together they weigh the strength asked for (as an average would).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from charforge.backends.base import BackendRequest, IdentityUse, ReferenceImage
from charforge.backends.comfyui.client import ComfyClient
from charforge.backends.comfyui.graph import Graph, placeholders_in
from charforge.backends.identity_rule import asked, without
from charforge.errors import UnsupportedCapability

log = logging.getLogger(__name__)

LOAD_IMAGE = "LoadImage"
LOADER = "IPAdapterUnifiedLoader"
APPLY = "IPAdapterAdvanced"
IPADAPTER_NODES = (LOADER, APPLY)
FACE_PRESET = "PLUS FACE (portraits)"
PLAIN_PRESET = "PLUS (high strength)"
PLACEHOLDER = "reference_image"
_FACE_STYLES = frozenset({"realistic"})
INFO_SECONDS = 60.0  # what /object_info said about the nodes is trusted this long
NO_PLACEHOLDER = "the workflow has no {{reference_image}} placeholder"
INSTALL_HINT = (
    "Install ComfyUI_IPAdapter_plus (cubiq) and its models (IP-Adapter and CLIP vision) on "
    "that ComfyUI, or send identity.strength=0."
)
WORKFLOW_HINT = (
    "Add a LoadImage node whose image is {{reference_image}} (wired into the workflow's "
    "IPAdapter nodes) to the workflow, or send identity.strength=0."
)
WORKFLOW_METHOD = "comfyui workflow ({{reference_image}})"


class WorkflowNeedsReference(UnsupportedCapability):
    """A workflow drawn around ``{{reference_image}}`` got a request with nothing to put
    there: another backend of the pool may run it."""

    backend_specific = True


def preset_for(style: str) -> str:
    # A face model keeps a photographic face; on drawn styles it fights the style.
    return FACE_PRESET if style in _FACE_STYLES else PLAIN_PRESET


def method_label(preset: str) -> str:
    return f"comfyui ipadapter ({preset})"


def reference_name(reference: ReferenceImage) -> str:
    """The file a reference has in ComfyUI's input folder: by content, so the same picture
    is one file however many jobs and characters use it."""
    return f"charforge-{reference.sha256[:16]}.png"


def has_placeholder(template: Graph | None) -> bool:
    return template is not None and PLACEHOLDER in placeholders_in(template)


def check_workflow_reference(template: Graph | None, request: BackendRequest, backend: str) -> None:
    """A workflow with ``{{reference_image}}`` cannot run without a reference to put there."""
    if has_placeholder(template) and not asked(request):
        raise WorkflowNeedsReference(
            f"Backend '{backend}' runs a workflow that conditions on a reference image "
            "({{reference_image}}), and this request has none (the character has no "
            "reference images, or identity.strength is 0).",
            field="identity",
            hint="Add a reference image to the character, or send this style's jobs to a "
            "backend whose workflow has no {{reference_image}}.",
            extra={"backends": [backend]},
        )


@dataclass(frozen=True)
class Conditioning:
    """What a request's graphs get: the references' names in the input folder, and the
    preset (None: a user's workflow, which takes the first name as its placeholder)."""

    names: tuple[str, ...]
    preset: str | None
    strength: float

    @property
    def label(self) -> str:
        return method_label(self.preset) if self.preset else WORKFLOW_METHOD


def add_ipadapter(graph: Graph, conditioning: Conditioning) -> Graph:
    """``graph`` (charforge's own) with the references wired into every KSampler's model."""
    samplers = [node for node in graph.values() if node.get("class_type") == "KSampler"]
    if not samplers or conditioning.preset is None or not conditioning.names:
        return graph
    model = list(samplers[0]["inputs"]["model"])  # the checkpoint's, after any LoraLoader
    graph["ipadapter"] = {
        "class_type": LOADER,
        "inputs": {"model": model, "preset": conditioning.preset},
    }
    current: list[Any] = ["ipadapter", 0]
    # The adapters' weights add up: together they weigh the strength asked for.
    weight = conditioning.strength / len(conditioning.names)
    for index, name in enumerate(conditioning.names, start=1):
        graph[f"reference{index}"] = {"class_type": LOAD_IMAGE, "inputs": {"image": name}}
        graph[f"ipadapter{index}"] = {
            "class_type": APPLY,
            "inputs": {
                "model": current,
                "ipadapter": ["ipadapter", 1],
                "image": [f"reference{index}", 0],
                "weight": weight,
                "weight_type": "linear",
                "combine_embeds": "concat",
                "start_at": 0.0,
                "end_at": 1.0,
                "embeds_scaling": "V only",
            },
        }
        current = [f"ipadapter{index}", 0]
    for node in samplers:
        node["inputs"]["model"] = [*current]  # a list each: one shared list would tie them
    return graph


class ComfyIdentity:
    """What one ComfyUI offers for identity (asked again at each health probe, and at most
    once a minute otherwise), and the references uploaded to it."""

    def __init__(
        self,
        client: ComfyClient,
        template: Graph | None,
        object_info: Callable[..., Any],
        forget_info: Callable[..., None],
        combo_options: Callable[[Any, str, str], list[str] | None],
    ) -> None:
        self._client = client
        self._backend = client.spec.name
        self._template = template
        self._object_info, self._forget_info = object_info, forget_info
        self._combo_options = combo_options
        self._lock = threading.Lock()
        self._uploaded: dict[str, str] = {}  # sha256 -> the file's name in the input folder

    def forget(self) -> None:
        self._forget_info(LOAD_IMAGE, *IPADAPTER_NODES)

    def lacking(self, style: str, *, timeout: float | None = None) -> str | None:
        """Why this server cannot condition a graph of ours; None when it can."""
        if self._template is not None:
            return None if has_placeholder(self._template) else NO_PLACEHOLDER
        missing = [
            node
            for node in (*IPADAPTER_NODES, LOAD_IMAGE)
            if not isinstance(self._info(node, style, timeout).get(node), dict)
        ]
        if missing:
            return f"ComfyUI has no {', '.join(missing)} node (ComfyUI_IPAdapter_plus)"
        if self.preset(style) is None:
            return f"its {LOADER} offers neither '{FACE_PRESET}' nor '{PLAIN_PRESET}'"
        return None

    def _info(self, node: str, style: str | None, timeout: float | None = None) -> dict[str, Any]:
        """``/object_info/{node}`` ({} for a node class ComfyUI does not have), at most a
        minute old."""
        info = self._object_info(node, style=style, max_age=INFO_SECONDS, timeout=timeout)
        return info if isinstance(info, dict) else {}

    def preset(self, style: str) -> str | None:
        """The preset for the style, or the other one where the loader lacks it."""
        options = self._combo_options(self._info(LOADER, style), LOADER, "preset")
        wanted = preset_for(style)
        if options is None or wanted in options:
            return wanted
        other = PLAIN_PRESET if wanted == FACE_PRESET else FACE_PRESET
        return other if other in options else None

    def method(self, style: str, *, timeout: float | None = None) -> str | None:
        """How a graph of this style would be conditioned; None when it cannot be."""
        if self.lacking(style, timeout=timeout) is not None:
            return None
        if self._template is not None:
            return WORKFLOW_METHOD
        preset = self.preset(style)
        return method_label(preset) if preset else None

    def without(self, request: BackendRequest, why: str) -> IdentityUse:
        hint = WORKFLOW_HINT if why == NO_PLACEHOLDER else INSTALL_HINT
        return without(request, self._backend, why, hint=hint)

    def plan(self, request: BackendRequest) -> tuple[Conditioning | None, IdentityUse | None]:
        """What this request's graphs get, and what its images will say about identity;
        the references are in ComfyUI's input folder when this returns a conditioning."""
        check_workflow_reference(self._template, request, self._backend)
        if not asked(request):
            return None, None
        why = self.lacking(request.style)
        if why is not None:
            return None, self.without(request, why)
        preset = None if self._template is not None else self.preset(request.style)
        # A workflow's placeholder takes one picture: the first reference.
        references = request.references[:1] if self._template else request.references
        names = self.upload(references, request.style)
        conditioning = Conditioning(names, preset, request.params.identity_strength)
        return conditioning, IdentityUse(True, conditioning.label)

    def upload(
        self, references: tuple[ReferenceImage, ...], style: str, *, again: bool = False
    ) -> tuple[str, ...]:
        """Each reference's name in the input folder: uploaded unless this server has it
        already (remembered, and still in LoadImage's list); ``again`` uploads them all."""
        listing = self._combo_options(self._info(LOAD_IMAGE, style), LOAD_IMAGE, "image")
        listed = None if listing is None else set(listing)
        names: list[str] = []
        sent = False
        for reference in references:
            with self._lock:
                known = self._uploaded.get(reference.sha256)
            if again or known is None or (listed is not None and known not in listed):
                known = self._client.upload_image(
                    reference.png, reference_name(reference), style=style
                )
                log.info("backend %s: reference uploaded as %s", self._backend, known)
                with self._lock:
                    self._uploaded[reference.sha256] = known
                sent = True
            names.append(known)
        if sent:
            self._forget_info(LOAD_IMAGE)  # its list has the new files now
        return tuple(names)
