"""Reference images, the same-person badge, style transfer and character cards, as creators
meet them in the browser (real Chromium against a live charforge and the A1111 simulators)."""

from __future__ import annotations

import base64
import dataclasses
import io
import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from PIL import Image as PILImage
from PIL import PngImagePlugin
from playwright.sync_api import expect

from charforge.db import references as refs
from charforge.db.models import Character
from charforge.identity.cards import parse_card
from charforge.services import references, users
from charforge.simulator import A1111Simulator
from tests.photos import astronaut_png, cat_png, kafka_png, on_canvas
from tests.web.conftest import shot
from tests.web.test_generate_jobs import submitted_job
from tests.web.test_pages import first_run, new_character

SHOTS = Path("/tmp/shots")  # noqa: S108 (where the brief asks for them)
PHONE = 390


def save_shot(page: Any, name: str) -> None:
    """Into test-artifacts (as the other tests) and /tmp/shots, for a person to look at."""
    shot(page, name)
    SHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SHOTS / f"{name}.png"), full_page=True)


def as_jpeg(png: bytes) -> bytes:
    out = io.BytesIO()
    PILImage.open(io.BytesIO(png)).convert("RGB").save(out, format="JPEG", quality=90)
    return out.getvalue()


def upload(page: Any, name: str, data: bytes, mime: str = "image/png") -> None:
    page.get_by_label("Add a picture").set_input_files(
        files=[{"name": name, "mimeType": mime, "buffer": data}]
    )
    page.get_by_role("button", name="Add reference image").click()


def count_line(page: Any) -> Any:
    return page.locator("#references-heading .count")


@pytest.fixture
def photos(sims: tuple[A1111Simulator, A1111Simulator]) -> Iterator[Any]:
    """``photos([png, ...])``: the simulators answer with these photos instead of their
    placeholders (the N-th image with the N-th photo); their settings are put back after."""
    before = [sim.settings for sim in sims]

    def use(pictures: list[bytes]) -> None:
        for sim in sims:
            sim.settings = dataclasses.replace(sim.settings, photo_outputs=list(pictures))
            sim.reset()  # counts images from 0 again

    yield use
    for sim, settings in zip(sims, before, strict=True):
        sim.settings = settings


@pytest.fixture
def controlnet(sims: tuple[A1111Simulator, A1111Simulator]) -> Iterator[None]:
    """Both simulators with the ControlNet extension; asked for before ``web`` so that
    charforge finds it from its first health check."""
    before = [sim.settings for sim in sims]
    for sim in sims:
        sim.settings = dataclasses.replace(sim.settings, controlnet=True)
    yield
    for sim, settings in zip(sims, before, strict=True):
        sim.settings = settings


def generate(page: Any, prompt: str) -> dict[str, Any]:
    page.get_by_label("Prompt", exact=True).fill(prompt)
    with page.expect_request(
        lambda r: r.url.endswith("/generate-images/jobs") and r.method == "POST"
    ) as sent:
        submitted_job(page)
    outcome = page.locator("#result:not([hidden]), #form-error:not([hidden])")
    expect(outcome).to_be_visible(timeout=60000)
    assert page.locator("#form-error").is_hidden(), page.locator("#form-error").inner_text()
    body: dict[str, Any] = json.loads(sent.value.post_data)
    return body


def test_reference_images_are_added_shown_and_deleted_on_the_character_page(
    web: Any, new_page: Any, sims: tuple[A1111Simulator, A1111Simulator]
) -> None:
    server, container = web
    base = server.url
    page = new_page()
    first_run(page, base)
    eileen = new_character(page, base, "Eileen", "realistic", "short blond hair")
    expect(count_line(page)).to_have_text("0 of 8")
    expect(page.get_by_text("No reference images yet")).to_be_visible()
    expect(page.get_by_text("PNG, JPEG or WebP, up to 10 MB")).to_be_visible()

    upload(page, "eileen.png", astronaut_png())
    expect(page).to_have_url(re.compile(rf"/characters/{eileen}#references$"))
    expect(count_line(page)).to_have_text("1 of 8")
    thumb = page.get_by_role("img", name="Reference image 1 of Eileen")
    expect(thumb).to_be_visible()
    page.wait_for_function(
        "img => img.complete && img.naturalWidth > 0", arg=thumb.element_handle()
    )
    src = thumb.get_attribute("src")
    assert page.request.get(base + src).headers["content-type"] == "image/webp"
    full = page.request.get(base + src.replace("/thumb", "/file"))
    assert full.status == 200 and full.headers["content-type"] == "image/png"

    # The same picture again, and a file that is no picture: said in words, next to the form.
    upload(page, "again.png", astronaut_png())
    alert = page.locator("#reference-error")
    expect(alert).to_have_text(
        "This picture is already one of Eileen's reference images. "
        "Choose another picture to add a second one."
    )
    expect(page.get_by_label("Add a picture")).to_have_attribute("aria-invalid", "true")
    upload(page, "notes.png", b"shopping list: eggs, milk")
    expect(alert).to_contain_text("The file is not a PNG, JPEG or WebP picture.")
    assert "422" not in alert.inner_text() and "/api/" not in alert.inner_text()
    expect(count_line(page)).to_have_text("1 of 8")

    forged = page.request.post(
        f"{base}/characters/{eileen}/references",
        multipart={"file": {"name": "k.png", "mimeType": "image/png", "buffer": kafka_png()}},
    )
    assert forged.status == 403  # no CSRF token: refused, nothing added
    upload(page, "kafka.jpg", as_jpeg(kafka_png()), "image/jpeg")
    expect(count_line(page)).to_have_text("2 of 8")
    expect(alert).to_have_count(0)
    save_shot(page, "character-references-desktop")
    phone = new_page(width=PHONE)
    phone.context.add_cookies(page.context.cookies())
    phone.set_viewport_size({"width": PHONE, "height": 844})
    phone.goto(f"{base}/characters/{eileen}")
    expect(count_line(phone)).to_have_text("2 of 8")
    assert phone.evaluate("document.documentElement.scrollWidth") <= PHONE
    save_shot(phone, "character-references-phone")

    # Another user sees none of it.
    with container.db.session() as session:
        users.create_user(session, "bob", "bob-password")
    bob = new_page()
    bob.goto(base + "/login")
    bob.get_by_label("User name").fill("bob")
    bob.get_by_label("Password").fill("bob-password")
    bob.get_by_role("button", name="Sign in").click()
    assert bob.request.get(base + src).status == 404
    assert bob.request.get(base + src.replace("/thumb", "/file")).status == 404

    # Delete asks first; Cancel keeps it.
    with container.db.session() as session:
        first = refs.references_of(session, 1, eileen)[0]
        stored = container.store.path(first.file_path)
    assert stored.is_file()
    page.get_by_role("link", name="Delete reference image 1").click()
    expect(page.get_by_role("heading", level=1)).to_have_text(
        "Delete this reference image of Eileen?"
    )
    page.get_by_role("link", name="Cancel").click()
    expect(count_line(page)).to_have_text("2 of 8")
    page.get_by_role("link", name="Delete reference image 1").click()
    page.get_by_role("button", name="Delete reference image").click()
    expect(page).to_have_url(re.compile(rf"/characters/{eileen}#references$"))
    expect(count_line(page)).to_have_text("1 of 8")
    assert not stored.exists()
    assert page.request.get(base + src).status == 404


def test_the_character_form_saves_negative_prompt_strength_loras_and_seed(
    web: Any, new_page: Any, sims: tuple[A1111Simulator, A1111Simulator]
) -> None:
    server, container = web
    base = server.url
    page = new_page()
    first_run(page, base)
    page.goto(base + "/characters/new")
    expect(page.get_by_label("Reference strength")).to_have_value("0.6")
    expect(page.get_by_text("How strongly the character's reference images steer")).to_be_visible()
    page.get_by_label("Name").fill("Mina")
    page.get_by_label("Art style").select_option("realistic")
    page.get_by_label("Negative prompt").fill("glasses, beard")
    page.get_by_label("Reference strength").fill("0.8")
    page.get_by_text("Checkpoint, LoRAs and seed").click()
    page.get_by_label("LoRAs").fill("detail_tweaker:0.6\n<lora:film grain:1.2>\nfreckles")
    page.get_by_label("Fixed seed").fill("1234")
    page.get_by_role("button", name="Create character").click()
    expect(page.get_by_role("heading", level=1)).to_have_text("Mina")
    mina = page.url.rsplit("/", 1)[-1]
    expect(page.locator(".facts")).to_contain_text("glasses, beard")
    expect(page.locator(".facts")).to_contain_text("1234")
    expect(page.get_by_text("strength 0.8")).to_be_visible()
    with container.db.session() as session:
        saved = session.get(Character, mina)
        assert saved is not None
        assert saved.negative_prompt == "glasses, beard"
        assert saved.identity_strength == pytest.approx(0.8)
        assert saved.loras == [
            {"name": "detail_tweaker", "weight": 0.6},
            {"name": "film grain", "weight": 1.2},
            {"name": "freckles", "weight": 1.0},
        ]
        assert saved.seed == 1234

    # The edit form shows what was saved; a wrong LoRA line is named, what was typed stays.
    page.get_by_role("link", name="Edit").click()
    expect(page.get_by_label("Negative prompt")).to_have_value("glasses, beard")
    expect(page.get_by_label("Reference strength")).to_have_value("0.8")
    expect(page.get_by_label("LoRAs")).to_have_value(
        "detail_tweaker:0.6\nfilm grain:1.2\nfreckles:1"
    )
    expect(page.get_by_label("Fixed seed")).to_have_value("1234")
    page.get_by_label("LoRAs").fill("detail_tweaker:strong")
    page.get_by_role("button", name="Save").click()
    error = page.locator("#form-error")
    expect(error).to_contain_text(
        "LoRA line 1 (detail_tweaker): the weight must be a number from -5 to 5."
    )
    expect(page.get_by_label("LoRAs")).to_have_attribute("aria-invalid", "true")
    expect(page.get_by_label("LoRAs")).to_have_value("detail_tweaker:strong")
    expect(page.get_by_label("LoRAs")).to_be_visible()  # its section opened by itself
    save_shot(page, "character-form-error-desktop")

    # A strength out of range (the browser stops it; the server says it in words too).
    token = page.locator("#main input[name=csrf_token]").get_attribute("value")
    response = page.request.post(
        f"{base}/characters/{mina}/edit",
        form={
            "csrf_token": token,
            "name": "Mina",
            "art_style": "realistic",
            "generation_fields": "1",
            "identity_strength": "1.5",
        },
    )
    assert response.status == 422
    assert "Reference strength must be a number from 0 to 1" in response.text()

    page.get_by_label("LoRAs").fill("detail_tweaker:0.5")
    page.get_by_label("Fixed seed").fill("")
    page.get_by_role("button", name="Save").click()
    expect(page.get_by_role("heading", level=1)).to_have_text("Mina")
    with container.db.session() as session:
        saved = session.get(Character, mina)
        assert saved is not None
        assert saved.seed is None
        assert saved.loras == [{"name": "detail_tweaker", "weight": 0.5}]

    # What the character carries reaches the backend.
    page.goto(f"{base}/generate-images?characterId={mina}")
    expect(page.locator("#identity-box")).to_be_hidden()  # no reference images yet
    before = sims[0].settings
    sims[0].settings = dataclasses.replace(before, loras=["detail_tweaker.safetensors"])
    try:
        generate(page, "Mina in a cafe")
    finally:
        sims[0].settings = before
    sent = sims[0].txt2img_bodies()[-1]
    assert "<lora:detail_tweaker:0.5>" in sent["prompt"]
    assert "glasses, beard" in sent["negative_prompt"]


def test_a_generated_image_is_scored_shown_with_its_badge_and_promoted(
    controlnet: None,
    web: Any,
    new_page: Any,
    sims: tuple[A1111Simulator, A1111Simulator],
    photos: Any,
) -> None:
    server, _ = web
    base = server.url
    photos([on_canvas(astronaut_png(), 512, 768)])
    page = new_page()
    first_run(page, base)
    eileen = new_character(page, base, "Eileen", "realistic")
    upload(page, "eileen.png", astronaut_png())
    expect(count_line(page)).to_have_text("1 of 8")

    page.goto(f"{base}/generate-images?characterId={eileen}")
    box = page.locator("#identity-box")
    expect(box).to_be_visible()
    expect(box).to_contain_text("Eileen has 1 reference image")
    expect(page.get_by_label("Reference strength")).to_have_value("0.6")
    page.get_by_label("Retry until it is the same person").check()
    body = generate(page, "Eileen at the launch pad")
    assert body["identity"] == {"minScore": 0.5, "maxTries": 3}  # the strength is her own
    line = page.locator("#result-identity")
    expect(line).to_be_visible()
    badge = line.locator(".score")
    expect(badge).to_have_text(re.compile(r"^Same person 0\.\d\d"))
    expect(badge).to_have_class(re.compile("score-ok"))
    expect(line).to_contain_text("Same person after 1 try")
    # At 1280x800 the form sits beside the result: the new image is in view, whole, with the
    # page still at its top (nobody had to scroll to see it).
    page.set_viewport_size({"width": 1280, "height": 800})
    page.evaluate("window.scrollTo(0, 0)")
    picture = page.locator("#result-image")
    expect(picture).to_be_visible()
    page.wait_for_function("document.getElementById('result-image').complete")
    box_of = picture.bounding_box()
    assert box_of is not None and box_of["y"] >= 0 and box_of["y"] + box_of["height"] <= 800
    form_box = page.locator("#generate-form").bounding_box()
    assert form_box is not None and box_of["x"] > form_box["x"] + form_box["width"]  # beside
    SHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SHOTS / "generate-result-viewport-desktop.png"))  # what is in view
    save_shot(page, "generate-result-desktop")

    page.get_by_role("link", name="Open this image").click()
    expect(page.locator(".identity-row .score")).to_have_text(re.compile(r"^Same person 0\.\d\d"))
    facts = page.locator(".facts")
    expect(facts).to_contain_text("0.5 or more means the same person")
    expect(facts).to_contain_text("Same person after 1 try")
    expect(facts).to_contain_text(re.compile(r"Reference images\s*Used, strength 0\.6"))
    image_url = page.url
    save_shot(page, "image-badge-desktop")

    page.get_by_role("button", name="Use as reference").click()
    expect(page).to_have_url(re.compile(r"/images/[^/]+#reference$"))
    expect(page.get_by_role("status").filter(has_text="reference images")).to_have_text(
        re.compile(r"One of Eileen's reference images \(2 of 8\)")
    )
    expect(page.get_by_role("button", name="Use as reference")).to_have_count(0)
    page.get_by_role("link", name="See them all").click()
    expect(count_line(page)).to_have_text("2 of 8")
    expect(page.get_by_role("link", name="from an image")).to_have_attribute(
        "href", image_url.replace(base, "")
    )
    # The recent images and the history show the badge too.
    expect(page.locator("ul.thumbs .score").first).to_have_text(re.compile("^Same person"))
    page.goto(f"{base}/characters/{eileen}/images")
    expect(page.locator(".thumb-caption .score").first).to_have_text(re.compile("^Same person"))
    save_shot(page, "history-badge-desktop")

    phone = new_page(width=PHONE)
    phone.context.add_cookies(page.context.cookies())
    phone.set_viewport_size({"width": PHONE, "height": 844})
    phone.goto(image_url)
    assert phone.evaluate("document.documentElement.scrollWidth") <= PHONE
    save_shot(phone, "image-badge-phone")
    phone.goto(f"{base}/generate-images?characterId={eileen}")
    phone.get_by_label("Retry until it is the same person").check()
    generate(phone, "Eileen on the moon")
    expect(phone.locator("#result-identity .score")).to_be_visible()
    assert phone.evaluate("document.documentElement.scrollWidth") <= PHONE
    save_shot(phone, "generate-result-phone")


def test_other_faces_no_face_and_style_transfer_are_told_apart(
    web: Any,
    new_page: Any,
    sims: tuple[A1111Simulator, A1111Simulator],
    photos: Any,
) -> None:
    server, _ = web
    base = server.url
    # No ControlNet: the references cannot steer, the images are still checked against them.
    photos([on_canvas(astronaut_png(), 512, 768), cat_png()])
    page = new_page()
    first_run(page, base)
    franz = new_character(page, base, "Franz", "anime")
    upload(page, "franz.png", kafka_png())
    expect(count_line(page)).to_have_text("1 of 8")

    page.goto(f"{base}/generate-images?characterId={franz}")
    transfer = page.get_by_label("Style for this image")
    expect(transfer.locator("option[value=anime]")).to_be_disabled()  # its own style
    transfer.select_option("realistic")
    expect(page.locator("#indicator-text")).to_have_text(
        "🔵 Using Realistic Style (cyberrealistic.safetensors)"
    )
    expect(page.locator("#indicator-note")).to_contain_text("Franz keeps its own style")
    page.get_by_text("Advanced settings").click()
    page.get_by_label("Number of images").fill("2")
    body = generate(page, "Franz writing a letter")
    assert body["styleTransfer"] is True and body["artStyle"] == "realistic"
    assert "identity" not in body
    assert sims[0].txt2img_bodies(), "the realistic backend made it"

    line = page.locator("#result-identity")
    expect(line.locator(".score")).to_have_text(re.compile(r"^Different 0\.\d\d"))
    expect(line.locator(".score")).to_have_class(re.compile("score-warn"))
    expect(line).to_contain_text("Style transfer: 🟠 Anime → 🔵 Realistic")
    expect(line).to_contain_text("Reference images not used")
    second = page.locator("#result-more .score")
    expect(second).to_have_text(re.compile("^No face found"))
    assert "no face" in (second.get_attribute("title") or "").lower()
    save_shot(page, "generate-transfer-result-desktop")

    page.get_by_role("link", name="Open this image").click()
    expect(page.locator(".identity-row")).to_contain_text("Style transfer: 🟠 Anime → 🔵 Realistic")
    expect(page.locator(".facts")).to_contain_text("Franz keeps its own style")
    expect(page.locator(".facts")).to_contain_text("Not used:")
    save_shot(page, "image-style-transfer-desktop")
    page.get_by_role("link", name="Use these settings again").click()
    expect(page.get_by_label("Style for this image")).to_have_value("realistic")
    expect(page.locator("#indicator-text")).to_have_text(
        "🔵 Using Realistic Style (cyberrealistic.safetensors)"
    )
    page.go_back()
    page.get_by_role("link", name="Back to history").click()
    captions = page.locator(".thumb-caption .score")
    expect(captions).to_have_count(2)
    expect(captions.filter(has_text="No face found")).to_have_count(1)
    page.goto(f"{base}/characters/{franz}")
    expect(page.locator(".indicator")).to_contain_text("Anime")  # Franz kept his style


def _third_party_card(name: str, picture: bytes) -> bytes:
    card = {
        "spec": "chara_card_v2",
        "spec_version": "2.0",
        "data": {"name": name, "description": "A poet of the night.", "personality": ""},
    }
    info = PngImagePlugin.PngInfo()
    info.add_text("chara", base64.b64encode(json.dumps(card).encode()).decode())
    out = io.BytesIO()
    PILImage.open(io.BytesIO(picture)).save(out, format="PNG", pnginfo=info)
    return out.getvalue()


def test_a_card_is_imported_from_the_list_and_downloaded_again(
    web: Any, new_page: Any, sims: tuple[A1111Simulator, A1111Simulator]
) -> None:
    server, _ = web
    base = server.url
    page = new_page()
    first_run(page, base)
    form = page.locator("#import")
    expect(form).to_contain_text("SillyTavern character card")

    # Not a card: said in words.
    page.get_by_label("Card file").set_input_files(
        files=[{"name": "photo.png", "mimeType": "image/png", "buffer": astronaut_png()}]
    )
    page.get_by_role("button", name="Import card").click()
    alert = page.locator("#import-error")
    expect(alert).to_contain_text("This PNG is a picture without character card data in it.")
    expect(alert).to_contain_text("Choose a SillyTavern character card")
    save_shot(page, "characters-import-error-desktop")

    page.get_by_label("Card file").set_input_files(
        files=[
            {
                "name": "yue.png",
                "mimeType": "image/png",
                "buffer": _third_party_card("Yue", kafka_png()),
            }
        ]
    )
    page.get_by_label("Art style", exact=True).select_option("realistic")
    page.get_by_role("button", name="Import card").click()
    expect(page.get_by_role("heading", level=1)).to_have_text("Yue")
    expect(page.locator(".indicator")).to_contain_text("Realistic")
    expect(page.get_by_text("A poet of the night.")).to_be_visible()
    expect(count_line(page)).to_have_text("1 of 8")
    expect(page.get_by_text("from the card")).to_be_visible()

    with page.expect_download() as info:
        page.get_by_role("link", name="Download card").click()
    download = info.value
    assert download.suggested_filename == "Yue.png"
    parsed = parse_card(Path(download.path()).read_bytes())
    assert parsed.name == "Yue"
    assert parsed.description == "A poet of the night."
    assert parsed.charforge["artStyle"] == "realistic"
    assert parsed.picture is not None

    # The downloaded card comes back as a second Yue, with her style and picture.
    page.goto(base + "/characters")
    page.get_by_label("Card file").set_input_files(
        files=[
            {
                "name": "Yue.png",
                "mimeType": "image/png",
                "buffer": Path(download.path()).read_bytes(),
            }
        ]
    )
    page.get_by_role("button", name="Import card").click()
    expect(page.get_by_role("heading", level=1)).to_have_text("Yue")
    expect(page.locator(".indicator")).to_contain_text("Realistic")
    expect(count_line(page)).to_have_text("1 of 8")
    page.goto(base + "/characters")
    expect(page.locator(".card-name")).to_have_count(2)


def _plain_png(shade: int) -> bytes:
    out = io.BytesIO()
    PILImage.new("RGB", (64, 96), (shade, 90, 160)).save(out, format="PNG")
    return out.getvalue()


def test_a_full_set_of_reference_images_hides_the_upload_form(
    web: Any, new_page: Any, sims: tuple[A1111Simulator, A1111Simulator]
) -> None:
    server, container = web
    base = server.url
    page = new_page(width=PHONE)
    first_run(page, base)
    kai = new_character(page, base, "Kai", "anime")
    with container.db.session() as session:
        owner = users.require_user(session, "ada")
        for shade in range(8):
            references.add(session, container.store, owner, kai, _plain_png(shade * 20))
    page.goto(f"{base}/characters/{kai}")
    expect(count_line(page)).to_have_text("8 of 8")
    expect(page.get_by_label("Add a picture")).to_have_count(0)
    expect(page.get_by_text("Kai has 8 reference images, the most")).to_be_visible()
    assert page.evaluate("document.documentElement.scrollWidth") <= PHONE
