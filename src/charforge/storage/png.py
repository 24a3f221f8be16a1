"""PNG in and out: validate a backend's bytes and embed A1111's ``parameters`` infotext."""

from __future__ import annotations

import io
from dataclasses import dataclass

from PIL import Image, PngImagePlugin, UnidentifiedImageError

INFOTEXT_KEY = "parameters"  # the text chunk A1111 writes and its PNG Info tab reads


@dataclass(frozen=True)
class DecodedImage:
    png: bytes
    width: int
    height: int


class NotAnImage(ValueError):
    """The bytes are not a readable image."""


def embed_infotext(data: bytes, infotext: str) -> DecodedImage:
    """Decode fully (a truncated file fails here, not later), re-encode as PNG with infotext."""
    try:
        with Image.open(io.BytesIO(data)) as img:
            img.load()
            info = PngImagePlugin.PngInfo()
            info.add_itxt(INFOTEXT_KEY, infotext)
            out = io.BytesIO()
            img.save(out, format="PNG", pnginfo=info)
            return DecodedImage(out.getvalue(), img.width, img.height)
    except (UnidentifiedImageError, OSError, SyntaxError) as exc:
        raise NotAnImage(str(exc) or "undecodable image") from exc


def read_infotext(data: bytes) -> str | None:
    with Image.open(io.BytesIO(data)) as img:
        text = img.info.get(INFOTEXT_KEY)
        return text if isinstance(text, str) else None
