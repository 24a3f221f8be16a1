"""SillyTavern cards: real PNG/JSON cards built here the way SillyTavern writes them, read back,
exported, and read again with every field intact; damaged and hostile files refused."""

from __future__ import annotations

import base64
import io
import json
import struct
import tracemalloc
import zlib
from collections.abc import Callable
from typing import Any

import pytest
from PIL import Image, PngImagePlugin

from charforge.identity.cards import CardError, ParsedCard, export_card, parse_card

SIGNATURE = b"\x89PNG\r\n\x1a\n"
NON_ASCII_NAME = "桜子 Sakurako 🌸"


# --- building cards -------------------------------------------------------------------------


def _stringify(obj: Any, indent: int | None = None) -> str:
    """JavaScript's JSON.stringify: compact, non-ASCII left as is."""
    separators = (",", ":") if indent is None else (",", ": ")
    return json.dumps(obj, ensure_ascii=False, separators=separators, indent=indent)


def _b64(text: str) -> str:
    return base64.b64encode(text.encode("utf-8")).decode("ascii")


def _chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def _text_chunk(keyword: str, text: str) -> bytes:
    return _chunk(b"tEXt", keyword.encode("latin-1") + b"\0" + text.encode("latin-1"))


def _chunks(png: bytes) -> list[tuple[bytes, bytes]]:
    out, offset = [], 8
    while offset < len(png):
        (length,) = struct.unpack_from(">I", png, offset)
        out.append((png[offset + 4 : offset + 8], png[offset + 8 : offset + 8 + length]))
        offset += 12 + length
    return out


def _texts(png: bytes) -> list[tuple[bytes, str, bytes]]:
    """(chunk type, keyword, value) of each text chunk."""
    found = []
    for kind, body in _chunks(png):
        if kind in (b"tEXt", b"iTXt", b"zTXt"):
            keyword, value = body.split(b"\0", 1)
            found.append((kind, keyword.decode("latin-1"), value))
    return found


def _before_iend(png: bytes, *chunks: bytes) -> bytes:
    assert png.endswith(_chunk(b"IEND", b""))
    return png[:-12] + b"".join(chunks) + png[-12:]


def _picture(parameters: str | None = "Sakura, 1girl\nSteps: 20, Seed: 7") -> bytes:
    img = Image.new("RGBA", (40, 30), (20, 120, 200, 255))
    img.putpixel((3, 4), (255, 0, 0, 128))
    info = PngImagePlugin.PngInfo()
    if parameters is not None:
        info.add_itxt("parameters", parameters)
    out = io.BytesIO()
    img.save(out, format="PNG", pnginfo=info)
    return out.getvalue()


def _st_write(image: bytes, card_json: str) -> bytes:
    """SillyTavern's character-card-parser.js write(): drop tEXt chara/ccv3, then add before IEND
    `chara` = the JSON as given and `ccv3` = the same object with spec chara_card_v3 / 3.0."""
    kept = [
        _chunk(kind, body)
        for kind, body in _chunks(image)
        if not (kind == b"tEXt" and body.split(b"\0")[0].lower() in (b"chara", b"ccv3"))
    ]
    v3 = json.loads(card_json)
    v3["spec"], v3["spec_version"] = "chara_card_v3", "3.0"
    added = [_text_chunk("chara", _b64(card_json)), _text_chunk("ccv3", _b64(_stringify(v3)))]
    return SIGNATURE + b"".join(kept[:-1]) + b"".join(added) + kept[-1]


def _st_v2(name: str = "Seraphina", **extensions: Any) -> dict[str, Any]:
    """A card as SillyTavern's charaFormatData stores it: flat V1 copies beside spec V2 data."""
    return {
        "name": name,
        "description": "A guardian of the forest, silver hair.",
        "personality": "kind",
        "scenario": "a glade",
        "first_mes": "Hello, traveller.",
        "mes_example": "<START>\n{{char}}: Hi",
        "creatorcomment": "notes",
        "avatar": "none",
        "chat": f"{name} - 2024-5-1 @12h 00m 00s 000ms",
        "talkativeness": "0.5",
        "fav": False,
        "tags": ["fantasy"],
        "spec": "chara_card_v2",
        "spec_version": "2.0",
        "data": {
            "name": name,
            "description": "A guardian of the forest, silver hair.",
            "personality": "kind",
            "scenario": "a glade",
            "first_mes": "Hello, traveller.",
            "mes_example": "<START>\n{{char}}: Hi",
            "creator_notes": "notes",
            "system_prompt": "",
            "post_history_instructions": "",
            "tags": ["fantasy"],
            "creator": "someone",
            "character_version": "1.2",
            "alternate_greetings": ["Oh, hi."],
            "character_book": {
                "name": "lore",
                "extensions": {},
                "entries": [
                    {
                        "keys": ["glade"],
                        "content": "The glade is old.",
                        "extensions": {"position": 1, "probability": 100},
                        "enabled": True,
                        "insertion_order": 100,
                        "id": 0,
                    }
                ],
            },
            "extensions": {
                "talkativeness": "0.5",
                "fav": False,
                "world": "",
                "depth_prompt": {"prompt": "", "depth": 4, "role": "system"},
                "sd_character_prompt": {
                    "positive": "seraphina, silver hair, green eyes",
                    "negative": "short hair",
                },
                **extensions,
            },
            "group_only_greetings": [],
        },
        "create_date": "2024-5-1 @12h 00m 00s 000ms",
    }


def _v3(name: str = "Seraphina V3") -> dict[str, Any]:
    card = _st_v2(name)
    card["spec"], card["spec_version"] = "chara_card_v3", "3.0"
    card["data"].update(
        {
            "nickname": "Sera",
            "creator_notes_multilingual": {"en": "notes", "ja": "メモ"},
            "source": ["https://example.org/sera"],
            "assets": [{"type": "icon", "uri": "ccdefault:", "name": "main", "ext": "png"}],
            "group_only_greetings": ["Hello, all of you."],
            "creation_date": 1714560000,
            "modification_date": 1714563600,
        }
    )
    return card


def _v1() -> dict[str, Any]:
    return {
        "name": "Aqua",
        "description": "A water goddess.",
        "personality": "loud",
        "scenario": "Axel",
        "first_mes": "I am Aqua!",
        "mes_example": "",
        "creatorcomment": "from an old card",
        "tags": "comedy, goddess",
    }


def _unknowns() -> dict[str, Any]:
    card = _st_v2("Kazuma", **{"agnai/voice": {"id": 7}, "chub": {"full_path": "a/b"}})
    card["data"]["x_future_field"] = {"nested": [1, 2.5, None, "é"]}
    card["vendor_top_level"] = {"keep": True}
    return card


CARDS: dict[str, Callable[[], bytes]] = {
    "v2 png, sillytavern's write": lambda: _st_write(_picture(), _stringify(_st_v2())),
    "v2 png, chara only": lambda: _before_iend(
        _picture(), _text_chunk("chara", _b64(_stringify(_st_v2())))
    ),
    "v3 png, both chunks": lambda: _before_iend(
        _picture(),
        _text_chunk("chara", _b64(_stringify(_st_v2("Old name")))),
        _text_chunk("ccv3", _b64(_stringify(_v3()))),
    ),
    "v2 json": lambda: _stringify(_st_v2(), indent=4).encode(),
    "v3 json with bom": lambda: b"\xef\xbb\xbf" + _stringify(_v3()).encode(),
    "v1 json": lambda: _stringify(_v1()).encode(),
    "unknown fields png": lambda: _st_write(_picture(), _stringify(_unknowns())),
    "minimal v2 json, no extensions": lambda: _stringify(
        {"spec": "chara_card_v2", "spec_version": "2.0", "data": {"name": "Min", "first_mes": "Yo"}}
    ).encode(),
    "non-ascii png": lambda: _st_write(_picture(), _stringify(_st_v2(NON_ASCII_NAME))),
}


def _export_same(parsed: ParsedCard, picture: bytes | None = None) -> bytes:
    return export_card(
        parsed.card,
        picture_png=picture or parsed.picture or _picture(),
        charforge=parsed.charforge,
        name=parsed.name,
        description=parsed.description,
        positive=parsed.positive,
        negative=parsed.negative,
    )


def _card_chunks(png: bytes) -> dict[str, dict[str, Any]]:
    found = {}
    for kind, keyword, value in _texts(png):
        if keyword in ("chara", "ccv3"):
            assert kind == b"tEXt" and keyword not in found
            found[keyword] = json.loads(base64.b64decode(value))
    return found


# --- reading --------------------------------------------------------------------------------


def test_a_sillytavern_v2_png_is_read() -> None:
    png = CARDS["v2 png, chara only"]()
    parsed = parse_card(png)
    assert parsed.name == "Seraphina"
    assert parsed.description == "A guardian of the forest, silver hair."
    assert parsed.positive == "seraphina, silver hair, green eyes"
    assert parsed.negative == "short hair"
    assert parsed.picture == png
    assert parsed.charforge == {}
    assert parsed.card == _st_v2()


def test_sillytavern_writes_both_chunks_and_the_reader_takes_ccv3() -> None:
    parsed = parse_card(CARDS["v2 png, sillytavern's write"]())
    assert parsed.card["spec"] == "chara_card_v3" and parsed.card["spec_version"] == "3.0"
    assert parsed.card["data"] == _st_v2()["data"]


@pytest.mark.parametrize("ccv3_first", [False, True])
def test_ccv3_wins_over_chara(ccv3_first: bool) -> None:
    chara = _text_chunk("chara", _b64(_stringify(_st_v2("Old name"))))
    ccv3 = _text_chunk("ccv3", _b64(_stringify(_v3("New name"))))
    png = _before_iend(_picture(), *((ccv3, chara) if ccv3_first else (chara, ccv3)))
    parsed = parse_card(png)
    assert parsed.name == "New name"
    assert parsed.card["spec"] == "chara_card_v3"
    assert parsed.card["data"]["nickname"] == "Sera"


@pytest.mark.parametrize(
    ("names", "winner"), [({"CHARA": "A"}, "A"), ({"Chara": "A", "CCV3": "B"}, "B")]
)
def test_keywords_are_matched_case_insensitively(names: dict[str, str], winner: str) -> None:
    chunks = [_text_chunk(k, _b64(_stringify(_st_v2(n)))) for k, n in names.items()]
    assert parse_card(_before_iend(_picture(), *chunks)).name == winner


def test_json_cards_are_read() -> None:
    v2 = parse_card(CARDS["v2 json"]())
    assert (v2.name, v2.picture, v2.card) == ("Seraphina", None, _st_v2())
    v3 = parse_card(CARDS["v3 json with bom"]())
    assert (v3.name, v3.positive) == ("Seraphina V3", "seraphina, silver hair, green eyes")
    assert v3.card == _v3()


def test_a_v1_card_is_lifted_into_v2_with_its_flat_fields_kept() -> None:
    parsed = parse_card(CARDS["v1 json"]())
    card = parsed.card
    assert (card["spec"], card["spec_version"]) == ("chara_card_v2", "2.0")
    assert card["data"]["name"] == parsed.name == "Aqua"
    assert card["data"]["description"] == "A water goddess."
    assert card["data"]["first_mes"] == "I am Aqua!"
    assert card["data"]["creator_notes"] == "from an old card"
    assert card["data"]["tags"] == ["comedy", "goddess"]
    assert card["data"]["extensions"] == {}
    assert {k: card[k] for k in _v1()} == _v1()
    assert (parsed.positive, parsed.negative, parsed.charforge) == ("", "", {})


def test_a_pygmalion_card_is_lifted_too() -> None:
    raw = {
        "char_name": "Pyg",
        "char_persona": "a bot",
        "char_greeting": "hi",
        "world_scenario": "x",
    }
    data = parse_card(json.dumps(raw).encode()).card["data"]
    assert (data["name"], data["description"], data["first_mes"], data["scenario"]) == (
        "Pyg",
        "a bot",
        "hi",
        "x",
    )


def test_a_card_charforge_exported_gives_back_its_extension() -> None:
    card = _st_v2(charforge={"checkpoint": "sakura.safetensors", "seed": 7})
    assert parse_card(_stringify(card).encode()).charforge == {
        "checkpoint": "sakura.safetensors",
        "seed": 7,
    }


def test_a_compressed_card_chunk_is_read_within_its_bound() -> None:
    text = _b64(_stringify(_st_v2()))
    ztxt = _chunk(b"zTXt", b"chara\0\0" + zlib.compress(text.encode()))
    itxt = _chunk(b"iTXt", b"ccv3\0\x01\0en\0\0" + zlib.compress(_b64(_stringify(_v3())).encode()))
    assert parse_card(_before_iend(_picture(), ztxt)).name == "Seraphina"
    assert parse_card(_before_iend(_picture(), ztxt, itxt)).name == "Seraphina V3"


# --- round trip -----------------------------------------------------------------------------


@pytest.mark.parametrize("kind", list(CARDS))
def test_round_trip_keeps_every_field(kind: str) -> None:
    first = parse_card(CARDS[kind]())
    exported = _export_same(first)
    second = parse_card(exported)
    assert second.card["data"].keys() == first.card["data"].keys()
    for key, value in first.card["data"].items():
        assert _stringify(second.card["data"][key]) == _stringify(value), key
    top = {k for k in first.card if k not in ("spec", "spec_version")}
    assert {k: second.card[k] for k in top} == {k: first.card[k] for k in top}
    assert (second.name, second.description, second.positive, second.negative) == (
        first.name,
        first.description,
        first.positive,
        first.negative,
    )
    chunks = _card_chunks(exported)
    assert chunks["chara"]["spec"] == "chara_card_v2" and chunks["chara"]["spec_version"] == "2.0"
    assert chunks["ccv3"]["spec"] == "chara_card_v3"
    assert chunks["chara"]["data"] == chunks["ccv3"]["data"] == first.card["data"]


def test_non_ascii_text_survives_as_utf8_like_json_stringify() -> None:
    parsed = parse_card(CARDS["non-ascii png"]())
    assert parsed.name == NON_ASCII_NAME
    exported = export_card(
        parsed.card,
        picture_png=_picture(),
        charforge={"note": "café"},
        name="Ёжик 刺猬",
        description="naïve — «quoted»",
        positive="桜, kimono",
        negative="",
    )
    again = parse_card(exported)
    assert (again.name, again.description, again.positive) == (
        "Ёжик 刺猬",
        "naïve — «quoted»",
        "桜, kimono",
    )
    assert again.charforge == {"note": "café"}
    raw = {kw: base64.b64decode(v) for _, kw, v in _texts(exported) if kw == "chara"}["chara"]
    assert "Ёжик 刺猬".encode() in raw and b"\\u" not in raw


# --- exporting ------------------------------------------------------------------------------


def test_export_changes_only_what_it_owns() -> None:
    source = _st_write(_picture(), _stringify(_unknowns()))
    parsed = parse_card(source)
    exported = export_card(
        parsed.card,
        picture_png=source,
        charforge={"character_id": 12},
        name="Kazuma Satou",
        description="An adventurer.",
        positive="kazuma, green cape",
        negative="blurry",
    )
    again = parse_card(exported)
    data, before = again.card["data"], _unknowns()["data"]
    assert (data["name"], data["description"]) == ("Kazuma Satou", "An adventurer.")
    assert again.card["name"] == "Kazuma Satou"  # ST's flat copy follows data
    assert again.card["description"] == "An adventurer."
    assert data["extensions"]["sd_character_prompt"] == {
        "positive": "kazuma, green cape",
        "negative": "blurry",
    }
    assert again.charforge == {"character_id": 12}
    assert data["extensions"]["agnai/voice"] == {"id": 7}
    assert data["extensions"]["chub"] == {"full_path": "a/b"}
    assert data["x_future_field"] == before["x_future_field"]
    assert data["character_book"] == before["character_book"]
    assert again.card["vendor_top_level"] == {"keep": True}
    texts = [(kind, kw) for kind, kw, _ in _texts(exported)]
    assert texts.count((b"tEXt", "chara")) == 1 and texts.count((b"tEXt", "ccv3")) == 1
    assert ("parameters" in [kw for _, kw in texts]) is True
    with Image.open(io.BytesIO(exported)) as out, Image.open(io.BytesIO(source)) as src:
        assert out.size == src.size and out.tobytes() == src.convert(out.mode).tobytes()
        assert out.text["parameters"] == "Sakura, 1girl\nSteps: 20, Seed: 7"


def test_export_of_a_character_never_imported() -> None:
    exported = export_card(
        {},
        picture_png=_picture(parameters=None),
        charforge={"character_id": 3},
        name="Mika",
        description="A new face.",
        positive="mika, red scarf",
        negative="lowres",
    )
    parsed = parse_card(exported)
    assert (parsed.name, parsed.description, parsed.positive, parsed.negative) == (
        "Mika",
        "A new face.",
        "mika, red scarf",
        "lowres",
    )
    assert parsed.charforge == {"character_id": 3}
    data = _card_chunks(exported)["chara"]["data"]
    assert data["first_mes"] == "" and data["alternate_greetings"] == [] and data["tags"] == []


def test_an_unshared_sd_prompt_stays_unshared() -> None:
    card = _st_v2()
    card["data"]["extensions"]["sd_character_prompt"] = None  # ST's "share" box unticked
    parsed = parse_card(_stringify(card).encode())
    assert (parsed.positive, parsed.negative) == ("", "")
    kept = parse_card(_export_same(parsed, _picture()))
    assert kept.card["data"]["extensions"]["sd_character_prompt"] is None
    shared = export_card(
        parsed.card,
        picture_png=_picture(),
        charforge={},
        name=parsed.name,
        description=parsed.description,
        positive="now shared",
        negative="",
    )
    assert parse_card(shared).card["data"]["extensions"]["sd_character_prompt"] == {
        "positive": "now shared",
        "negative": "",
    }
    assert "charforge" not in parse_card(shared).card["data"]["extensions"]


def test_a_newer_v3_card_keeps_its_spec_version() -> None:
    card = _v3()
    card["spec_version"] = "3.1"
    exported = _export_same(parse_card(_stringify(card).encode()), _picture())
    chunks = _card_chunks(exported)
    assert (chunks["ccv3"]["spec_version"], chunks["chara"]["spec_version"]) == ("3.1", "2.0")


def test_export_refuses_a_nameless_card_and_an_unreadable_picture() -> None:
    parsed = parse_card(CARDS["v2 json"]())
    common = {"charforge": {}, "description": "", "positive": "", "negative": ""}
    with pytest.raises(CardError, match="no name"):
        export_card(parsed.card, picture_png=_picture(), name="  ", **common)
    with pytest.raises(CardError, match="not a readable image"):
        export_card(parsed.card, picture_png=b"not an image", name="X", **common)
    with pytest.raises(CardError, match="4096 px a side"):
        export_card(parsed.card, picture_png=_huge_png(5000, 8), name="X", **common)


# --- refusing -------------------------------------------------------------------------------


def _huge_png(width: int, height: int) -> bytes:
    """A PNG whose header claims the size, with image data that would not even decode."""
    ihdr = _chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
    card = _text_chunk("chara", _b64(_stringify(_st_v2())))
    return SIGNATURE + ihdr + card + _chunk(b"IDAT", b"junk") + _chunk(b"IEND", b"")


def _damage_crc(png: bytes) -> bytes:
    at = png.index(b"tEXtchara") + 10
    return png[:at] + bytes([png[at] ^ 1]) + png[at + 1 :]


def _bad_idat() -> bytes:
    good = _picture(parameters=None)
    out = [_chunk(k, b"\x78\x9c broken" if k == b"IDAT" else b) for k, b in _chunks(good)]
    card = _text_chunk("chara", _b64(_stringify(_st_v2())))
    return SIGNATURE + out[0] + card + b"".join(out[1:])


def _deep_json() -> bytes:
    return b'{"name": "x", "data": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"


def _chara(text: str) -> bytes:
    return _before_iend(_picture(), _text_chunk("chara", text))


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"", "neither a PNG nor JSON"),
        (b"GIF89a\x01\x00\x01\x00", "neither a PNG nor JSON"),
        (b"\xff\xd8\xff\xe0 jpeg", "neither a PNG nor JSON"),
        (_picture(), "no 'chara' or 'ccv3' text chunk"),
        (_chara("!!! not base64 !!!"), "'chara' chunk is not valid base64"),
        (_chara(_b64('{"spec": "chara_card_v2", "data": {')), "'chara' chunk is not valid JSON"),
        (_chara(_b64("[1, 2]")), "a list, not an object"),
        (b'{"name": "x",', "JSON is not valid JSON"),
        (b'{"name": "x", "talkativeness": NaN}', "NaN"),
        (_deep_json(), "nested too deeply"),
        (_stringify({"spec": "chara_card_v2", "data": {"name": ""}}).encode(), "has no name"),
        (_stringify({"spec": "chara_card_v3", "data": {"name": " "}}).encode(), "has no name"),
        (_stringify({"description": "nameless v1"}).encode(), "has no name"),
        (_chara(_b64(_stringify({"data": {"name": "x", "extensions": []}}))), "extensions is a"),
        (_huge_png(5000, 16), "5000x16 px"),
        (_huge_png(4096, 4096), "16 megapixels"),
        (_picture()[:-30], "truncated"),
        (_damage_crc(_chara(_b64(_stringify(_st_v2())))), "fails its CRC"),
        (_bad_idat(), "image data is damaged"),
    ],
)
def test_bad_cards_are_refused_with_a_reason(data: bytes, message: str) -> None:
    with pytest.raises(CardError, match=message):
        parse_card(data)


def test_oversize_card_json_is_refused() -> None:
    card = _stringify(_st_v2())
    assert parse_card(_chara(_b64(card)), max_json_bytes=len(card.encode())).name == "Seraphina"
    with pytest.raises(CardError, match=r"more than 100 bytes"):
        parse_card(_chara(_b64(card)), max_json_bytes=100)
    with pytest.raises(CardError, match=r"the limit is 100\b"):
        parse_card(card.encode(), max_json_bytes=100)
    small = _stringify({"data": {"name": "x" * 140}})  # its base64 is under twice the limit
    with pytest.raises(CardError, match=r"more than 100 bytes"):
        parse_card(_chara(_b64(small)), max_json_bytes=100)


def test_a_huge_text_chunk_is_refused_without_being_copied() -> None:
    png = _chara("QUFB" * 5_000_000)  # 20 MB of base64
    tracemalloc.start()
    try:
        with pytest.raises(CardError, match="more than 1000 bytes"):
            parse_card(png, max_json_bytes=1000)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 1_000_000


def test_a_compression_bomb_is_not_inflated_past_the_bound() -> None:
    bomb = _chunk(b"zTXt", b"chara\0\0" + zlib.compress(b"A" * 50_000_000, 9))
    png = _before_iend(_picture(), bomb)
    assert len(bomb) < 100_000
    tracemalloc.start()
    try:
        with pytest.raises(CardError, match="more than 1000 bytes"):
            parse_card(png, max_json_bytes=1000)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 1_000_000
