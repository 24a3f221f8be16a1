"""What each kind of backend can do, and what a request needs of the backend that serves it.

A request never loses a feature silently: what it asks for explicitly and no backend of its
route can do is a 422 naming the backends and the capability; a backend of a mixed pool that
cannot do it is skipped for that job. Defaults adapt instead (a route whose backends have no
high-resolution pass renders without one), and the job records what was really used.
"""

from __future__ import annotations

import re
from enum import StrEnum


class Capability(StrEnum):
    HIRES = "hires"  # a high-resolution second pass
    LORA = "lora"  # <lora:name:weight> tags in the prompt
    REFERENCE_IMAGE = "reference_image"  # an input picture (img2img / IP-Adapter)
    PROGRESS = "progress"  # step progress while it runs
    CANCEL = "cancel"  # a running generation can be stopped
    CHECKPOINT_LIST = "checkpoint_list"  # it can say which checkpoints it has
    CHECKPOINT_HASH = "checkpoint_hash"  # it reports the hash of the weights that ran
    CLIP_SKIP = "clip_skip"  # stop the text encoder before its last layer(s)


DESCRIPTIONS: dict[Capability, str] = {
    Capability.HIRES: "the high-resolution second pass",
    Capability.LORA: "LoRA tags (<lora:name:weight>) in the prompt",
    Capability.REFERENCE_IMAGE: "identity conditioning on reference images",
    Capability.PROGRESS: "step progress",
    Capability.CANCEL: "cancelling a running generation",
    Capability.CHECKPOINT_LIST: "listing its checkpoints",
    Capability.CHECKPOINT_HASH: "reporting checkpoint hashes",
    Capability.CLIP_SKIP: "clip skip",
}

# Which request field asks for a capability, for the 422's `field`.
FIELDS: dict[Capability, str] = {
    Capability.HIRES: "hires",
    Capability.LORA: "prompt",
    Capability.REFERENCE_IMAGE: "identity",
    Capability.CLIP_SKIP: "clipSkip",
}

_ALL = frozenset(Capability)

# The kinds of backend and what each can do. ComfyUI reports no hashes; RunPod serverless
# has no way to list a worker's models, and only the ComfyUI worker reports its steps; the
# local engine loads neither LoRA files nor IP-Adapter weights yet. Reference images need an
# extension (A1111's ControlNet, ComfyUI's IPAdapter nodes): a backend found without it at
# its probe loses the capability (BackendPool.capabilities).
KIND_CAPABILITIES: dict[str, frozenset[Capability]] = {
    "a1111": _ALL,
    "comfyui": _ALL - {Capability.CHECKPOINT_HASH},
    "runpod-a1111": _ALL - {Capability.CHECKPOINT_LIST, Capability.PROGRESS},
    "runpod-comfyui": _ALL - {Capability.CHECKPOINT_LIST, Capability.CHECKPOINT_HASH},
    "local": _ALL - {Capability.LORA, Capability.REFERENCE_IMAGE},
}

# A user's own ComfyUI workflow decides its passes and loaders: charforge only fills in the
# placeholders, so it cannot add a second pass, LoRA loaders or a CLIPSetLastLayer to it.
CUSTOM_WORKFLOW_LACKS = frozenset({Capability.HIRES, Capability.LORA, Capability.CLIP_SKIP})

_LORA_TAG = re.compile(r"<lora:[^:>]+(?::[^>]*)?>", re.IGNORECASE)


def capabilities_for(
    kind: str, *, worker: str | None = None, custom_workflow: bool = False
) -> frozenset[Capability]:
    key = f"{kind}-{worker or 'a1111'}" if kind == "runpod" else kind
    caps = KIND_CAPABILITIES[key]
    if custom_workflow:
        caps = caps - CUSTOM_WORKFLOW_LACKS
    return caps


def has_lora_tags(prompt: str) -> bool:
    return bool(_LORA_TAG.search(prompt))


def lora_tags(prompt: str) -> list[tuple[str, float]]:
    """``<lora:name:0.8>`` -> ``[("name", 0.8)]``; a missing or unreadable weight is 1.0."""
    found = []
    for match in _LORA_TAG.finditer(prompt):
        inner = match.group(0)[len("<lora:") : -1]
        name, _, rest = inner.partition(":")
        weight_text = rest.split(":", 1)[0]
        try:
            weight = float(weight_text) if weight_text else 1.0
        except ValueError:
            weight = 1.0
        found.append((name.strip(), weight))
    return found


def strip_lora_tags(prompt: str) -> str:
    """The prompt without its LoRA tags (for backends that load LoRA as nodes)."""
    return re.sub(r"\s{2,}", " ", _LORA_TAG.sub("", prompt)).strip(" ,")


def needed(*, hires: bool, prompt: str, clip_skip: int = 1) -> frozenset[Capability]:
    """The capabilities a generation with these parameters needs of its backend."""
    needs = set()
    if hires:
        needs.add(Capability.HIRES)
    if clip_skip > 1:
        needs.add(Capability.CLIP_SKIP)
    if has_lora_tags(prompt):
        needs.add(Capability.LORA)
    return frozenset(needs)
