"""What creators do in the browser: the walk of a new user, isolation, escaping, errors."""

from __future__ import annotations

import re
from typing import Any

from playwright.sync_api import expect

from charforge.services import users
from charforge.simulator import A1111Simulator
from tests.web.conftest import shot


def first_run(page: Any, base: str, name: str = "ada", password: str = "correct horse") -> None:
    page.goto(base + "/")
    expect(page).to_have_url(re.compile(r"/setup$"))
    page.get_by_label("User name").fill(name)
    page.get_by_label("Password", exact=True).fill(password)
    page.get_by_label("Repeat password").fill(password)
    page.get_by_role("button", name="Create account").click()
    expect(page).to_have_url(re.compile(r"/characters$"))


def new_character(page: Any, base: str, name: str, style: str, appearance: str = "") -> str:
    page.goto(base + "/characters/new")
    page.get_by_label("Name").fill(name)
    page.get_by_label("Appearance").fill(appearance)
    page.get_by_label("Art style").select_option(style)
    page.get_by_role("button", name="Create character").click()
    expect(page.get_by_role("heading", level=1)).to_have_text(name)
    return str(page.url.rsplit("/", 1)[-1])


def sign_in(page: Any, base: str, name: str, password: str) -> None:
    page.goto(base + "/login")
    page.get_by_label("User name").fill(name)
    page.get_by_label("Password").fill(password)
    page.get_by_role("button", name="Sign in").click()
    expect(page).to_have_url(re.compile(r"/characters$"))


def test_the_walk_of_a_new_user(
    web: Any, new_page: Any, sims: tuple[A1111Simulator, A1111Simulator]
) -> None:
    server, _ = web
    base = server.url
    page = new_page()
    first_run(page, base)
    shot(page, "01-characters-empty")

    sakura = new_character(page, base, "Sakura", "anime", "long pink hair, green eyes")
    new_character(page, base, "Alex", "realistic", "short brown hair, hiking jacket")
    page.goto(base + "/characters")
    roster = page.locator("ul.cards")  # the card import form below lists the styles too
    expect(roster.get_by_text("🔵 Realistic")).to_be_visible()
    expect(roster.get_by_text("cyberrealistic.safetensors")).to_be_visible()
    shot(page, "02-characters")

    page.goto(f"{base}/characters/{sakura}")
    page.locator("#main").get_by_role("link", name="Generate Images").click()
    expect(page).to_have_url(re.compile(rf"/generate-images\?characterId={sakura}$"))
    select = page.get_by_label("Character")
    expect(select).to_have_value(sakura)
    indicator = page.locator("#indicator-text")
    expect(indicator).to_have_text("🟠 Using Anime Style (diving.safetensors)")
    expect(
        page.get_by_text("Images will be generated using the same model as the original character")
    ).to_be_visible()
    shot(page, "03-generate-sakura")

    select.select_option(label="Alex")
    expect(indicator).to_have_text("🔵 Using Realistic Style (cyberrealistic.safetensors)")

    page.get_by_text("Advanced settings").click()
    expect(page.get_by_label("Steps", exact=True)).to_have_value("25")
    expect(page.get_by_label("CFG scale")).to_have_value("8.0")
    expect(page.get_by_label("High-resolution pass")).to_be_checked()
    page.get_by_label("Prompt", exact=True).fill("Alex on a mountain peak at sunset")
    page.get_by_label("Negative prompt").fill("blurry")
    sims[0].faults.delay_seconds = 1.5
    button = page.get_by_role("button", name="Generate")
    button.click()
    expect(button).to_be_disabled()
    expect(page.locator("#progress")).to_contain_text("Generating")
    expect(page.locator("#result")).to_be_visible(timeout=20000)
    expect(button).to_be_enabled()
    caption = page.locator("#result-caption")
    expect(caption).to_contain_text("Seed ")
    expect(caption).to_contain_text("cyberrealistic.safetensors")
    assert sims[0].txt2img_bodies()[-1]["prompt"].startswith("Alex on a mountain peak at sunset")
    shot(page, "04-generated")

    page.get_by_role("link", name="All images of this character").click()
    expect(page.get_by_role("heading", level=1)).to_contain_text("Image history")
    thumb = page.locator("ul.thumbs img").first
    expect(thumb).to_have_attribute("src", re.compile(r"/images/.+/thumb$"))
    shot(page, "05-history")
    thumb.click()  # the lightbox opens; its link leads to the image's own page
    page.get_by_role("link", name="Details and actions").click()
    expect(page.get_by_text("Alex on a mountain peak at sunset", exact=False).first).to_be_visible()
    expect(page.get_by_text("cyberrealistic.safetensors").first).to_be_visible()
    seed = page.locator("h1").inner_text().rsplit(" ", 1)[-1]
    # On a desktop the actions sit beside the picture, not below it.
    picture = page.locator("figure.image-picture img").bounding_box()
    action = page.get_by_role("link", name="Use these settings again").bounding_box()
    if page.viewport_size and page.viewport_size["width"] >= 1024:
        assert picture is not None and action is not None
        assert action["x"] >= picture["x"] + picture["width"] and action["y"] < 400
    shot(page, "06-image")

    page.get_by_role("link", name="Use these settings again").click()
    expect(page.get_by_label("Character")).to_have_value(re.compile(".+"))
    expect(page.locator("#indicator-text")).to_have_text(
        "🔵 Using Realistic Style (cyberrealistic.safetensors)"
    )
    expect(page.get_by_label("Prompt", exact=True)).to_have_value(
        "Alex on a mountain peak at sunset"
    )
    expect(page.get_by_label("Negative prompt")).to_have_value("blurry")
    expect(page.get_by_label("Seed")).to_have_value(seed)


def test_thumbnails_are_small_files_made_on_the_server(
    web: Any, new_page: Any, sims: tuple[A1111Simulator, A1111Simulator]
) -> None:
    server, _ = web
    page = new_page()
    first_run(page, server.url)
    sakura = new_character(page, server.url, "Sakura", "anime")
    page.goto(f"{server.url}/generate-images?characterId={sakura}")
    page.get_by_label("Prompt", exact=True).fill("at the beach")
    page.get_by_role("button", name="Generate").click()
    expect(page.locator("#result")).to_be_visible(timeout=20000)
    page.goto(f"{server.url}/characters/{sakura}/images")
    src = page.locator("ul.thumbs img").first.get_attribute("src")
    thumb = page.request.get(server.url + src)
    full = page.request.get(server.url + src.replace("/thumb", "/file"))
    assert thumb.headers["content-type"] == "image/webp"
    assert len(thumb.body()) * 5 < len(full.body())


def test_a_second_user_sees_nothing_of_the_first(
    web: Any, new_page: Any, sims: tuple[A1111Simulator, A1111Simulator]
) -> None:
    server, container = web
    base = server.url
    ada = new_page()
    first_run(ada, base)
    sakura = new_character(ada, base, "Sakura", "anime")
    ada.goto(f"{base}/generate-images?characterId={sakura}")
    ada.get_by_label("Prompt", exact=True).fill("tea ceremony")
    ada.get_by_role("button", name="Generate").click()
    expect(ada.locator("#result")).to_be_visible(timeout=20000)
    image_page = ada.locator("#result-page").get_attribute("href")

    with container.db.session() as session:
        users.create_user(session, "bob", "bob-password")
    bob = new_page()
    sign_in(bob, base, "bob", "bob-password")
    expect(bob.get_by_text("No characters yet")).to_be_visible()
    assert "Sakura" not in bob.content()
    for path in (
        f"/characters/{sakura}",
        f"/characters/{sakura}/edit",
        f"/characters/{sakura}/images",
        image_page,
    ):
        response = bob.goto(base + path)
        assert response.status == 404, path
        expect(bob.get_by_role("heading", level=1)).to_have_text("Not found")
        assert "Sakura" not in bob.content() and "tea ceremony" not in bob.content()
    assert bob.request.get(base + image_page + "/file").status == 404
    assert bob.request.get(base + image_page + "/thumb").status == 404

    bob.goto(f"{base}/generate-images?characterId={sakura}")
    expect(bob.get_by_text("You have no characters yet")).to_be_visible()
    assert "Sakura" not in bob.content()
    shot(bob, "07-second-user")


def test_user_text_is_never_markup(
    web: Any, new_page: Any, sims: tuple[A1111Simulator, A1111Simulator]
) -> None:
    server, _ = web
    page = new_page()
    dialogs: list[str] = []
    page.on("dialog", lambda dialog: (dialogs.append(dialog.message), dialog.dismiss()))
    first_run(page, server.url)
    evil = "<script>alert(1)</script>"
    character = new_character(page, server.url, evil, "anime", '"><img src=x onerror=alert(2)>')
    for path in ("/characters", f"/characters/{character}"):
        page.goto(server.url + path)
        expect(page.get_by_text(evil).first).to_be_visible()
    page.goto(f"{server.url}/generate-images?characterId={character}")
    expect(page.get_by_label("Character").locator("option:checked")).to_have_text(evil)
    page.get_by_label("Prompt", exact=True).fill("<b>bold</b> <script>alert(3)</script>")
    page.get_by_role("button", name="Generate").click()
    expect(page.locator("#result")).to_be_visible(timeout=20000)
    page.locator("#result-page").click()
    expect(page.get_by_text("<b>bold</b>", exact=False).first).to_be_visible()
    assert dialogs == []
    shot(page, "08-escaped")


def test_errors_are_shown_next_to_the_form_keeping_the_input(
    web: Any, new_page: Any, sims: tuple[A1111Simulator, A1111Simulator]
) -> None:
    server, _ = web
    page = new_page(width=390)  # a phone-width screen
    first_run(page, server.url)
    sakura = new_character(page, server.url, "Sakura", "anime")
    page.goto(f"{server.url}/generate-images?characterId={sakura}")
    page.get_by_label("Prompt", exact=True).fill("Sakura under cherry blossoms")

    sims[1].faults.fail_status = 500
    sims[1].faults.fail_message = "CUDA out of memory"
    page.get_by_role("button", name="Generate").click()
    alert = page.locator("#form-error")
    expect(alert).to_contain_text("CUDA out of memory")
    expect(page.get_by_label("Prompt", exact=True)).to_have_value("Sakura under cherry blossoms")
    shot(page, "09-backend-error-phone")

    sims[1].faults.fail_status = None
    page.get_by_text("Advanced settings").click()
    page.get_by_label("Width").fill("500")
    page.get_by_role("button", name="Generate").click()
    expect(alert).to_contain_text("multiple of 8")
    expect(page.get_by_label("Width")).to_have_attribute("aria-invalid", "true")

    page.get_by_label("Width").fill("512")
    page.get_by_role("button", name="Generate").click()
    expect(page.locator("#result")).to_be_visible(timeout=20000)
    expect(alert).to_be_hidden()


def test_forms_need_the_csrf_token_and_pages_need_sign_in(
    web: Any, new_page: Any, sims: tuple[A1111Simulator, A1111Simulator]
) -> None:
    server, _ = web
    page = new_page()
    anonymous = page.request.get(server.url + "/characters", max_redirects=0)
    assert anonymous.status == 303 and "/setup" not in anonymous.headers["location"]
    first_run(page, server.url)
    forged = page.request.post(server.url + "/characters/new", form={"name": "Forged"})
    assert forged.status in (403, 422)
    forged = page.request.post(
        server.url + "/characters/new", form={"name": "Forged", "csrf_token": "wrong"}
    )
    assert forged.status == 403
    page.goto(server.url + "/characters")
    assert "Forged" not in page.content()
    cookie = next(c for c in page.context.cookies() if c["name"] == "charforge_session")
    assert cookie["httpOnly"] and cookie["sameSite"] == "Lax"

    page.get_by_role("button", name=re.compile("Sign out")).click()
    expect(page).to_have_url(re.compile(r"/login$"))
    page.goto(server.url + "/generate-images")
    expect(page).to_have_url(re.compile(r"/login\?next=/generate-images$"))


def test_account_page_makes_and_revokes_tokens(
    web: Any, new_page: Any, sims: tuple[A1111Simulator, A1111Simulator]
) -> None:
    server, _ = web
    page = new_page()
    first_run(page, server.url)
    page.goto(server.url + "/account")
    page.get_by_label("Token label").fill("my app")
    page.get_by_role("button", name="Create token").click()
    token = page.locator("#new-token").inner_text()
    assert token.startswith("cf_")
    api = page.request.get(
        server.url + "/api/characters", headers={"Authorization": f"Bearer {token}"}
    )
    assert api.status == 200
    page.get_by_role("button", name="Revoke token my app").click()
    expect(page.get_by_text("revoked")).to_be_visible()
    again = page.request.get(
        server.url + "/api/characters", headers={"Authorization": f"Bearer {token}"}
    )
    assert again.status == 401
    shot(page, "10-account")
    # On a phone the tokens table is a card a row: nothing wider than the screen.
    page.set_viewport_size({"width": 390, "height": 844})
    page.get_by_role("button", name="Create token").click()
    assert page.evaluate("document.documentElement.scrollWidth") <= 390
    cell = page.locator("table.stacking td[data-label=Created]").first
    assert cell.evaluate("td => getComputedStyle(td).display") == "block"
    shot(page, "10-account-phone")


def test_character_form_errors_keep_what_was_typed(
    web: Any, new_page: Any, sims: tuple[A1111Simulator, A1111Simulator]
) -> None:
    server, _ = web
    page = new_page()
    first_run(page, server.url)
    page.goto(server.url + "/characters/new")
    token = page.locator("#main input[name=csrf_token]").get_attribute("value")
    response = page.request.post(
        server.url + "/characters/new",
        form={
            "csrf_token": token,
            "name": "   ",
            "appearance": "silver hair",
            "art_style": "fantasy",
        },
    )
    assert response.status == 422
    html = response.text()
    assert "A character name needs 1 to 100 characters." in html
    assert "silver hair" in html
    assert 'value="fantasy" selected' in html
