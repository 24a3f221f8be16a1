"""Reference images and SillyTavern cards over real HTTP: limits checked from the header,
metadata dropped, owner scope, promotion of a generated image, card import and export."""

from __future__ import annotations

import base64
import io
import json
import struct
import zlib
from typing import Any

import httpx
from PIL import Image

from charforge.identity.cards import parse_card
from tests.api.test_generate import create, generate
from tests.conftest import Live
from tests.photos import astronaut_png, kafka_png


def upload(
    client: httpx.Client, character_id: str, data: bytes, name: str = "face.png"
) -> httpx.Response:
    return client.post(f"/api/characters/{character_id}/references", files={"file": (name, data)})


def _jpeg_with_exif(png: bytes) -> bytes:
    img = Image.open(io.BytesIO(png)).convert("RGB")
    exif = Image.Exif()
    exif[0x010F] = "SecretCam"  # Make
    exif[0x0112] = 6  # Orientation: rotate 90 degrees clockwise to show upright
    out = io.BytesIO()
    img.save(out, format="JPEG", exif=exif.tobytes())
    return out.getvalue()


def _png_claiming(width: int, height: int) -> bytes:
    """A tiny file whose header claims a huge canvas (a decompression bomb's shape)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data))
            + kind
            + data
            + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
        )

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(b"\0" * 64))
        + chunk(b"IEND", b"")
    )


def test_reference_upload_list_file_delete_and_limits(live: Live) -> None:
    client = live.user("alice")
    sakura = create(client, "Sakura")
    path = f"/api/characters/{sakura['id']}/references"

    added = upload(client, sakura["id"], _jpeg_with_exif(astronaut_png()), "face.jpg")
    assert added.status_code == 201, added.text
    ref = added.json()
    assert set(ref) >= {"id", "url", "width", "height", "sha256", "createdAt"}
    assert added.headers["location"] == f"{path}/{ref['id']}"
    # Turned upright by its EXIF orientation, then stored without any metadata, as PNG.
    source = Image.open(io.BytesIO(astronaut_png()))
    assert (ref["width"], ref["height"]) == (source.height, source.width)
    stored = client.get(ref["url"])
    assert stored.status_code == 200 and stored.headers["content-type"] == "image/png"
    with Image.open(io.BytesIO(stored.content)) as img:
        assert img.format == "PNG" and not img.getexif() and "exif" not in img.info
    assert b"SecretCam" not in stored.content
    assert ref["sha256"] == __import__("hashlib").sha256(stored.content).hexdigest()

    listed = client.get(path).json()
    assert [r["id"] for r in listed["items"]] == [ref["id"]]
    assert client.get(f"/api/characters/{sakura['id']}").json()["referenceCount"] == 1

    again = upload(client, sakura["id"], _jpeg_with_exif(astronaut_png()), "face.jpg")
    assert again.status_code == 409 and again.json()["error"]["referenceId"] == ref["id"]

    # Each limit is a 4xx envelope that names it, and nothing is stored.
    too_wide = upload(client, sakura["id"], _png_claiming(5000, 64))
    assert too_wide.status_code == 422
    assert "4096 px a side" in too_wide.json()["error"]["message"]
    bomb = upload(client, sakura["id"], _png_claiming(4000, 4001))
    assert bomb.status_code == 422 and "16 MP" in bomb.json()["error"]["message"]
    big = upload(client, sakura["id"], b"\x89PNG\r\n\x1a\n" + b"\0" * (10 * 1024 * 1024 + 10))
    assert big.status_code == 422 and "10 MB" in big.json()["error"]["message"]
    not_image = upload(client, sakura["id"], b"GIF89a....")
    assert not_image.status_code == 422 and not_image.json()["error"]["field"] == "file"
    wrong_field = client.post(path, files={"picture": ("a.png", astronaut_png())})
    assert wrong_field.status_code == 422 and wrong_field.json()["error"]["field"] == "picture"
    assert len(client.get(path).json()["items"]) == 1

    # At most 8 per character.
    for index in range(7):
        tinted = Image.new("RGB", (32, 32), (index * 30, 10, 10))
        out = io.BytesIO()
        tinted.save(out, format="WEBP")
        assert upload(client, sakura["id"], out.getvalue(), "x.webp").status_code == 201
    ninth = upload(client, sakura["id"], kafka_png())
    assert ninth.status_code == 422 and ninth.json()["error"]["limit"] == 8

    # Another user sees none of it.
    bob = live.user("bob")
    assert bob.get(path).status_code == 404
    assert bob.get(ref["url"]).status_code == 404
    assert upload(bob, sakura["id"], kafka_png()).status_code == 404
    assert bob.delete(f"{path}/{ref['id']}").status_code == 404

    assert client.delete(f"{path}/{ref['id']}").status_code == 204
    assert client.get(ref["url"]).status_code == 404
    assert len(client.get(path).json()["items"]) == 7
    files = list((live.container.settings.data_dir / "references").rglob("*.png"))
    assert len(files) == 7


def test_a_generated_image_is_promoted_to_reference(live: Live) -> None:
    client = live.user("alice")
    sakura = create(client, "Sakura")
    other = create(client, "Mika")
    made = generate(client, sakura, width=64, height=64, steps=2, hires=False)
    assert made.status_code == 200, made.text
    image_id = made.json()["images"][0]["id"]
    path = f"/api/characters/{sakura['id']}/references"

    promoted = client.post(path, json={"imageId": image_id})
    assert promoted.status_code == 201, promoted.text
    assert promoted.json()["source"] == "image" and promoted.json()["imageId"] == image_id
    # The promoted copy drops the image's infotext like any other metadata.
    assert b"parameters" not in client.get(promoted.json()["url"]).content

    elsewhere = client.post(f"/api/characters/{other['id']}/references", json={"imageId": image_id})
    assert elsewhere.status_code == 422 and elsewhere.json()["error"]["field"] == "imageId"
    typo = client.post(path, json={"imageID": image_id})
    assert typo.status_code == 422
    assert client.post(path, json={"imageId": "nope"}).status_code == 404
    assert (
        client.post(path, content=b"x", headers={"content-type": "text/plain"}).status_code == 422
    )
    assert live.user("bob").post(path, json={"imageId": image_id}).status_code == 404


def _card_png(card: dict[str, Any], picture: bytes, keyword: str = "chara") -> bytes:
    """A card as SillyTavern writes it: base64 JSON in a tEXt chunk before IEND."""
    text = base64.b64encode(json.dumps(card, ensure_ascii=False).encode()).decode()
    data = keyword.encode() + b"\0" + text.encode()
    chunk = struct.pack(">I", len(data)) + b"tEXt" + data
    chunk += struct.pack(">I", zlib.crc32(b"tEXt" + data) & 0xFFFFFFFF)
    return picture[:-12] + chunk + picture[-12:]


CARD = {
    "spec": "chara_card_v2",
    "spec_version": "2.0",
    "data": {
        "name": "Seraphina",
        "description": "A guardian of the forest. ✨",
        "personality": "kind",
        "scenario": "",
        "first_mes": "Hello, traveller.",
        "mes_example": "",
        "creator_notes": "",
        "system_prompt": "",
        "post_history_instructions": "",
        "alternate_greetings": ["Hi!"],
        "tags": ["fantasy"],
        "creator": "someone",
        "character_version": "1",
        "extensions": {
            "sd_character_prompt": {"positive": "pink hair, amber eyes", "negative": "hat"},
            "depth_prompt": {"prompt": "x", "depth": 4},
            "some_unknown_extension": {"keep": [1, 2, 3]},
        },
    },
}


def test_card_import_and_export_keep_every_field(live: Live) -> None:
    client = live.user("alice")
    imported = client.post(
        "/api/characters/import?artStyle=realistic",
        files={"file": ("seraphina.png", _card_png(CARD, astronaut_png()))},
    )
    assert imported.status_code == 201, imported.text
    character = imported.json()
    assert character["name"] == "Seraphina"
    assert character["appearance"] == "pink hair, amber eyes"
    assert character["negativePrompt"] == "hat"
    assert character["artStyle"]["primaryStyle"] == "realistic"
    assert character["referenceCount"] == 1 and character["importedCard"] is True
    refs = client.get(f"/api/characters/{character['id']}/references").json()["items"]
    assert refs[0]["source"] == "card"

    # The appearance changes in charforge; the export carries it and loses nothing else.
    client.patch(f"/api/characters/{character['id']}", json={"appearance": "silver hair"})
    exported = client.get(f"/api/characters/{character['id']}/card.png")
    assert exported.status_code == 200 and exported.headers["content-type"] == "image/png"
    card = parse_card(exported.content)
    assert card.positive == "silver hair" and card.negative == "hat"
    assert card.charforge["artStyle"] == "realistic"
    data = card.card["data"]
    for key, value in CARD["data"].items():
        if key != "extensions":
            assert data[key] == value, key
    for key in ("depth_prompt", "some_unknown_extension"):
        assert data["extensions"][key] == CARD["data"]["extensions"][key]

    # Round trip: importing the export gives the same character back.
    again = client.post(
        "/api/characters/import", content=exported.content, headers={"content-type": "image/png"}
    )
    assert again.status_code == 201, again.text
    back = again.json()
    assert (back["appearance"], back["artStyle"]["primaryStyle"]) == ("silver hair", "realistic")
    second = parse_card(client.get(f"/api/characters/{back['id']}/card.png").content)
    assert json.dumps(second.card, sort_keys=True) == json.dumps(card.card, sort_keys=True)

    # JSON cards (V3 here) work too, and have no picture to make a reference of.
    v3 = {**CARD, "spec": "chara_card_v3", "spec_version": "3.0"}
    as_json = client.post("/api/characters/import", json=v3)
    assert as_json.status_code == 201 and as_json.json()["referenceCount"] == 0

    bad = client.post("/api/characters/import", files={"file": ("x.png", astronaut_png())})
    assert bad.status_code == 422 and "chara" in bad.json()["error"]["message"]
    assert live.user("bob").get(f"/api/characters/{character['id']}/card.png").status_code == 404
