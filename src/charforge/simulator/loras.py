"""LoRAs as A1111 1.10's built-in Lora extension (``extensions-builtin/Lora``) handles them.

What is reproduced: the ``/sdapi/v1/loras`` listing (name = file name without extension, alias
from ``ss_output_name`` metadata), the lookup of ``<lora:NAME:TE:UNET>`` prompt tags by name or
alias (an unknown name triggers one re-read of the folder, then is silently skipped: "Lora not
found"), and the ``Lora hashes`` infotext entry (mentioned name with ``:``/``,`` removed, the
first 12 hex characters of the file's hash).
"""

from __future__ import annotations

import hashlib
import logging
import posixpath
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

LORA_DIR = "/models/Lora"
_EXTENSIONS = (".safetensors", ".pt", ".ckpt")
# extra_networks.re_extra_net; "lyco" is registered as an alias of "lora".
_EXTRA_NETWORK = re.compile(r"<(\w+):([^>]+)>")
_LORA_TAGS = ("lora", "lyco")
# networks.list_available_networks: names that never resolve through the alias table.
_FORBIDDEN_ALIASES = ("none", "addams")

log = logging.getLogger("charforge.simulator")


@dataclass(frozen=True)
class LoraOnDisk:
    """One LoRA file, like ``network.NetworkOnDisk``."""

    file: str
    """Path relative to the Lora folder: ``styles/outline.safetensors``."""
    metadata: dict[str, Any] = field(default_factory=dict, hash=False, compare=False)

    @property
    def name(self) -> str:
        return posixpath.splitext(posixpath.basename(self.file.replace("\\", "/")))[0]

    @property
    def alias(self) -> str:
        value = self.metadata.get("ss_output_name")
        return value if isinstance(value, str) and value else self.name

    @property
    def path(self) -> str:
        return f"{LORA_DIR}/{self.file}"

    @property
    def full_hash(self) -> str:
        given = self.metadata.get("sshs_model_hash")
        if isinstance(given, str) and given:
            return given
        return hashlib.sha256(f"charforge-simulator-lora:{self.file}".encode()).hexdigest()

    @property
    def shorthash(self) -> str:
        """``NetworkOnDisk.shorthash``: the first 12 hex characters (checkpoints use 10)."""
        return self.full_hash[:12]

    def api_item(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "alias": self.alias,
            "path": self.path,
            "metadata": self.metadata,
        }


@dataclass(frozen=True)
class LoraTag:
    """One ``<lora:...>`` tag of a prompt, its multipliers parsed."""

    mentioned: str
    te: float
    unet: float


@dataclass(frozen=True)
class AppliedLora:
    lora: LoraOnDisk
    tag: LoraTag

    @property
    def render_key(self) -> str | None:
        """What it changes in the picture; None when both multipliers are 0 (no effect)."""
        if self.tag.te == 0 and self.tag.unet == 0:
            return None
        return f"{self.lora.name}:{self.tag.te:g}:{self.tag.unet:g}"


class LoraCatalog:
    """``networks.available_networks`` and its alias table. Not thread-safe on its own: the
    engine calls it under its state lock."""

    def __init__(self) -> None:
        self._by_name: dict[str, LoraOnDisk] = {}
        self._by_alias: dict[str, LoraOnDisk] = {}
        self._forbidden: set[str] = set()

    def refresh(self, files: list[str], metadata: dict[str, dict[str, Any]]) -> None:
        """``list_available_networks``: re-read the folder (here: the settings)."""
        self._by_name.clear()
        self._by_alias.clear()
        self._forbidden = set(_FORBIDDEN_ALIASES)
        for file in files:
            if not file.lower().endswith(_EXTENSIONS):
                continue
            entry = LoraOnDisk(file, dict(metadata.get(file, {})))
            self._by_name[entry.name] = entry
            if entry.alias in self._by_alias:
                self._forbidden.add(entry.alias.lower())
            self._by_alias[entry.name] = entry
            self._by_alias[entry.alias] = entry

    def api_list(self) -> list[dict[str, Any]]:
        return [entry.api_item() for entry in self._by_name.values()]

    def lookup(self, mentioned: str) -> LoraOnDisk | None:
        if mentioned.lower() in self._forbidden:
            return self._by_name.get(mentioned)
        return self._by_alias.get(mentioned)


def parse_lora_tags(prompt: str) -> list[list[str]]:
    """The ``<lora:...>`` / ``<lyco:...>`` tags of ``prompt``, each split on ``:``."""
    return [args.split(":") for kind, args in _EXTRA_NETWORK.findall(prompt) if kind in _LORA_TAGS]


def _tag(items: list[str], default: float) -> LoraTag:
    """``ExtraNetworkLora.activate`` for one tag; raises ValueError on a bad number."""
    positional: list[str] = []
    named: dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if sep:
            named[key] = value
        else:
            positional.append(item)
    if not positional:
        raise ValueError("a lora tag needs a name")
    te = float(named.get("te", positional[1] if len(positional) > 1 else default))
    unet = float(named.get("unet", positional[2] if len(positional) > 2 else te))
    return LoraTag(positional[0], te, unet)


def resolve_loras(
    catalog: LoraCatalog,
    prompt: str,
    reread: Callable[[], None],
    default_multiplier: float = 1.0,
) -> tuple[list[AppliedLora], str | None]:
    """Apply the prompt's LoRA tags: (what was applied, the ``Lora hashes`` value or None).

    ``reread`` is called (once) when a name is unknown, like A1111 re-listing its folder.
    An unknown name is skipped with a log line; a tag with a bad number makes the whole
    activation fail (logged), so nothing is applied, which is what A1111 does.
    """
    raw = parse_lora_tags(prompt)
    if not raw:
        return [], None
    try:
        tags = [_tag(items, default_multiplier) for items in raw]
    except ValueError as exc:
        log.error("activating extra network lora with arguments %s: %s", raw, exc)
        return [], None
    found = [catalog.lookup(tag.mentioned) for tag in tags]
    if any(entry is None for entry in found):
        reread()
        found = [catalog.lookup(tag.mentioned) for tag in tags]
    missing = [tag.mentioned for tag, entry in zip(tags, found, strict=True) if entry is None]
    if missing:
        log.info("Lora not found: %s", ", ".join(missing))
    applied = [
        AppliedLora(entry, tag) for tag, entry in zip(tags, found, strict=True) if entry is not None
    ]
    hashes: dict[str, str] = {}
    for item in applied:
        alias = item.tag.mentioned.replace(":", "").replace(",", "")
        if alias:
            hashes[alias] = item.lora.shorthash
    text = ", ".join(f"{alias}: {short}" for alias, short in hashes.items())
    return applied, text or None
