"""The placeholder picture the simulator returns instead of running a model."""

from __future__ import annotations

import functools
import hashlib
import io
from dataclasses import dataclass

from PIL import Image, ImageDraw, ImageFont, ImageOps, UnidentifiedImageError
from PIL.PngImagePlugin import PngInfo

Font = ImageFont.FreeTypeFont | ImageFont.ImageFont

SIMULATED_LABEL = "SIMULATED - not a real generation"


@dataclass(frozen=True)
class Placeholder:
    """What to write on the placeholder."""

    width: int
    height: int
    seed: int
    checkpoint: str
    sampler: str
    steps: int
    cfg_scale: float
    prompt: str
    first_pass: tuple[int, int] | None = None
    """The first-pass size when hires fix made the picture larger."""
    loras: tuple[str, ...] = ()
    """The LoRAs that changed the picture (``name:te:unet``); they change its colour too."""
    stopped_at: tuple[int, int] | None = None
    """``(step, steps)`` when an interrupt or skip cut sampling short: a half-made picture."""


def seed_colour(seed: int, salt: str = "") -> tuple[int, int, int]:
    """A stable, mid-dark background colour for ``seed`` (white text stays readable).

    ``salt`` (e.g. the LoRAs applied) shifts it, so that the same seed renders differently.
    """
    key = f"{seed}|{salt}" if salt else str(seed)
    digest = hashlib.blake2b(key.encode(), digest_size=3).digest()
    return (40 + digest[0] % 150, 40 + digest[1] % 150, 40 + digest[2] % 150)


@functools.lru_cache(maxsize=32)
def _font(size: int) -> Font:
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError):  # Pillow without FreeType: fixed-size bitmap font
        return ImageFont.load_default()


def _text_width(font: Font, text: str) -> float:
    return font.getlength(text)


def _fit(text: str, font: Font, max_width: float) -> str:
    """Cut ``text`` with an ellipsis so that it fits ``max_width`` pixels."""
    if _text_width(font, text) <= max_width:
        return text
    while text and _text_width(font, text + "…") > max_width:
        text = text[:-1]
    return text + "…"


def _wrap(text: str, font: Font, max_width: float, max_lines: int) -> list[str]:
    """Greedy word wrap to ``max_width`` pixels, at most ``max_lines`` lines ("…" when cut).

    Word widths are measured once and summed (kerning ignored) to keep this cheap.
    """
    space = _text_width(font, " ")
    lines: list[str] = []
    current: list[str] = []
    used = 0.0
    for word in text[:1500].split():
        width = _text_width(font, word)
        if current and used + space + width > max_width:
            lines.append(" ".join(current))
            if len(lines) == max_lines:
                lines[-1] = _fit(lines[-1] + " …", font, max_width)
                return lines
            current, used = [], 0.0
        used += width + (space if current else 0.0)
        current.append(word)
    if current:
        lines.append(" ".join(current))
    return [_fit(line, font, max_width) for line in lines]


def render_placeholder(spec: Placeholder) -> Image.Image:
    """Draw the placeholder: seed-coloured background, labelled, with the settings written on it."""
    width, height = max(spec.width, 8), max(spec.height, 8)
    background = seed_colour(spec.seed, "|".join(spec.loras))
    image = Image.new("RGB", (width, height), background)
    draw = ImageDraw.Draw(image)

    short_side = min(width, height)
    margin = max(short_side // 24, 4)
    border = max(short_side // 96, 2)
    draw.rectangle((0, 0, width - 1, height - 1), outline=(255, 255, 255), width=border)

    title = _font(max(short_side // 20, 10))
    body = _font(max(short_side // 34, 9))
    banner = _font(max(short_side // 30, 9))

    banner_height = max(short_side // 14, 14)
    draw.rectangle((border, border, width - border - 1, banner_height), fill=(200, 30, 30))
    draw.text(
        (margin, border + banner_height // 6), SIMULATED_LABEL, fill=(255, 255, 255), font=banner
    )

    size = f"{width}x{height}"
    if spec.first_pass is not None:
        size += f" (hires from {spec.first_pass[0]}x{spec.first_pass[1]})"
    lines: list[tuple[str, Font]] = [
        (spec.checkpoint, title),
        (f"seed {spec.seed}", title),
        (size, body),
        (f"{spec.sampler} · {spec.steps} steps · CFG {spec.cfg_scale:g}", body),
    ]
    if spec.loras:
        lines.append(("LoRA " + ", ".join(spec.loras), body))
    if spec.stopped_at is not None:
        lines.append((f"STOPPED at step {spec.stopped_at[0]}/{spec.stopped_at[1]}", body))
    lines.append(("", body))
    usable = width - 2 * margin
    lines += [(line, body) for line in _wrap(spec.prompt, body, usable, max_lines=8)]

    y = banner_height + margin
    for text, font in lines:
        line_height = int(getattr(font, "size", 11) * 1.3)
        if y + line_height > height - margin:
            break
        if text:
            draw.text((margin, y), _fit(text, font, usable), fill=(255, 255, 255), font=font)
        y += line_height
    if spec.stopped_at is not None:
        _draw_stopped_bar(draw, width, height, border, spec.stopped_at)
    return image


def _draw_stopped_bar(
    draw: ImageDraw.ImageDraw, width: int, height: int, border: int, stopped: tuple[int, int]
) -> None:
    """A bar along the bottom edge showing how far sampling got (black = not done)."""
    bar = max(min(width, height) // 16, 3)
    top = max(height - border - bar, 0)
    draw.rectangle((0, top, width - 1, height - 1), fill=(0, 0, 0))
    step, steps = stopped
    done = int((width - 1) * step / steps) if steps > 0 else 0
    if done > 0:
        draw.rectangle((0, top, done, height - 1), fill=(255, 150, 0))


def png_bytes(image: Image.Image, parameters: str | None) -> bytes:
    """Encode as PNG with A1111's ``parameters`` text chunk (tEXt, or iTXt when not Latin-1)."""
    info = None
    if parameters is not None:
        info = PngInfo()
        info.add_text("parameters", parameters)
    out = io.BytesIO()
    image.save(out, format="PNG", pnginfo=info, compress_level=1)
    return out.getvalue()


def photo_picture(data: bytes, width: int, height: int) -> Image.Image:
    """An encoded picture (``SimulatorSettings.photo_outputs``) scaled to cover
    ``width`` x ``height`` and centre-cropped to it; ValueError when it does not decode."""
    try:
        opened = Image.open(io.BytesIO(data))
        opened.load()
    except (UnidentifiedImageError, OSError) as exc:
        raise ValueError(f"not a picture: {exc}") from exc
    picture = ImageOps.exif_transpose(opened).convert("RGB")
    return ImageOps.fit(picture, (max(width, 8), max(height, 8)), Image.Resampling.LANCZOS)
