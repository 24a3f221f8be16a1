"""The admin page in real Chromium: an admin grants a user permissions, the audit log shows
the change, the user's account page shows the quota, and a non-admin is kept out."""

from __future__ import annotations

from typing import Any

from playwright.sync_api import expect

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
