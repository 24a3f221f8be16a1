"""Image files on local disk. A row never points at a missing file: the file is written
(temp file, fsync, rename) before the row that names it is committed."""

from __future__ import annotations

import contextvars
import io
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from PIL import Image

from charforge.errors import NotFound

THUMB_SIZE = (320, 480)
# Files saved inside an undo_on_failure block of this thread or task.
_saved_in_block: contextvars.ContextVar[list[str] | None] = contextvars.ContextVar(
    "saved_in_block", default=None
)


class ImageStore:
    def __init__(self, root: Path) -> None:
        self.root = root.resolve()

    @staticmethod
    def relative_path(owner_id: int, character_id: str, image_id: str) -> str:
        return f"images/{owner_id}/{character_id}/{image_id}.png"

    @staticmethod
    def reference_path(owner_id: int, character_id: str, reference_id: str) -> str:
        return f"references/{owner_id}/{character_id}/{reference_id}.png"

    def path(self, relative: str) -> Path:
        full = (self.root / relative).resolve()
        if not full.is_relative_to(self.root):
            raise ValueError(f"refusing a path outside the data dir: {relative}")
        return full

    def existing(self, relative: str) -> Path:
        """The file of a stored image; NotFound (not a 500) if it vanished from disk."""
        path = self.path(relative)
        if not path.is_file():
            raise NotFound(
                "The image's file is missing from the data dir.",
                hint="It was removed outside charforge (delete the image or restore the file), "
                "or, in distributed mode, the worker that made it wrote it to a "
                "CHARFORGE_DATA_DIR this server does not see: mount one shared folder at that "
                "path on every server and worker.",
            )
        return path

    def save(self, relative: str, data: bytes) -> Path:
        target = self.path(relative)
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=".tmp-", suffix=target.suffix)
        try:
            with os.fdopen(fd, "wb") as handle:
                handle.write(data)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(tmp, target)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        saved = _saved_in_block.get()
        if saved is not None:
            saved.append(relative)
        return target

    @contextmanager
    def undo_on_failure(self) -> Iterator[None]:
        """Files saved inside the block are removed again if it fails: wrap the transaction
        that commits their rows, so a file never outlives a row that did not land."""
        saved: list[str] = []
        token = _saved_in_block.set(saved)
        try:
            yield
        except BaseException:
            for relative in saved:
                self.delete(relative)
            raise
        finally:
            _saved_in_block.reset(token)

    def delete(self, relative: str) -> None:
        self.path(relative).unlink(missing_ok=True)
        self.path(self._thumb_relative(relative)).unlink(missing_ok=True)

    @staticmethod
    def _thumb_relative(relative: str) -> str:
        return "thumbs/" + relative.removeprefix("images/").removesuffix(".png") + ".webp"

    def thumbnail(self, relative: str) -> Path:
        """A small WebP made on the server once, so pages never ship the full PNG to scale."""
        thumb = self.path(self._thumb_relative(relative))
        if not thumb.exists():
            with Image.open(self.existing(relative)) as img:
                img.thumbnail(THUMB_SIZE)
                out = io.BytesIO()
                img.convert("RGB").save(out, format="WEBP", quality=82)
            self.save(self._thumb_relative(relative), out.getvalue())
        return thumb
