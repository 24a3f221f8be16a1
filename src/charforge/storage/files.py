"""Image files on local disk. A row never points at a missing file: the file is written
(temp file, fsync, rename) before the row that names it is committed."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


class ImageStore:
    def __init__(self, root: Path) -> None:
        self.root = root.resolve()

    @staticmethod
    def relative_path(owner_id: int, character_id: str, image_id: str) -> str:
        return f"images/{owner_id}/{character_id}/{image_id}.png"

    def path(self, relative: str) -> Path:
        full = (self.root / relative).resolve()
        if not full.is_relative_to(self.root):
            raise ValueError(f"refusing a path outside the data dir: {relative}")
        return full

    def save(self, relative: str, data: bytes) -> Path:
        target = self.path(relative)
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=".tmp-", suffix=".png")
        try:
            with os.fdopen(fd, "wb") as handle:
                handle.write(data)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(tmp, target)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return target

    def delete(self, relative: str) -> None:
        self.path(relative).unlink(missing_ok=True)
