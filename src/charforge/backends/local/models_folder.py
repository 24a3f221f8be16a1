"""The models folder of a local backend: its checkpoints (single files and diffusers folders)
found and matched by name, the weight files a checkpoint's hash covers, and the hash cache
(A1111's sha256, kept per path, size, mtime and ctime)."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from charforge.domain.checkpoints import find_checkpoint_named

log = logging.getLogger(__name__)

CHECKPOINT_SUFFIXES = (".safetensors", ".ckpt")
CACHE_FOLDER = ".charforge"  # in the models folder: hashes, generated configs
_SCAN_DEPTH = 4


class _Stopped(Exception):
    """The generate call was interrupted before it rendered (while hashing, waiting, loading)."""


@dataclass(frozen=True)
class LocalCheckpoint:
    name: str  # path relative to the models folder, with "/" separators
    path: Path

    @property
    def is_folder(self) -> bool:
        return self.path.is_dir()


def scan_models(models_dir: Path) -> list[LocalCheckpoint]:
    """Single files and diffusers folders under ``models_dir`` (hidden folders skipped)."""
    found: list[LocalCheckpoint] = []
    base_depth = len(models_dir.parts)
    for root, dirs, files in os.walk(models_dir, followlinks=True):
        here = Path(root)
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        if here != models_dir and "model_index.json" in files:
            found.append(LocalCheckpoint(here.relative_to(models_dir).as_posix(), here))
            dirs[:] = []  # its weights are parts of it, not checkpoints
            continue
        if len(here.parts) - base_depth >= _SCAN_DEPTH:
            dirs[:] = []
        for file in sorted(files):
            if file.lower().endswith(CHECKPOINT_SUFFIXES) and not file.startswith("."):
                path = here / file
                found.append(LocalCheckpoint(path.relative_to(models_dir).as_posix(), path))
    return sorted(found, key=lambda c: c.name.lower())


def match_checkpoint(name: str, available: list[LocalCheckpoint]) -> LocalCheckpoint | None:
    return find_checkpoint_named(name, available, lambda c: c.name)


def weight_files(checkpoint: LocalCheckpoint) -> list[Path]:
    """What the hash covers: the file itself, or a folder's UNet (transformer) weights."""
    if not checkpoint.is_folder:
        return [checkpoint.path]
    for component in ("unet", "transformer"):
        folder = checkpoint.path / component
        if folder.is_dir():
            files = sorted(
                p for p in folder.iterdir() if p.suffix in (".safetensors", ".bin") and p.is_file()
            )
            if files:
                return files
    return [checkpoint.path / "model_index.json"]


class HashCache:
    """sha256 of checkpoints, kept per (path, size, mtime, ctime) in memory and in a JSON file.

    The ctime (which no copy tool can set back) catches weights replaced by ones of the same
    size with the old mtime restored (``cp -p``, ``rsync -a``)."""

    def __init__(self, file: Callable[[], Path | None]) -> None:
        self._file = file
        self._lock = threading.Lock()
        self._entries: dict[str, dict[str, str]] | None = None

    @staticmethod
    def _stamp(files: list[Path]) -> str:
        parts = []
        for path in files:
            stat = path.stat()
            parts.append(f"{path.name}:{stat.st_size}:{stat.st_mtime_ns}:{stat.st_ctime_ns}")
        return "|".join(parts)

    def _load(self) -> dict[str, dict[str, str]]:
        if self._entries is None:
            self._entries = {}
            file = self._file()
            if file is not None and file.is_file():
                try:
                    data = json.loads(file.read_text("utf-8"))
                    if isinstance(data, dict):
                        self._entries = {
                            k: v for k, v in data.items() if isinstance(v, dict) and "sha256" in v
                        }
                except (OSError, ValueError):
                    log.warning("ignoring unreadable hash cache %s", file)
        return self._entries

    def cached(self, checkpoint: LocalCheckpoint) -> str | None:
        """The sha256 if known for the checkpoint as it is now; never reads the weights."""
        try:
            stamp = self._stamp(weight_files(checkpoint))
        except OSError:
            return None
        with self._lock:
            entry = self._load().get(str(checkpoint.path))
        return entry["sha256"] if entry and entry.get("stamp") == stamp else None

    def sha256(
        self, checkpoint: LocalCheckpoint, *, stopped: Callable[[], bool] | None = None
    ) -> str:
        """The sha256, from the cache while the files are unchanged; reading them otherwise,
        which raises _Stopped as soon as ``stopped()`` says so."""
        known = self.cached(checkpoint)
        if known is not None:
            return known
        files = weight_files(checkpoint)
        stamp = self._stamp(files)
        digest = hashlib.sha256()
        for path in files:
            with path.open("rb") as handle:
                while chunk := handle.read(8 * 1024 * 1024):
                    if stopped is not None and stopped():
                        raise _Stopped()
                    digest.update(chunk)
        value = digest.hexdigest()
        with self._lock:
            entries = self._load()
            entries[str(checkpoint.path)] = {"stamp": stamp, "sha256": value}
            self._save(entries)
        return value

    def _save(self, entries: dict[str, dict[str, str]]) -> None:
        file = self._file()
        if file is None:
            return
        try:
            file.parent.mkdir(parents=True, exist_ok=True)
            temp = file.with_name(f".{file.name}.{os.getpid()}.{threading.get_ident()}")
            temp.write_text(json.dumps(entries, indent=1, sort_keys=True), encoding="utf-8")
            temp.replace(file)
        except OSError as exc:
            log.warning("could not write the hash cache %s: %s", file, exc)


def short_hash(sha256: str | None) -> str | None:
    return sha256[:10] if sha256 else None
