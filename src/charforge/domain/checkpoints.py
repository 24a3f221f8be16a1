"""Checkpoint names as A1111 writes them: ``anime/diving.safetensors [a1b2c3d4e5]``."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from typing import TypeVar

_HASH_SUFFIX = re.compile(r"\s*\[[0-9a-fA-F]{8,64}\]\s*$")
_EXTENSIONS = (".safetensors", ".ckpt", ".pt", ".pth", ".bin", ".gguf", ".sft")


def strip_hash(title: str) -> str:
    """``diving.safetensors [a1b2c3d4e5]`` -> ``diving.safetensors``."""
    return _HASH_SUFFIX.sub("", title).strip()


def model_name(name: str) -> str:
    """A1111's ``model_name``: path separators become ``_``, the extension goes."""
    base = strip_hash(name).replace("/", "_").replace("\\", "_")
    lowered = base.lower()
    for ext in _EXTENSIONS:
        if lowered.endswith(ext):
            return base[: -len(ext)]
    return base


def file_stem(name: str) -> str:
    """What A1111 reports as ``info.sd_model_name`` and writes as ``Model:``: the file's base
    name without folder or extension (``anime/diving.safetensors`` -> ``diving``)."""
    return model_name(strip_hash(name).replace("\\", "/").rsplit("/", 1)[-1])


def same_checkpoint(a: str, b: str) -> bool:
    return model_name(a) == model_name(b)


def ran_checkpoint(expected: str, reported: str) -> bool:
    """Whether a backend's report of the model that ran names ``expected``. Reports carry no
    folder, so only the base name can be compared; the hash check covers same-named files."""
    return same_checkpoint(expected, reported) or file_stem(expected) == file_stem(reported)


def same_hash(a: str, b: str) -> bool:
    """A 10-hex short hash matches the sha256 it was cut from."""
    a, b = a.lower(), b.lower()
    return a.startswith(b) or b.startswith(a)


T = TypeVar("T")


def find_checkpoint_named(
    name: str, available: Iterable[T], name_of: Callable[[T], str]
) -> T | None:
    """``name`` among a backend's checkpoints: the exact name first, then A1111's model name
    (``sd15/x.safetensors`` is ``sd15_x``), then the base name alone, since ComfyUI and model
    folders keep checkpoints in subfolders a route's config need not repeat."""
    items = list(available)
    wanted = strip_hash(name)
    rules: list[Callable[[str], bool]] = [
        lambda n: strip_hash(n) == wanted,
        lambda n: same_checkpoint(n, wanted),
        lambda n: file_stem(n) == file_stem(wanted),
    ]
    for rule in rules:
        for item in items:
            if rule(name_of(item)):
                return item
    return None
