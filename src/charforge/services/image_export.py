"""A character's images as one ZIP, written while it is sent: every PNG (its infotext chunk
included) and a metadata.json listing each image's parameters. Memory stays bounded whatever
the number of images: files are copied in blocks, rows read a page at a time, and the
metadata is spooled to a temporary file until the images are all in."""

from __future__ import annotations

import json
import re
import tempfile
import zipfile
from collections.abc import Iterator
from datetime import datetime
from typing import IO, Any

from pydantic.alias_generators import to_camel

from charforge.db import images as image_rows
from charforge.db.engine import Database
from charforge.db.images import Filters
from charforge.db.models import Image
from charforge.errors import NotFound
from charforge.storage.files import ImageStore

_ROWS_PER_PAGE = 100
_BLOCK = 256 * 1024
_SPOOL_IN_MEMORY = 1024 * 1024


class _Sink:
    """Where zipfile writes; the generator hands on what piled up after each block. It has
    no seek or tell, so zipfile writes a streamable archive (data descriptors)."""

    def __init__(self) -> None:
        self._chunks: list[bytes] = []

    def write(self, data: bytes) -> int:
        self._chunks.append(bytes(data))
        return len(data)

    def flush(self) -> None:
        pass

    def close(self) -> None:
        pass

    def take(self) -> bytes:
        data = b"".join(self._chunks)
        self._chunks.clear()
        return data


def file_name(character_name: str) -> str:
    """``Sakura-images.zip``: letters, digits, ``-`` and ``_`` only, safe in any header."""
    stem = re.sub(r"[^A-Za-z0-9_-]+", "-", character_name).strip("-")[:60] or "character"
    return f"{stem}-images.zip"


def zip_stream(
    db: Database, store: ImageStore, owner_id: int, character: tuple[str, str]
) -> Iterator[bytes]:
    """``character``: (id, name), checked as the owner's before the stream starts. Newest
    first as in the history: ``0001-<seed>.png`` is the newest image."""
    character_id, name = character
    with db.session() as session:
        total = image_rows.count_shown(session, owner_id, character_id)
    width = max(4, len(str(total)))
    sink = _Sink()
    with (
        tempfile.SpooledTemporaryFile(max_size=_SPOOL_IN_MEMORY) as meta,
        zipfile.ZipFile(sink, "w", compression=zipfile.ZIP_STORED) as archive,
    ):
        head = {"character": {"id": character_id, "name": name}}
        meta.write(json.dumps(head, ensure_ascii=False)[:-1].encode() + b', "images": [')
        number = 0
        for image in _images(db, owner_id, character_id):
            try:
                source = store.existing(image.file_path).open("rb")
            except (NotFound, OSError):
                continue  # deleted while the archive was being written
            number += 1
            entry = f"{number:0{width}d}-{image.seed}.png"
            with source, archive.open(_info(entry, image.created_at), "w") as out:
                while block := source.read(_BLOCK):
                    out.write(block)
                    yield sink.take()
            separator = b"\n  " if number == 1 else b",\n  "
            meta.write(separator + json.dumps(_metadata(image, entry), ensure_ascii=False).encode())
        meta.write(b"\n]}\n")
        meta.seek(0)
        _copy(meta, archive, "metadata.json")
        yield sink.take()
    yield sink.take()  # the central directory, written when the archive closes


def _images(db: Database, owner_id: int, character_id: str) -> Iterator[Image]:
    """The character's shown images, newest first, a short session per page (a download may
    take minutes; it must not hold a database connection or snapshot that long)."""
    after: tuple[datetime, str] | None = None
    while True:
        with db.session() as session:
            rows = image_rows.gallery_page(
                session, owner_id, Filters(character_id=character_id), _ROWS_PER_PAGE, after
            )
        yield from rows
        if len(rows) < _ROWS_PER_PAGE:
            return
        after = (rows[-1].created_at, rows[-1].id)


def _info(entry: str, created_at: datetime) -> zipfile.ZipInfo:
    info = zipfile.ZipInfo(entry, date_time=created_at.timetuple()[:6])
    info.compress_type = zipfile.ZIP_STORED  # PNGs are compressed already
    return info


def _copy(source: IO[bytes], archive: zipfile.ZipFile, entry: str) -> None:
    info = zipfile.ZipInfo(entry, date_time=datetime.now().timetuple()[:6])
    info.compress_type = zipfile.ZIP_DEFLATED
    with archive.open(info, "w") as out:
        while block := source.read(_BLOCK):
            out.write(block)


def _metadata(image: Image, entry: str) -> dict[str, Any]:
    return {
        "id": image.id,
        "file": entry,
        "prompt": image.prompt,
        "negativePrompt": image.negative_prompt,
        "parameters": {to_camel(k): v for k, v in image.params.items()},
        "seed": image.seed,
        "width": image.width,
        "height": image.height,
        "artStyle": image.art_style,
        "model": image.checkpoint,
        "modelHash": image.checkpoint_hash,
        "createdAt": image.created_at.isoformat(timespec="milliseconds") + "Z",
        "favorite": image.favorite,
        "note": image.note,
        "consistency": image.consistency,
        "infotext": image.infotext,
    }
