"""The admin page in real Chromium: an admin grants a user permissions, the audit log shows
the change, the user's account page shows the quota, and a non-admin is kept out."""

from __future__ import annotations

from typing import Any

import httpx
from playwright.sync_api import expect

from charforge.safety.screening import Screening, shared_screener
from charforge.services import users
from tests.web.conftest import shot
from tests.web.test_pages import first_run, sign_in


def test_admin_edits_permissions_and_reads_the_audit_log(browser: Any, web: Any) -> None:
    server, container = web
    base = server.url
    page = browser.new_page()
    first_run(page, base, "ada", "correct horse")  # the first account is the admin
    with container.db.session() as session:
        users.create_user(session, "bob", "bob-password")

    page.goto(base + "/account")
    page.get_by_role("navigation", name="Main").get_by_role("link", name="Admin").click()
    bob = page.locator("#user-bob")
    bob.get_by_label("May request NSFW images").check()
    bob.get_by_label("Allowed styles (comma-separated)").fill("anime, Fantasy")
    bob.get_by_label("Images per day").fill("7")
    bob.get_by_role("button", name="Save bob").click()
    expect(page.get_by_role("heading", level=1)).to_have_text("Admin")
    expect(page.locator("#user-bob").get_by_label("Images per day")).to_have_value("7")
    row = page.locator("#audit tbody tr").first
    expect(row).to_contain_text("ada")
    expect(row).to_contain_text("user:bob")
    expect(row).to_contain_text('"fantasy"')
    with container.db.session() as session:
        granted = users.require_user(session, "bob").permissions or {}
    assert granted == {"nsfw": True, "styles": ["anime", "fantasy"], "imagesPerDay": 7}

    page.locator("#user-bob").get_by_label("Images per day").fill("seven")
    page.locator("#user-bob").get_by_role("button", name="Save bob").click()
    expect(page.get_by_role("alert")).to_contain_text("imagesPerDay must be a whole number")

    other = browser.new_page()
    sign_in(other, base, "bob", "bob-password")
    other.goto(base + "/account")
    expect(other.locator("#usage-images")).to_contain_text("0 of 7")
    expect(
        other.get_by_role("navigation", name="Main").get_by_role("link", name="Admin")
    ).to_have_count(0)
    response = other.goto(base + "/admin")
    assert response is not None and response.status == 403
    page.set_viewport_size({"width": 390, "height": 844})
    page.goto(base + "/admin")
    shot(page, "admin-phone")
    page.set_viewport_size({"width": 1280, "height": 800})
    shot(page, "admin-desktop")
    page.close()
    other.close()


def test_admin_reviews_withheld_images(browser: Any, web: Any) -> None:
    server, container = web
    container.runner.screening = Screening(0.0, shared_screener())  # withhold every image
    base = server.url
    page = browser.new_page(viewport={"width": 1280, "height": 800})
    first_run(page, base, "ada", "correct horse")
    with container.db.session() as session:
        _, token = users.create_token(session, users.create_user(session, "bob", "bob-pass"))
    with httpx.Client(base_url=base, headers={"Authorization": f"Bearer {token}"}) as bob:
        made = bob.post(
            "/api/characters", json={"name": "Sakura", "artStyle": {"primaryStyle": "anime"}}
        ).json()
        for prompt in ("at the beach", "in the snow"):
            answer = bob.post(
                "/api/image-generation/generate",
                json={"prompt": prompt, "characterId": made["id"]},
                timeout=60,
            )
            assert answer.json()["error"]["code"] == "content_withheld"

        page.goto(base + "/admin")
        expect(page.get_by_role("heading", name="Withheld images (2)")).to_be_visible()
        beach = page.locator(".withheld", has_text="at the beach")
        expect(beach).to_contain_text("Sakura by bob")
        picture = beach.get_by_role("img")
        expect(picture).to_be_hidden()  # not shown until the admin asks
        beach.get_by_text("Show image").click()
        expect(picture).to_be_visible()
        # Lazy: it loads once shown, which may take a moment; it must then be a real picture.
        page.wait_for_function(
            "img => img.complete && img.naturalWidth > 0", arg=picture.element_handle()
        )
        page.set_viewport_size({"width": 390, "height": 844})
        shot(page, "admin-withheld-phone")
        page.set_viewport_size({"width": 1280, "height": 800})
        shot(page, "admin-withheld-desktop")

        beach.get_by_role("button", name="Release to bob").click()
        expect(page.get_by_role("heading", name="Withheld images (1)")).to_be_visible()
        history = bob.get(f"/api/characters/{made['id']}/images").json()["items"]
        assert ["at the beach" in i["prompt"] for i in history] == [True]

        page.locator(".withheld", has_text="in the snow").get_by_role(
            "button", name="Delete"
        ).click()
        expect(page.get_by_role("heading", name="Withheld images")).to_be_visible()
        expect(page.get_by_text("None: every image made so far passed")).to_be_visible()
        row = page.locator("#audit tbody tr").first
        expect(row).to_contain_text("quarantine.delete")
    page.close()
