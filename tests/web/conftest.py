"""Real Chromium (Debian's, via Playwright's executable_path) against a live charforge."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from charforge.api.app import create_app
from charforge.container import build_container
from charforge.simulator import A1111Simulator
from tests.conftest import make_settings
from tests.helpers import LiveServer

CHROMIUM = (
    os.environ.get("CHARFORGE_TEST_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
)
SCREENSHOTS = Path(__file__).resolve().parents[2] / "test-artifacts" / "screenshots"
# As root in a sandbox with no network: no sandbox, no background fetches that would fail.
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


@pytest.fixture(scope="session")
def browser() -> Iterator[Any]:
    if not Path(CHROMIUM).exists():
        if os.environ.get("CI"):
            pytest.fail(f"Chromium is required in CI and is missing at {CHROMIUM}")
        pytest.skip("Chromium not installed (apt-get install -y chromium)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


@pytest.fixture
def web(tmp_path: Path, sims: tuple[A1111Simulator, A1111Simulator]) -> Iterator[Any]:
    """A live charforge on SQLite with the two simulators as its backends."""
    settings = make_settings(
        tmp_path / "data", f"sqlite:///{tmp_path / 'web.db'}", sims[0].url, sims[1].url
    )
    container = build_container(settings)
    server = LiveServer(create_app(container)).start()
    yield server, container
    server.stop()


@pytest.fixture
def new_page(browser: Any) -> Iterator[Any]:
    contexts: list[Any] = []

    def make(width: int = 1280) -> Any:
        context = browser.new_context(viewport={"width": width, "height": 900})
        contexts.append(context)
        return context.new_page()

    yield make
    for context in contexts:
        context.close()


def shot(page: Any, name: str) -> None:
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SCREENSHOTS / f"{name}.png"), full_page=True)
