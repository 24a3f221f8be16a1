"""The Generate page's template picker, advanced settings and presets in real Chromium, at
1280x800 and 390x844; the A1111 stand-in proves what was sent."""

from __future__ import annotations

import json
import re
from typing import Any
from urllib.parse import urlencode

from playwright.sync_api import expect

from charforge.simulator import A1111Simulator
from tests.web.conftest import shot
from tests.web.test_pages import first_run, new_character

Sims = tuple[A1111Simulator, A1111Simulator]
DESKTOP = {"width": 1280, "height": 800}
PHONE = {"width": 390, "height": 844}


def no_sideways_scroll(page: Any) -> None:
    assert page.evaluate(
        "document.documentElement.scrollWidth <= document.documentElement.clientWidth"
    ), "the page scrolls sideways"


def submit(page: Any) -> dict[str, Any]:
    """Click Generate; the JSON the page sent."""
    with page.expect_request(
        lambda r: r.url.endswith("/generate-images/jobs") and r.method == "POST"
    ) as info:
        page.get_by_role("button", name="Generate").click()
    body: dict[str, Any] = json.loads(info.value.post_data or "{}")
    return body


def test_a_template_fills_the_prompt_from_its_blanks(web: Any, new_page: Any, sims: Sims) -> None:
    server, _ = web
    page = new_page()
    page.set_viewport_size(DESKTOP)
    first_run(page, server.url)
    sakura = new_character(page, server.url, "Sakura", "anime", "long pink hair")
    page.goto(f"{server.url}/generate-images?characterId={sakura}")
    prompt = page.get_by_label("Prompt", exact=True)

    picker = page.get_by_label("Prompt template")
    picker.select_option(label="Outfit change")
    outfit = page.get_by_label("Outfit")
    expect(outfit).to_be_visible()
    expect(prompt).to_have_js_property("readOnly", True)
    expect(prompt).to_have_value(re.compile(r"^Sakura wearing \{outfit\}, elegant pose"))
    outfit.fill("a red evening dress")
    expect(prompt).to_have_value(re.compile(r"^Sakura wearing a red evening dress, elegant pose"))
    shot(page, "40-template-picker-desktop")

    sent = submit(page)
    assert sent["templateId"] == "builtin-outfit-change"
    assert sent["variables"] == {"outfit": "a red evening dress"}
    assert "prompt" not in sent
    expect(page.locator("#result")).to_be_visible(timeout=20000)
    assert sims[1].txt2img_bodies()[-1]["prompt"].startswith("Sakura wearing a red evening dress")

    # A blank left empty is shown on its own input, and nothing is sent to the WebUI.
    before = len(sims[1].txt2img_bodies())
    picker.select_option(label="Action scene")
    expect(page.get_by_label("Outfit")).to_have_count(0)
    page.get_by_label("Action").fill("casting a spell")
    page.get_by_role("button", name="Generate").click()
    background = page.get_by_label("Background")
    expect(page.locator("#form-error")).to_contain_text("needs a value for {background}")
    expect(background).to_have_attribute("aria-invalid", "true")
    assert len(sims[1].txt2img_bodies()) == before
    # The template's settings filled the advanced settings (Action scene: 30 steps).
    expect(page.get_by_label("Steps", exact=True)).to_have_value("30")

    # "None" keeps the text, now to edit freely.
    picker.select_option(value="")
    expect(prompt).to_have_js_property("readOnly", False)
    expect(prompt).to_have_value(re.compile(r"^Sakura casting a spell, \{background\}"))
    expect(page.locator("#template-slots")).to_be_hidden()

    page.set_viewport_size(PHONE)
    picker.select_option(label="New environment")
    page.get_by_label("Place").fill("on a mountain peak")
    page.get_by_label("Lighting").fill("golden hour lighting")
    expect(prompt).to_have_value(re.compile(r"^Sakura standing on a mountain peak, golden hour"))
    no_sideways_scroll(page)
    shot(page, "41-template-picker-phone")


def test_advanced_settings_from_the_webui_and_presets(web: Any, new_page: Any, sims: Sims) -> None:
    server, _ = web
    page = new_page()
    page.set_viewport_size(DESKTOP)
    first_run(page, server.url)
    sakura = new_character(page, server.url, "Sakura", "anime")
    page.goto(f"{server.url}/generate-images?characterId={sakura}")
    page.get_by_text("Advanced settings").click()
    expect(page.locator("#options-source")).to_contain_text("anime style's WebUI lists them")

    page.get_by_label("Sampler").select_option("Euler a")
    page.get_by_label("Scheduler").select_option("Karras")
    page.get_by_label("Width").fill("512")
    page.get_by_label("Height").fill("512")
    page.get_by_label("Upscaler").select_option("R-ESRGAN 4x+")
    page.get_by_label("Upscale by").fill("2")
    page.get_by_label("Hires steps").fill("5")
    page.get_by_label("Denoising strength").fill("0.4")
    page.get_by_label("Clip skip").fill("2")
    page.get_by_label("Preset name").fill("Crisp")
    page.get_by_role("button", name="Save as preset").click()
    status = page.locator("#preset-status")
    expect(status).to_have_text("Saved “Crisp”.")
    expect(page.get_by_label("Saved preset")).to_have_value(re.compile(".+"))
    shot(page, "42-advanced-settings-desktop")

    page.get_by_label("Prompt", exact=True).fill("Sakura at a ballroom")
    sent = submit(page)
    assert (sent["hiresUpscaler"], sent["hiresScale"], sent["clipSkip"]) == ("R-ESRGAN 4x+", 2, 2)
    expect(page.locator("#result")).to_be_visible(timeout=20000)
    body = sims[1].txt2img_bodies()[-1]
    assert (body["sampler_name"], body["scheduler"]) == ("Euler a", "Karras")
    assert (body["hr_upscaler"], body["hr_scale"], body["hr_second_pass_steps"]) == (
        "R-ESRGAN 4x+",
        2.0,
        5,
    )
    assert body["denoising_strength"] == 0.4
    assert body["override_settings"]["CLIP_stop_at_last_layers"] == 2

    # The same name again is refused next to the name; then a fresh page applies the preset.
    page.get_by_label("Preset name").fill("Crisp")
    page.get_by_role("button", name="Save as preset").click()
    expect(status).to_contain_text("already have a preset named 'Crisp'")
    expect(page.get_by_label("Preset name")).to_have_attribute("aria-invalid", "true")

    page.set_viewport_size(PHONE)
    page.goto(f"{server.url}/generate-images?characterId={sakura}")
    page.get_by_text("Advanced settings").click()
    expect(page.get_by_label("Clip skip")).to_have_value("1")
    page.get_by_label("Saved preset").select_option(label="Crisp")
    page.get_by_role("button", name="Apply preset").click()
    expect(status).to_have_text("Applied “Crisp”.")
    expect(page.get_by_label("Clip skip")).to_have_value("2")
    expect(page.get_by_label("Upscaler")).to_have_value("R-ESRGAN 4x+")
    expect(page.get_by_label("Sampler")).to_have_value("Euler a")
    expect(page.get_by_label("Hires steps")).to_have_value("5")
    no_sideways_scroll(page)
    shot(page, "43-advanced-settings-phone")


def test_settings_in_the_link_open_the_advanced_section_filled(
    web: Any, new_page: Any, sims: Sims
) -> None:
    """What "Use these settings again" sends: the page reads every advanced field."""
    server, _ = web
    page = new_page()
    page.set_viewport_size(DESKTOP)
    first_run(page, server.url)
    sakura = new_character(page, server.url, "Sakura", "anime")
    page.goto(f"{server.url}/generate-images?characterId={sakura}")
    expect(page.locator("#advanced")).not_to_have_attribute("open", "")
    query = {
        "characterId": sakura,
        "prompt": "Sakura in the rain",
        "sampler": "Euler a",
        "hires": "1",
        "hiresScale": "1.75",
        "hiresSteps": "6",
        "denoisingStrength": "0.3",
        "hiresUpscaler": "4x-MyOwnModel",  # not in the lists: still offered, as it was used
        "clipSkip": "3",
    }
    page.goto(f"{server.url}/generate-images?{urlencode(query)}")
    expect(page.locator("#advanced")).to_have_attribute("open", "")
    expect(page.get_by_label("Sampler")).to_have_value("Euler a")
    expect(page.get_by_label("Upscale by")).to_have_value("1.75")
    expect(page.get_by_label("Hires steps")).to_have_value("6")
    expect(page.get_by_label("Denoising strength")).to_have_value("0.3")
    expect(page.get_by_label("Clip skip")).to_have_value("3")
    expect(page.locator("#options-source")).to_contain_text("WebUI lists them")  # lists loaded
    expect(page.get_by_label("Upscaler")).to_have_value("4x-MyOwnModel")
    shot(page, "44-settings-from-link-desktop")
