"""SillyTavern character cards (V1, V2, V3) in and out, as PNG or JSON.

What SillyTavern does, and this module mirrors (src/character-card-parser.js,
src/endpoints/characters.js in SillyTavern/SillyTavern):

- A PNG card carries base64 of UTF-8 JSON in a tEXt chunk: ``chara`` (V2) and/or ``ccv3`` (V3).
  Readers take ``ccv3`` first, then ``chara``; keywords compare lower-cased.
- On export it drops old ``chara``/``ccv3`` chunks and writes both: ``chara`` with the card as is
  under spec ``chara_card_v2``/``2.0`` and ``ccv3`` with the same object under ``chara_card_v3``/
  ``3.0`` (JSON.stringify: compact, non-ASCII kept as UTF-8).
- A card without ``spec`` is V1 (flat fields, or Pygmalion's ``char_name`` ones); it is lifted
  into V2 with the flat fields kept beside ``data``, as SillyTavern keeps them.
- The Stable Diffusion extension shares a character's prompt as
  ``data.extensions.sd_character_prompt = {"positive": str, "negative": str}``; ``null`` there
  means "not shared".
"""

from __future__ import annotations

import base64
import binascii
import copy
import io
import json
import struct
import warnings
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from PIL import Image, PngImagePlugin, UnidentifiedImageError

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
MAX_SIDE = 4096
MAX_PIXELS = 16_000_000
CARD_KEYWORDS = ("ccv3", "chara")  # in order of preference
SD_PROMPT_KEY = "sd_character_prompt"
CHARFORGE_KEY = "charforge"

_PNG_MODES = {"1", "L", "LA", "I;16", "I;16B", "P", "RGB", "RGBA"}  # Pillow writes these as is
# The empty V2 card SillyTavern's charaFormatData builds (group_only_greetings is V3's, ST adds it).
_V2_DEFAULTS: dict[str, Any] = {
    "name": "",
    "description": "",
    "personality": "",
    "scenario": "",
    "first_mes": "",
    "mes_example": "",
    "creator_notes": "",
    "system_prompt": "",
    "post_history_instructions": "",
    "alternate_greetings": [],
    "tags": [],
    "creator": "",
    "character_version": "",
    "extensions": {},
    "group_only_greetings": [],
}
# V1 field -> V2 data field; the second names are Pygmalion/Gradio's, which ST also imports.
_V1_FIELDS = {
    "name": ("name", "char_name"),
    "description": ("description", "char_persona"),
    "personality": ("personality",),
    "scenario": ("scenario", "world_scenario"),
    "first_mes": ("first_mes", "char_greeting"),
    "mes_example": ("mes_example", "example_dialogue"),
    "creator_notes": ("creator_notes", "creatorcomment"),
    "system_prompt": ("system_prompt",),
    "post_history_instructions": ("post_history_instructions",),
    "creator": ("creator",),
    "character_version": ("character_version",),
}


class CardError(ValueError):
    """The bytes are not a usable character card; the message says why and what to do."""


@dataclass
class ParsedCard:
    card: dict[str, Any]
    name: str
    description: str
    positive: str
    negative: str
    picture: bytes | None
    charforge: dict[str, Any]


def parse_card(data: bytes, *, max_json_bytes: int = 2_000_000) -> ParsedCard:
    """Read a PNG card (sniffed by its signature) or card JSON (UTF-8, BOM tolerated)."""
    if data.startswith(PNG_SIGNATURE):
        raw, source = _card_json_from_png(data, max_json_bytes)
        picture: bytes | None = data
    else:
        if len(data) > max_json_bytes:
            raise CardError(
                f"The card JSON is {len(data)} bytes; the limit is {max_json_bytes}. "
                "Remove embedded assets or lorebook entries and export it again."
            )
        if not data.lstrip(b"\xef\xbb\xbf \t\r\n").startswith(b"{"):
            raise CardError(
                "The file is neither a PNG nor JSON: upload the card as a PNG (with its 'chara' "
                "or 'ccv3' text chunk) or as a .json file."
            )
        raw, source, picture = data, "JSON", None
    card = _normalise(_load_json(raw, source))
    fields = card["data"]
    name = fields.get("name")
    if not isinstance(name, str) or not name.strip():
        raise CardError(
            "The card has no name (data.name is missing or empty). Give the character a name "
            "in the card editor and export it again."
        )
    description = fields.get("description")
    description = "" if description is None else description
    if not isinstance(description, str):
        raise CardError(f"The card's data.description is {_kind(description)}, not text.")
    extensions = fields.get("extensions", {})
    if not isinstance(extensions, dict):
        raise CardError(f"The card's data.extensions is {_kind(extensions)}, not an object.")
    if picture is not None:
        _check_pixels(picture)
    sd = extensions.get(SD_PROMPT_KEY)
    sd = sd if isinstance(sd, dict) else {}
    charforge = extensions.get(CHARFORGE_KEY)
    return ParsedCard(
        card=card,
        name=name,
        description=description,
        positive=_text(sd.get("positive")),
        negative=_text(sd.get("negative")),
        picture=picture,
        charforge=charforge if isinstance(charforge, dict) else {},
    )


def export_card(
    card: dict[str, Any],
    *,
    picture_png: bytes,
    charforge: dict[str, Any],
    name: str,
    description: str,
    positive: str,
    negative: str,
) -> bytes:
    """The picture as a PNG card with ``chara`` (V2) and ``ccv3`` (V3) chunks.

    Only name, description, the SD prompt and charforge's extension change; every other field,
    known or not, is written back as it came.
    """
    if not name.strip():
        raise CardError("The card has no name: give the character a name before exporting it.")
    if card:
        out = _normalise(copy.deepcopy(card))
    else:
        out = {"spec": "chara_card_v2", "spec_version": "2.0", "data": copy.deepcopy(_V2_DEFAULTS)}
    fields = out["data"]
    fields["name"] = name
    if description or "description" in fields:  # a card without one is not given an empty one
        fields["description"] = description
    for key, value in (("name", name), ("description", description)):
        if key in out:  # SillyTavern's flat V1 copy of data, kept in step
            out[key] = value
    had_extensions = isinstance(fields.get("extensions"), dict)
    extensions = fields["extensions"] if had_extensions else {}
    shared = extensions.get(SD_PROMPT_KEY)
    if isinstance(shared, dict):
        shared["positive"], shared["negative"] = positive, negative
    elif positive or negative:
        extensions[SD_PROMPT_KEY] = {"positive": positive, "negative": negative}
    # else absent or null stays so: null is how ST's "share" box says "not shared".
    if charforge or isinstance(extensions.get(CHARFORGE_KEY), dict):
        extensions[CHARFORGE_KEY] = charforge
    if extensions or had_extensions:
        fields["extensions"] = extensions

    v3_version = out["spec_version"] if out["spec"] == "chara_card_v3" else "3.0"
    v2 = {**out, "spec": "chara_card_v2", "spec_version": "2.0"}
    v3 = {**out, "spec": "chara_card_v3", "spec_version": v3_version}
    return _png_with_text(picture_png, [("chara", _b64_json(v2)), ("ccv3", _b64_json(v3))])


def _png_with_text(picture: bytes, chunks: list[tuple[str, str]]) -> bytes:
    """The picture re-encoded as PNG: its text chunks kept, minus chara/ccv3, plus ``chunks``."""
    if picture.startswith(PNG_SIGNATURE):
        _check_size(*_ihdr_size(picture))  # before Pillow allocates anything
    info = PngImagePlugin.PngInfo()
    out = io.BytesIO()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(picture)) as img:
                _check_size(img.width, img.height)
                img.load()
                for key, value in getattr(img, "text", {}).items():
                    if key.lower() in CARD_KEYWORDS:
                        continue
                    if isinstance(value, PngImagePlugin.iTXt):
                        info.add_itxt(key, value, value.lang or "", value.tkey or "")
                    else:
                        info.add_text(key, value)
                for key, value in chunks:
                    info.add_text(key, value)
                image: Image.Image = img
                if img.mode not in _PNG_MODES:
                    image = img.convert("RGBA" if "A" in img.mode else "RGB")
                image.save(out, format="PNG", pnginfo=info)
    except CardError:
        raise
    except (
        UnidentifiedImageError,
        OSError,
        SyntaxError,
        ValueError,
        Image.DecompressionBombError,
        Image.DecompressionBombWarning,
    ) as exc:
        raise CardError(f"The picture is not a readable image ({exc}).") from exc
    return out.getvalue()


def _normalise(obj: Any) -> dict[str, Any]:
    """V2/V3 as read (spec filled in when missing); V1 lifted into V2 with its flat fields kept."""
    if not isinstance(obj, dict):
        raise CardError(
            f"The card JSON is {_kind(obj)}, not an object: it is not a character card."
        )
    if isinstance(obj.get("data"), dict):
        spec = obj.setdefault("spec", "chara_card_v2")
        obj.setdefault("spec_version", "3.0" if spec == "chara_card_v3" else "2.0")
        return obj
    fields = copy.deepcopy(_V2_DEFAULTS)
    for field, sources in _V1_FIELDS.items():
        value = next((obj[k] for k in sources if isinstance(obj.get(k), str)), None)
        if value is not None:
            fields[field] = value
    tags = obj.get("tags")
    if isinstance(tags, str):  # ST splits a comma-separated tag string
        tags = [t.strip() for t in tags.split(",") if t.strip()]
    if isinstance(tags, list):
        fields["tags"] = tags
    if isinstance(obj.get("alternate_greetings"), list):
        fields["alternate_greetings"] = obj["alternate_greetings"]
    return {**obj, "spec": "chara_card_v2", "spec_version": "2.0", "data": fields}


def _card_json_from_png(png: bytes, max_json_bytes: int) -> tuple[bytes, str]:
    # The chunks are walked here rather than through Pillow: Pillow keeps every text chunk
    # (up to 64 MB) in memory, caps a compressed one at 1 MB whatever the limit asked, and
    # compares keywords case-sensitively. Here only the first chara/ccv3 chunk is decoded,
    # against max_json_bytes, and a compressed one is inflated only up to that bound.
    found: dict[str, tuple[bytes, memoryview]] = {}
    chunks = _chunks(png)
    kind, body = next(chunks)
    if kind != b"IHDR" or len(body) != 13:
        raise CardError("The PNG does not start with an IHDR chunk: the file is damaged.")
    _check_size(*struct.unpack(">II", body[:8]))
    for kind, body in chunks:
        if kind not in (b"tEXt", b"zTXt", b"iTXt"):
            continue
        nul = bytes(body[:80]).find(b"\0")
        keyword = bytes(body[:nul]).decode("latin-1").lower() if nul > 0 else ""
        if keyword in CARD_KEYWORDS and keyword not in found:
            found[keyword] = (kind, body[nul + 1 :])
    for keyword in CARD_KEYWORDS:
        if keyword in found:
            kind, rest = found[keyword]
            decoded = _b64decode(_text_payload(kind, rest, keyword, max_json_bytes), keyword)
            if len(decoded) > max_json_bytes:
                raise _too_big(keyword, max_json_bytes)
            return decoded, f"'{keyword}' chunk"
    raise CardError("The PNG has no 'chara' or 'ccv3' text chunk: it is not a character card.")


def _chunks(png: bytes) -> Iterator[tuple[bytes, memoryview]]:
    """(type, body) of each chunk up to IEND; lengths and CRCs checked, nothing copied."""
    view = memoryview(png)
    offset = len(PNG_SIGNATURE)
    while True:
        if offset + 12 > len(png):
            raise CardError("The PNG is truncated (it ends before its IEND chunk): re-save it.")
        length, kind = struct.unpack_from(">I4s", png, offset)
        end = offset + 12 + length
        if end > len(png):
            raise CardError("The PNG is truncated (a chunk runs past the end): re-save it.")
        body = view[offset + 8 : end - 4]
        (crc,) = struct.unpack_from(">I", png, end - 4)
        if zlib.crc32(body, zlib.crc32(kind)) != crc:
            raise CardError(f"The PNG is damaged: its {kind!r} chunk fails its CRC check.")
        yield kind, body
        if kind == b"IEND":
            return
        offset = end


def _text_payload(kind: bytes, rest: memoryview, keyword: str, max_json_bytes: int) -> bytes:
    """The text after the keyword's NUL: tEXt as is, zTXt/iTXt inflated only up to the bound."""
    limit = 2 * max_json_bytes + 64  # base64 is 4/3 of the JSON, plus line breaks
    if kind == b"tEXt":
        compressed, payload = False, rest
    elif kind == b"zTXt":  # compression method byte, then zlib data
        compressed, payload = True, rest[1:]
    else:  # iTXt: flag, method, language NUL, translated keyword NUL, text
        head = bytes(rest[2:1026])
        lang_end = head.find(b"\0")
        tkey_end = head.find(b"\0", lang_end + 1) if lang_end >= 0 else -1
        if len(rest) < 2 or tkey_end < 0:
            raise CardError(f"The PNG's '{keyword}' iTXt chunk is malformed: re-save the card.")
        compressed, payload = rest[0] == 1, rest[2 + tkey_end + 1 :]
    if not compressed:
        if len(payload) > limit:
            raise _too_big(keyword, max_json_bytes)
        return bytes(payload)
    try:
        text = zlib.decompressobj().decompress(payload, limit + 1)  # never more than the bound
    except zlib.error as exc:
        raise CardError(f"The PNG's '{keyword}' chunk does not decompress ({exc}).") from exc
    if len(text) > limit:
        raise _too_big(keyword, max_json_bytes)
    return text


def _b64decode(text: bytes, keyword: str) -> bytes:
    # Node's Buffer.from(text, "base64") (what ST uses) skips line breaks, takes the URL-safe
    # alphabet and missing padding; so does this, and anything else is refused.
    text = text.translate(None, b" \t\r\n").replace(b"-", b"+").replace(b"_", b"/")
    try:
        return base64.b64decode(text + b"=" * (-len(text) % 4), validate=True)
    except (binascii.Error, ValueError) as exc:
        raise CardError(
            f"The PNG's '{keyword}' chunk is not valid base64 ({exc}): the card is damaged; "
            "export it again from the application that made it."
        ) from exc


def _load_json(raw: bytes, source: str) -> Any:
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise CardError(f"The card's {source} is not UTF-8 text ({exc.reason}).") from exc
    try:
        return json.loads(text, parse_constant=_no_constant)
    except json.JSONDecodeError as exc:
        raise CardError(
            f"The card's {source} is not valid JSON ({exc.msg} at line {exc.lineno} column "
            f"{exc.colno}): the card is damaged; export it again."
        ) from exc
    except RecursionError as exc:
        raise CardError(f"The card's {source} is nested too deeply to read.") from exc


def _no_constant(name: str) -> Any:
    raise CardError(f"The card JSON contains {name}, which JSON does not allow.")


def _b64_json(card: dict[str, Any]) -> str:
    # JSON.stringify's form: compact, non-ASCII as UTF-8 (not \u escapes).
    try:
        text = json.dumps(card, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise CardError(f"The card cannot be written as JSON ({exc}).") from exc
    return base64.b64encode(text.encode("utf-8")).decode("ascii")


def _ihdr_size(png: bytes) -> tuple[int, int]:
    if len(png) < 24 or png[12:16] != b"IHDR":
        raise CardError("The PNG does not start with an IHDR chunk: the file is damaged.")
    width, height = struct.unpack_from(">II", png, 16)
    return int(width), int(height)


def _check_size(width: int, height: int) -> None:
    if width < 1 or height < 1:
        raise CardError(f"The PNG says it is {width}x{height} px: the file is damaged.")
    if width > MAX_SIDE or height > MAX_SIDE or width * height > MAX_PIXELS:
        raise CardError(
            f"The picture is {width}x{height} px; pictures over {MAX_SIDE} px a side or "
            f"{MAX_PIXELS // 1_000_000} megapixels are refused. Resize it and try again."
        )


def _check_pixels(png: bytes) -> None:
    """Decode the card's image once (its size already checked), so a damaged one fails here."""
    try:
        with Image.open(io.BytesIO(png)) as img:
            img.load()
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise CardError(f"The card's image data is damaged ({exc}): re-save the PNG.") from exc


def _too_big(keyword: str, limit: int) -> CardError:
    return CardError(
        f"The PNG's '{keyword}' chunk holds more than {limit} bytes of card JSON, the limit. "
        "Remove embedded assets or lorebook entries and export it again."
    )


def _text(value: Any) -> str:
    return value if isinstance(value, str) else ""


def _kind(value: Any) -> str:
    return "null" if value is None else f"a {type(value).__name__}"
