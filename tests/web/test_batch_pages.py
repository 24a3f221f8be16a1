"""The batch pages in real Chromium: prompts one a line, a failing one reported on its own item
while the others are made, the page following the batch to its end, at desktop and phone width."""

from __future__ import annotations

from typing import Any

from playwright.sync_api import expect

from charforge.simulator import A1111Simulator
from tests.web.conftest import shot
from tests.web.test_pages import first_run, new_character


def test_a_batch_from_the_page(
    web: Any, new_page: Any, sims: tuple[A1111Simulator, A1111Simulator]
) -> None:
    server, _ = web
    base = server.url
    sims[1].faults.nan_prompts = ["cursed"]
    page = new_page()
    first_run(page, base)
    new_character(page, base, "Sakura", "anime", "pink hair")
    page.get_by_role("navigation", name="Main").get_by_role("link", name="Batches").click()
    page.get_by_label("Prompts, one a line").fill("at the beach\n\na cursed mirror\nin the snow\n")
    page.get_by_label("Images per prompt").fill("2")
    page.get_by_role("button", name="Start batch").click()
    # The page follows the batch by itself until it ends.
    expect(page.locator("#batch-state")).to_contain_text("partial", timeout=30_000)
    expect(page.locator("#batch-state")).to_contain_text("2 of 3 done, 1 failed; 4 images")
    failed = page.locator("#item-2")
    expect(failed).to_contain_text("a cursed mirror")
    expect(failed.locator(".error")).to_contain_text("NaN")
    expect(page.locator("#item-3 img")).to_have_count(2)
    page.wait_for_function(  # lazy thumbnails load in a moment; each must be a real picture
        "img => img.complete && img.naturalWidth > 0",
        arg=page.locator("#item-1 img").first.element_handle(),
    )
    expect(page.get_by_role("button", name="Cancel the rest")).to_have_count(0)
    shot(page, "batch-desktop")
    page.set_viewport_size({"width": 390, "height": 844})
    assert page.evaluate("document.documentElement.scrollWidth") <= 390
    shot(page, "batch-phone")
    page.get_by_role("link", name="All batches").click()
    expect(page.locator(".batch-list li").first).to_contain_text("partial")

    # A prompt count over the limit is refused on the form, keeping what was typed.
    page.get_by_label("Prompts, one a line").fill("on a rooftop")
    page.get_by_label("Images per prompt").fill("99")
    page.get_by_role("button", name="Start batch").click()
    expect(page.get_by_role("alert")).to_contain_text("Images per prompt: 1 to 16")
    expect(page.get_by_label("Prompts, one a line")).to_have_value("on a rooftop")
    sims[1].faults.nan_prompts = []
