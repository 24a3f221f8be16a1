"""Accept a picture as a character's reference: checked from its header before any decode,
then decoded once, turned upright, stripped of its metadata (EXIF, text chunks) and stored as PNG.

The header check comes first so that a decompression bomb (a small file that claims a huge
canvas) is refused with a 422 and never reaches memory.
"""

from __future__ import annotations

import hashlib
import io
import warnings
from dataclasses import dataclass

from PIL import Image, ImageOps, UnidentifiedImageError

from charforge.errors import InvalidInput

MAX_BYTES = 10 * 1024 * 1024
MAX_SIDE = 4096
MAX_PIXELS = 16_000_000
FORMATS = {"PNG": "PNG", "JPEG": "JPEG", "WEBP": "WebP"}
_SIGNATURES = (b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff", b"RIFF")


@dataclass(frozen=True)
class AcceptedImage:
    png: bytes
    width: int
    height: int
    sha256: str  # of the stored PNG: the same picture uploaded twice is found by it


def _refuse(
    message: str, hint: str, *, field: str = "file", limit: str | None = None
) -> InvalidInput:
    return InvalidInput(message, field=field, hint=hint, extra={"limit": limit} if limit else None)


def accept_image(data: bytes, *, field: str = "file") -> AcceptedImage:
    """The upload as a clean PNG; InvalidInput naming the limit it breaks."""
    if len(data) > MAX_BYTES:
        raise _refuse(
            f"The file is {len(data) / 1e6:.1f} MB; a reference image may be at most "
            f"{MAX_BYTES // (1024 * 1024)} MB.",
            "Send a smaller PNG, JPEG or WebP (a face needs no more than 1024 px a side).",
            field=field,
            limit=f"{MAX_BYTES} bytes",
        )
    if not data:
        raise _refuse("The file is empty.", "Send a PNG, JPEG or WebP picture.", field=field)
    if not data.startswith(_SIGNATURES):
        raise _refuse(
            "The file is not a PNG, JPEG or WebP picture.",
            "Reference images must be PNG, JPEG or WebP.",
            field=field,
            limit="formats PNG, JPEG, WebP",
        )
    with warnings.catch_warnings():
        # Pillow warns (and raises beyond twice its limit) on huge canvases; our own limits,
        # checked below from the header alone, come first and say which one was broken.
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            img = Image.open(io.BytesIO(data))  # lazy: reads the header only
        except (UnidentifiedImageError, Image.DecompressionBombError, OSError, ValueError) as exc:
            raise _refuse(
                f"The file cannot be read as a picture ({type(exc).__name__}).",
                "Send a PNG, JPEG or WebP picture that opens in an image viewer.",
                field=field,
            ) from exc
        with img:
            if img.format not in FORMATS:
                raise _refuse(
                    f"The picture is {img.format}; reference images must be PNG, JPEG or WebP.",
                    "Convert it to PNG, JPEG or WebP.",
                    field=field,
                    limit="formats PNG, JPEG, WebP",
                )
            width, height = img.size
            _check_size(width, height, field)
            try:
                img.load()
                upright = ImageOps.exif_transpose(img)
                pixels = upright.convert("RGBA" if "A" in upright.getbands() else "RGB")
            except (OSError, ValueError, Image.DecompressionBombError, SyntaxError) as exc:
                raise _refuse(
                    f"The picture is damaged and cannot be decoded ({exc}).",
                    "Export it again from an image editor and upload that.",
                    field=field,
                ) from exc
    out = io.BytesIO()
    pixels.save(out, format="PNG")  # no pnginfo, no exif: nothing of the original's metadata
    png = out.getvalue()
    return AcceptedImage(png, pixels.width, pixels.height, hashlib.sha256(png).hexdigest())


def _check_size(width: int, height: int, field: str) -> None:
    if width > MAX_SIDE or height > MAX_SIDE:
        raise _refuse(
            f"The picture is {width}x{height}; a reference image may be at most {MAX_SIDE} px "
            "a side.",
            f"Scale it down to at most {MAX_SIDE}x{MAX_SIDE}.",
            field=field,
            limit=f"{MAX_SIDE} px a side",
        )
    if width * height > MAX_PIXELS:
        raise _refuse(
            f"The picture has {width * height / 1e6:.1f} MP; a reference image may have at most "
            f"{MAX_PIXELS / 1e6:.0f} MP.",
            f"Scale it down below {MAX_PIXELS / 1e6:.0f} megapixels.",
            field=field,
            limit=f"{MAX_PIXELS} pixels",
        )
    if width < 1 or height < 1:
        raise _refuse("The picture has no pixels.", "Send a real picture.", field=field)
