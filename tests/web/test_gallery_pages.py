"""The gallery in Chromium: search and filters, captions, thumbnails that keep their place
while they load, favourites, the lightbox by keyboard, deletion confirmed (with and without
script), the ZIP; on a desktop (1280x800) and a phone (390x844)."""

from __future__ import annotations

import io
import re
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from playwright.sync_api import expect

from charforge.services import users
from charforge.simulator import A1111Simulator
from tests.web.conftest import SCREENSHOTS, shot
from tests.web.test_pages import first_run, new_character

DESKTOP = {"width": 1280, "height": 800}
PHONE = {"width": 390, "height": 844}
PROMPTS = [
    "in a garden at dawn",
    "at the beach, golden hour",
    "reading in a library",
    "on a rooftop at night",
    "at the beach, stormy sky",
    "walking in the rain",
    "at a lantern festival",
]


def api_for(container: Any, base: str, name: str = "ada") -> httpx.Client:
    with container.db.session() as session:
        _, token = users.create_token(session, users.require_user(session, name), "gallery")
    return httpx.Client(base_url=base, headers={"Authorization": f"Bearer {token}"}, timeout=60)


def make_images(api: httpx.Client, character_id: str, prompts: list[str]) -> list[str]:
    """One image per prompt, oldest first; returns their ids newest first."""
    made: list[str] = []
    for prompt in prompts:
        body = {"prompt": prompt, "characterId": character_id, "width": 256, "height": 384}
        response = api.post("/api/image-generation/generate", json={**body, "hires": False})
        assert response.status_code == 200, response.text
        made.append(response.json()["images"][0]["id"])
    return made[::-1]


@pytest.fixture
def gallery(
    web: Any, new_page: Any, sims: tuple[A1111Simulator, A1111Simulator]
) -> Iterator[tuple[Any, str, str, list[str], httpx.Client]]:
    """A signed-in desktop page, Sakura with 7 images (ids newest first), an API client."""
    server, container = web
    page = new_page()
    page.set_viewport_size(DESKTOP)
    first_run(page, server.url)
    sakura = new_character(page, server.url, "Sakura", "anime", "long pink hair, green eyes")
    with api_for(container, server.url) as api:
        made = make_images(api, sakura, PROMPTS)
        yield page, server.url, sakura, made, api


def until(page: Any, script: str, timeout: float = 10) -> None:
    """page.wait_for_function evaluates a string, which the pages' policy forbids."""
    deadline = time.monotonic() + timeout
    while not page.evaluate(script):
        assert time.monotonic() < deadline, script
        time.sleep(0.05)


def in_view_shot(page: Any, name: str) -> None:
    """What the screen shows (a modal dialog sits in the viewport, not on the full page)."""
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SCREENSHOTS / f"{name}.png"))


def no_sideways_scroll(page: Any) -> None:
    assert page.evaluate("document.documentElement.scrollWidth <= window.innerWidth")


def test_the_gallery_searches_filters_and_keeps_its_layout_while_loading(
    gallery: Any, new_page: Any
) -> None:
    page, base, sakura, made, api = gallery
    # Thumbnails held back: their boxes must already have the pictures' shape.
    held: list[Any] = []
    released = False

    def hold(route: Any) -> None:
        if released:
            route.continue_()
        else:
            held.append(route)

    page.route(re.compile(r".*/images/[^/]+/thumb$"), hold)
    page.goto(f"{base}/characters/{sakura}/images", wait_until="domcontentloaded")
    expect(page.get_by_role("heading", level=1)).to_contain_text("Image history")
    thumbs = page.locator("ul.thumbs img")
    expect(thumbs).to_have_count(7)
    boxes = (
        "Array.from(document.querySelectorAll('.shot')).map(e => {"
        "const r = e.getBoundingClientRect(); return [r.x, r.y, r.width, r.height];})"
    )
    before = page.evaluate(boxes)
    first = page.evaluate("document.querySelector('ul.thumbs img').getBoundingClientRect().height")
    assert first > 100  # 256x384 at ~11rem wide: reserved before a byte of it arrived
    released = True
    for route in held:
        route.continue_()
    until(
        page,
        "Array.from(document.querySelectorAll('ul.thumbs img'))"
        ".every(i => i.complete && i.naturalWidth > 0)",
    )
    assert page.evaluate(boxes) == before  # nothing moved when the pictures came in
    page.unroute(re.compile(r".*/images/[^/]+/thumb$"))

    # Captions: the prompt, the date and the model.
    first_shot = page.locator(".shot").first
    expect(first_shot.locator(".caption-prompt")).to_contain_text("at a lantern festival")
    expect(first_shot.locator(".caption-meta")).to_contain_text(
        re.compile(r"\d{4}-\d\d-\d\d \d\d:\d\d · diving")
    )
    expect(page.locator(".count")).to_have_text("7 images")
    no_sideways_scroll(page)
    shot(page, "gallery-desktop")

    # Search, then favourites only; the filters stay in the form.
    page.get_by_label("Search prompts").fill("BEACH")
    page.get_by_role("button", name="Search").click()
    expect(page).to_have_url(re.compile(r"q=BEACH"))
    expect(thumbs).to_have_count(2)
    expect(page.get_by_label("Search prompts")).to_have_value("BEACH")
    star = page.locator(".shot").nth(1).get_by_role("button", name="Favourite")
    expect(star).to_have_attribute("aria-pressed", "false")
    star.click()  # with script: no reload
    expect(star).to_have_attribute("aria-pressed", "true")
    expect(page.get_by_label("Search prompts")).to_have_value("BEACH")
    assert api.get(f"/api/images/{made[5]}").json()["favorite"] is True
    page.get_by_label("Favourites only").check()
    page.get_by_role("button", name="Search").click()
    expect(thumbs).to_have_count(1)
    expect(page.locator(".caption-prompt")).to_have_text(re.compile("at the beach, golden hour"))
    shot(page, "gallery-filtered-desktop")
    page.get_by_label("Search prompts").fill("")
    page.get_by_label("From").fill("2001-01-01")
    page.get_by_label("To").fill("2001-12-31")
    page.get_by_role("button", name="Search").click()
    expect(page.get_by_text("No images match.")).to_be_visible()
    page.get_by_role("link", name="Clear", exact=True).click()
    expect(thumbs).to_have_count(7)

    # The whole gallery as a ZIP, from the page.
    with page.expect_download() as download:
        page.get_by_role("link", name="Download all (ZIP)").click()
    archive = zipfile.ZipFile(io.BytesIO(Path(download.value.path()).read_bytes()))
    assert len(archive.namelist()) == 8 and "metadata.json" in archive.namelist()

    # A phone: one column of pictures, no sideways scrolling.
    phone = new_page()
    phone.context.add_cookies(page.context.cookies())
    phone.set_viewport_size(PHONE)
    phone.goto(f"{base}/characters/{sakura}/images")
    expect(phone.locator("ul.thumbs img")).to_have_count(7)
    no_sideways_scroll(phone)
    shot(phone, "gallery-phone")


def test_the_lightbox_by_keyboard(gallery: Any, new_page: Any) -> None:
    page, base, sakura, made, _ = gallery
    page.goto(f"{base}/characters/{sakura}/images")
    box = page.locator("#lightbox")
    picture = page.locator("#lightbox-image")
    page.locator("ul.thumbs a.open").first.click()
    expect(box).to_be_visible()
    expect(page.locator("#lightbox-count")).to_have_text("1 of 7")
    expect(picture).to_have_attribute("src", f"/images/{made[0]}/file")
    expect(page.locator("#lightbox-caption")).to_contain_text("at a lantern festival")
    until(page, "document.getElementById('lightbox-image').naturalWidth > 0")
    in_view_shot(page, "gallery-lightbox-desktop")
    page.keyboard.press("ArrowRight")
    expect(page.locator("#lightbox-count")).to_have_text("2 of 7")
    expect(picture).to_have_attribute("src", f"/images/{made[1]}/file")
    page.keyboard.press("ArrowRight")
    page.keyboard.press("ArrowLeft")
    expect(page.locator("#lightbox-count")).to_have_text("2 of 7")
    expect(page.locator("#lightbox-caption")).to_contain_text("walking in the rain")
    for _ in range(8):  # past the end: it stays on the last
        page.keyboard.press("ArrowRight")
    expect(page.locator("#lightbox-count")).to_have_text("7 of 7")
    expect(page.locator("#lightbox-next")).to_be_disabled()
    expect(page.get_by_role("link", name="Details and actions")).to_have_attribute(
        "href", f"/images/{made[6]}"
    )
    page.keyboard.press("Escape")
    expect(box).to_be_hidden()
    # Focus is back on the picture the viewer ended on.
    until(page, f"document.activeElement.getAttribute('href') === '/images/{made[6]}'")

    phone = new_page()
    phone.context.add_cookies(page.context.cookies())
    phone.set_viewport_size(PHONE)
    phone.goto(f"{base}/characters/{sakura}/images")
    phone.locator("ul.thumbs a.open").nth(2).click()
    expect(phone.locator("#lightbox-count")).to_have_text("3 of 7")
    until(phone, "document.getElementById('lightbox-image').naturalWidth > 0")
    no_sideways_scroll(phone)
    in_view_shot(phone, "gallery-lightbox-phone")


def test_deleting_asks_first_with_and_without_script(gallery: Any, browser: Any) -> None:
    page, base, sakura, made, api = gallery
    page.goto(f"{base}/characters/{sakura}/images?q=at")
    shots = page.locator(".shot")
    expect(shots).to_have_count(5)
    shots.nth(0).get_by_role("link", name="Delete").click()
    dialog = page.get_by_role("dialog", name="Delete this image?")
    expect(dialog).to_be_visible()
    in_view_shot(page, "gallery-delete-confirm-desktop")
    dialog.get_by_role("button", name="Cancel").click()
    expect(dialog).to_be_hidden()
    expect(shots).to_have_count(5)
    shots.nth(0).get_by_role("link", name="Delete").click()
    dialog.get_by_role("button", name="Delete image").click()
    expect(page).to_have_url(re.compile(r"/images\?q=at$"))  # back with the search kept
    expect(shots).to_have_count(4)
    assert api.get(f"/api/images/{made[0]}").status_code == 404

    # Without script: the link leads to a confirmation page; favourites post and come back.
    context = browser.new_context(java_script_enabled=False, viewport=PHONE)
    try:
        context.add_cookies(page.context.cookies())
        plain = context.new_page()
        plain.goto(f"{base}/characters/{sakura}/images")
        expect(plain.locator(".shot")).to_have_count(6)
        plain.locator(".shot").first.get_by_role("button", name="Favourite").click()
        expect(plain).to_have_url(re.compile(rf"/characters/{sakura}/images$"))
        expect(
            plain.locator(".shot").first.get_by_role("button", name="Favourite")
        ).to_have_attribute("aria-pressed", "true")
        plain.locator(".shot").first.get_by_role("link", name="Delete").click()
        expect(plain.get_by_role("heading", level=1)).to_have_text("Delete this image of Sakura?")
        no_sideways_scroll(plain)
        shot(plain, "gallery-delete-confirm-page-phone")
        plain.get_by_role("button", name="Delete image").click()
        expect(plain).to_have_url(re.compile(rf"/characters/{sakura}/images$"))
        expect(plain.locator(".shot")).to_have_count(5)
        assert api.get(f"/api/images/{made[1]}").status_code == 404
        # The lightbox's links still lead somewhere: the image's own page.
        plain.locator("ul.thumbs a.open").first.click()
        expect(plain).to_have_url(re.compile(r"/images/[^/]+$"))
        expect(plain.get_by_label("Your note")).to_be_visible()
        plain.get_by_label("Your note").fill("keep this one")
        plain.get_by_role("button", name="Save note").click()
        expect(plain.get_by_label("Your note")).to_have_value("keep this one")
        shot(plain, "image-note-phone")
    finally:
        context.close()
