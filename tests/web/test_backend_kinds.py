"""The Generate page offers only what the selected character's backends can do."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from playwright.sync_api import expect

from charforge.api.app import create_app
from charforge.config import BackendConfig, RouteConfig
from charforge.container import build_container
from charforge.simulator import A1111Simulator
from tests.conftest import make_settings
from tests.fakes.comfyui import USER_WORKFLOW, FakeComfyUI
from tests.helpers import LiveServer
from tests.web.conftest import shot
from tests.web.test_pages import first_run, new_character


@pytest.fixture
def mixed_web(
    tmp_path: Path, sims: tuple[A1111Simulator, A1111Simulator]
) -> Iterator[tuple[LiveServer, FakeComfyUI]]:
    """Anime on the A1111 simulator; fantasy on a ComfyUI running the user's own one-pass
    workflow (no high-resolution pass)."""
    workflow = tmp_path / "workflow.json"
    workflow.write_text(json.dumps(USER_WORKFLOW))
    with FakeComfyUI(["diving.safetensors"]) as comfy:
        settings = make_settings(
            tmp_path / "data",
            f"sqlite:///{tmp_path / 'web.db'}",
            sims[0].url,
            sims[1].url,
            backends={"mine": BackendConfig(kind="comfyui", url=comfy.url, workflow=workflow)},
            routes={"fantasy": RouteConfig(backends=["mine"])},
        )
        server = LiveServer(create_app(build_container(settings))).start()
        yield server, comfy
        server.stop()


def test_the_hires_switch_follows_the_characters_backends(
    mixed_web: tuple[LiveServer, FakeComfyUI], new_page: Any
) -> None:
    server, comfy = mixed_web
    page = new_page()
    first_run(page, server.url)
    sakura = new_character(page, server.url, "Sakura", "anime")
    fae = new_character(page, server.url, "Fae", "fantasy")

    page.goto(f"{server.url}/generate-images?characterId={sakura}")
    page.locator("#advanced summary").click()
    hires = page.get_by_label("High-resolution pass")
    note = page.locator("#hires-note")
    expect(hires).to_be_enabled()
    expect(hires).to_be_checked()
    expect(note).to_be_hidden()

    page.get_by_label("Character").select_option(fae)
    expect(hires).to_be_disabled()
    expect(hires).not_to_be_checked()
    expect(note).to_be_visible()
    expect(note).to_have_text("This character's backends have no high-resolution pass.")
    shot(page, "30-hires-unavailable")

    page.get_by_label("Prompt", exact=True).fill("Fae in a moonlit forest")
    page.get_by_label("Width").fill("64")
    page.get_by_label("Height").fill("64")
    page.get_by_role("button", name="Generate").click()
    expect(page.locator("#result")).to_be_visible(timeout=20000)
    expect(page.locator("#form-error")).to_be_hidden()
    (graph,) = comfy.prompts()
    assert graph["ckpt"]["inputs"]["ckpt_name"] == "diving.safetensors"
    assert graph["pos"]["inputs"]["text"].startswith("Fae in a moonlit forest")

    page.get_by_label("Character").select_option(sakura)  # the user's choice comes back
    expect(hires).to_be_enabled()
    expect(hires).to_be_checked()
    expect(note).to_be_hidden()
