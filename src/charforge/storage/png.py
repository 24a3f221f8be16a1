"""PNG in and out: validate a backend's bytes and embed A1111's ``parameters`` infotext.

A PNG from the backend keeps its pixels byte for byte: the infotext chunk is spliced in
front of the image data instead of re-encoding (which cost more than the rest of a request).
Other formats (A1111 can be set to send JPEG or WebP) are converted to PNG.

A backend's image is checked on its header before any pixel is decoded: an image larger than
the size asked (a decompression bomb claims 50000x50000 in a few hundred bytes) is refused
without allocating it.
"""

from __future__ import annotations

import io
import struct
import zlib
from collections.abc import Callable
from dataclasses import dataclass

from PIL import Image, PngImagePlugin, UnidentifiedImageError

INFOTEXT_KEY = "parameters"  # the text chunk A1111 writes and its PNG Info tab reads
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_TEXT_CHUNKS = {b"tEXt", b"iTXt", b"zTXt"}


@dataclass(frozen=True)
class DecodedImage:
    png: bytes
    width: int
    height: int
    # A small RGB copy made while the pixels are decoded anyway (output screening), if asked.
    preview: Image.Image | None = None


# Backends round a size to a multiple of 8 (latent space), up as well as down.
SIZE_SLACK = 8
_FORMATS = ("PNG", "JPEG", "WEBP")  # what a backend sends; other decoders are never reached


class NotAnImage(ValueError):
    """The bytes are not a readable image."""


class LargerThanAsked(NotAnImage):
    """The image's header claims more pixels than were asked for; it was not decoded."""

    def __init__(self, size: tuple[int, int], asked: tuple[int, int]) -> None:
        super().__init__(
            f"{size[0]}x{size[1]} where at most {asked[0]}x{asked[1]} was asked; it was not decoded"
        )
        self.size = size
        self.asked = asked


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def _itxt(key: str, text: str) -> bytes:
    # keyword, NUL, compression flag 0, method 0, empty language tag + NUL, empty translation + NUL
    return _chunk(b"iTXt", key.encode("latin-1") + b"\0\0\0\0\0" + text.encode("utf-8"))


def _splice_png(data: bytes, infotext: str) -> bytes:
    """Replace any ``parameters`` text chunk with ours, placed before the first IDAT."""
    out = [PNG_SIGNATURE]
    offset = len(PNG_SIGNATURE)
    inserted = False
    while offset + 8 <= len(data):
        (length,) = struct.unpack(">I", data[offset : offset + 4])
        kind = data[offset + 4 : offset + 8]
        end = offset + 12 + length
        if end > len(data):
            raise NotAnImage("truncated PNG chunk")
        chunk = data[offset:end]
        keyword = data[offset + 8 : offset + 8 + length].split(b"\0", 1)[0]
        if kind == b"IDAT" and not inserted:
            out.append(_itxt(INFOTEXT_KEY, infotext))
            inserted = True
        if not (kind in _TEXT_CHUNKS and keyword == INFOTEXT_KEY.encode()):
            out.append(chunk)
        offset = end
        if kind == b"IEND":
            break
    if not inserted:
        raise NotAnImage("PNG without image data")
    return b"".join(out)


def embed_infotext(
    data: bytes,
    infotext: str,
    *,
    asked: tuple[int, int] | None = None,
    preview: Callable[[Image.Image], Image.Image] | None = None,
) -> DecodedImage:
    """Decode fully (a truncated or corrupt file fails here, not later); return PNG + infotext.
    ``asked`` (width, height) bounds the size read from the header, before decoding;
    ``preview`` makes a small copy from the decoded pixels."""
    try:
        with Image.open(io.BytesIO(data), formats=_FORMATS) as img:
            if asked is not None and (
                img.width > asked[0] + SIZE_SLACK or img.height > asked[1] + SIZE_SLACK
            ):
                raise LargerThanAsked(img.size, asked)
            img.load()
            width, height, fmt = img.width, img.height, img.format
            small = preview(img) if preview is not None else None
            if fmt == "PNG":
                return DecodedImage(_splice_png(data, infotext), width, height, small)
            info = PngImagePlugin.PngInfo()
            info.add_itxt(INFOTEXT_KEY, infotext)
            out = io.BytesIO()
            img.save(out, format="PNG", pnginfo=info)
            return DecodedImage(out.getvalue(), width, height, small)
    except NotAnImage:
        raise
    except (
        UnidentifiedImageError,
        OSError,
        SyntaxError,
        struct.error,
        ValueError,  # a text chunk that inflates past Pillow's limit
        Image.DecompressionBombError,
        Image.DecompressionBombWarning,  # raised where warnings are errors
    ) as exc:
        raise NotAnImage(str(exc) or "undecodable image") from exc


def read_infotext(data: bytes) -> str | None:
    with Image.open(io.BytesIO(data)) as img:
        text = img.info.get(INFOTEXT_KEY)
        return text if isinstance(text, str) else None
