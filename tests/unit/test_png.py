"""Infotext embedding keeps the pixels and replaces an existing parameters chunk."""

from __future__ import annotations

import io

import pytest
from PIL import Image, PngImagePlugin

from charforge.storage.png import NotAnImage, embed_infotext, read_infotext


def _png(fmt: str = "PNG", text: str | None = "old infotext") -> bytes:
    img = Image.new("RGB", (64, 48), (10, 200, 30))
    img.putpixel((5, 5), (255, 0, 0))
    out = io.BytesIO()
    if fmt == "PNG" and text is not None:
        info = PngImagePlugin.PngInfo()
        info.add_text("parameters", text)
        info.add_text("Software", "webui")
        img.save(out, format=fmt, pnginfo=info)
    else:
        img.save(out, format=fmt)
    return out.getvalue()


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP"])
def test_embedding_gives_a_png_with_one_infotext(fmt: str) -> None:
    source = _png(fmt)
    result = embed_infotext(source, "Sakura, ballroom\nSteps: 25, Seed: 7")
    assert (result.width, result.height) == (64, 48)
    assert read_infotext(result.png) == "Sakura, ballroom\nSteps: 25, Seed: 7"
    assert result.png.count(b"parameters") == 1
    with Image.open(io.BytesIO(result.png)) as img:
        assert img.format == "PNG"
        img.load()
        if fmt == "PNG":
            assert img.getpixel((5, 5)) == (255, 0, 0)
            assert img.info["Software"] == "webui"


def test_unicode_infotext_survives() -> None:
    result = embed_infotext(_png(text=None), "桜 in a kimono 🌸")
    assert read_infotext(result.png) == "桜 in a kimono 🌸"


@pytest.mark.parametrize("data", [b"not an image", _png()[:200], b""])
def test_broken_bytes_are_refused(data: bytes) -> None:
    with pytest.raises(NotAnImage):
        embed_infotext(data, "x")
