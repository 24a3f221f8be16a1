"""A character's own checkpoint is checked against its route's backends when it is created or
changed: a 422 naming it where the backends answer, accepted as before where none answers."""

from __future__ import annotations

import dataclasses
import json
import re
import socket
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from charforge.services.checkpoint_check import BackendCheckpoints
from charforge.simulator import A1111Simulator, SimulatorSettings
from tests.conftest import Live
from tests.helpers import free_port
from tests.web.test_security import HTML, csrf_of, setup_admin

FIELD = "imageGeneration.model"


def post(
    client: httpx.Client, name: str, model: str, style: str | None = "anime"
) -> httpx.Response:
    body: dict[str, Any] = {"name": name, "imageGeneration": {"model": model}}
    if style is not None:
        body["artStyle"] = {"primaryStyle": style}
    return client.post("/api/characters", json=body)


def title_of(sim: A1111Simulator, name: str) -> str:
    """The checkpoint as A1111 titles it: ``name [hash]``."""
    models = httpx.get(f"{sim.url}/sdapi/v1/sd-models").json()
    return str(next(m["title"] for m in models if m["model_name"] == name))


def wait_probed(live: Live) -> None:
    deadline = time.monotonic() + 10
    while not all(s.checked for s in live.container.pool.statuses()):
        assert time.monotonic() < deadline, live.container.pool.statuses()
        time.sleep(0.02)


def listings(sim: A1111Simulator) -> int:
    return sum(r.path == "/sdapi/v1/sd-models" for r in sim.requests)


def test_a_checkpoint_the_route_has_is_accepted_in_every_spelling(
    live: Live, sims: tuple[A1111Simulator, A1111Simulator]
) -> None:
    client = live.user("alice")
    titled = title_of(sims[1], "other")
    assert titled.startswith("other.safetensors [")
    for number, spelling in enumerate(["other.safetensors", "other", titled]):
        made = post(client, f"Mika {number}", spelling)
        assert made.status_code == 201, (spelling, made.text)
        assert made.json()["imageGeneration"]["model"] == spelling
    # No style yet: any route may serve it, so every backend is asked.
    assert post(client, "Styleless", "other", style=None).status_code == 201


def test_an_unknown_checkpoint_is_a_422_naming_it_and_what_the_route_has(
    live: Live, sims: tuple[A1111Simulator, A1111Simulator]
) -> None:
    client = live.user("alice")
    response = post(client, "Mika", "mika-merge.safetensors")
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert error["code"] == "validation_error" and error["field"] == FIELD
    assert "'mika-merge.safetensors'" in error["message"]
    assert "anime style" in error["message"] and "anime-cartoon-fantasy" in error["message"]
    assert "diving.safetensors, other.safetensors" in error["hint"]
    assert "(diving.safetensors)" in error["hint"]  # the style's own, to fall back to
    assert client.get("/api/characters").json() == []
    assert sims[1].txt2img_bodies() == []

    # Another route's checkpoint is not this route's: the anime backend lacks it.
    other_route = post(client, "Alex", "cyberrealistic.safetensors [0123456789]", style="fantasy")
    assert other_route.status_code == 422 and other_route.json()["error"]["field"] == FIELD
    assert "fantasy style" in other_route.json()["error"]["message"]

    # Without a style every backend was asked, and none has it.
    styleless = post(client, "Nobody", "nowhere", style=None)
    assert styleless.status_code == 422, styleless.text
    message = styleless.json()["error"]["message"]
    assert "'nowhere'" in message and "realistic" in message and "anime-cartoon-fantasy" in message

    # A card imported with a model of its own is checked the same way.
    card = json.dumps({"spec": "chara_card_v2", "spec_version": "2.0", "data": {"name": "Ash"}})
    imported = client.post(
        "/api/characters/import?artStyle=anime&model=nowhere.safetensors",
        content=card.encode(),
        headers={"Content-Type": "application/json"},
    )
    assert imported.status_code == 422 and imported.json()["error"]["field"] == FIELD
    assert client.get("/api/characters").json() == []


def test_a_patch_to_an_unknown_checkpoint_is_refused_and_changes_nothing(
    live: Live, sims: tuple[A1111Simulator, A1111Simulator]
) -> None:
    client = live.user("alice")
    mika = post(client, "Mika", "other.safetensors").json()
    path = f"/api/characters/{mika['id']}"

    refused = client.patch(
        path, json={"name": "Renamed", "imageGeneration": {"model": "typo.safetensors"}}
    )
    assert refused.status_code == 422, refused.text
    assert refused.json()["error"]["field"] == FIELD
    assert "'typo.safetensors'" in refused.json()["error"]["message"]
    stored = client.get(path).json()
    assert stored["name"] == "Mika" and stored["imageGeneration"]["model"] == "other.safetensors"

    # Moving to a route whose backends lack it is refused too (realistic's WebUI has no
    # diving), and one whose backends have it is accepted.
    moved = client.patch(
        path, json={"artStyle": "realistic", "imageGeneration": {"model": "diving.safetensors"}}
    )
    assert moved.status_code == 422 and "realistic style" in moved.json()["error"]["message"]
    assert client.get(path).json()["artStyle"] == {"primaryStyle": "anime"}
    ok = client.patch(path, json={"artStyle": "realistic", "imageGeneration": {"model": "other"}})
    assert ok.status_code == 200, ok.text
    assert ok.json()["artStyle"] == {"primaryStyle": "realistic"}
    assert ok.json()["imageGeneration"]["model"] == "other"


def test_an_unchanged_checkpoint_asks_no_backend(
    live_factory: Any, sims: tuple[A1111Simulator, A1111Simulator], monkeypatch: Any
) -> None:
    live = live_factory(sims[0].url, sims[1].url, health_interval=600.0)
    wait_probed(live)  # the monitor's first probe; the next is 10 minutes away
    client = live.user("alice")
    mika = post(client, "Mika", "other.safetensors").json()
    asked: list[str] = []
    require = BackendCheckpoints.require

    def spy(self: BackendCheckpoints, checkpoint: str, style: str | None, *, field: str) -> None:
        asked.append(checkpoint)
        require(self, checkpoint, style, field=field)

    monkeypatch.setattr(BackendCheckpoints, "require", spy)
    sims[1].clear_requests()
    same = client.patch(
        f"/api/characters/{mika['id']}",
        json={"appearance": "short hair", "imageGeneration": {"model": "other"}},
    )
    assert same.status_code == 200, same.text
    # The style's own checkpoint is the operator's, reported by GET /api/styles: not asked.
    assert post(client, "Kai", "diving.safetensors").status_code == 201
    assert asked == [] and listings(sims[1]) == 0
    # A changed one is asked (from the listing the pool probed moments ago).
    changed = client.patch(
        f"/api/characters/{mika['id']}", json={"imageGeneration": {"model": "diving"}}
    )
    assert changed.status_code == 200 and asked == []  # diving is the style's own
    back = client.patch(
        f"/api/characters/{mika['id']}", json={"imageGeneration": {"model": "other"}}
    )
    assert back.status_code == 200 and asked == ["other"]


def test_with_the_route_down_the_checkpoint_is_accepted(
    live_factory: Any, sims: tuple[A1111Simulator, A1111Simulator]
) -> None:
    live = live_factory(sims[0].url, f"http://127.0.0.1:{free_port()}")
    client = live.user("alice")
    started = time.monotonic()
    made = post(client, "Mika", "nowhere.safetensors")
    assert made.status_code == 201, made.text
    assert time.monotonic() - started < 5
    # The other route still answers, and still refuses what it lacks.
    refused = post(client, "Alex", "nowhere.safetensors", style="realistic")
    assert refused.status_code == 422 and "realistic style" in refused.json()["error"]["message"]


@pytest.fixture
def silent_port() -> Iterator[int]:
    """A port that takes connections and never answers (a hung WebUI)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(16)
        yield int(sock.getsockname()[1])


def test_a_backend_that_hangs_costs_the_probe_timeout_and_is_not_a_refusal(
    live_factory: Any, sims: tuple[A1111Simulator, A1111Simulator], silent_port: int
) -> None:
    live = live_factory(sims[0].url, f"http://127.0.0.1:{silent_port}", probe_timeout=1.0)
    client = live.user("alice")
    started = time.monotonic()
    made = post(client, "Mika", "nowhere.safetensors")
    assert made.status_code == 201, made.text
    assert time.monotonic() - started < 4


def test_one_answering_backend_of_the_pool_decides_and_the_silent_one_is_named(
    live_factory: Any, sims: tuple[A1111Simulator, A1111Simulator]
) -> None:
    dead = f"http://127.0.0.1:{free_port()}"
    live = live_factory(sims[0].url, f"{dead},{sims[1].url}")
    client = live.user("alice")
    assert post(client, "Mika", "other").status_code == 201
    refused = post(client, "Nobody", "nowhere.safetensors")
    assert refused.status_code == 422, refused.text
    message = refused.json()["error"]["message"]
    assert "(anime-cartoon-fantasy-2)" in message  # the one that answered
    assert "Not asked or not answering: anime-cartoon-fantasy." in message


def test_a_file_added_since_the_last_listing_is_found(
    live_factory: Any, sims: tuple[A1111Simulator, A1111Simulator]
) -> None:
    settings = SimulatorSettings(models=["diving.safetensors"], name="growing")
    with A1111Simulator(settings) as webui:
        live = live_factory(sims[0].url, webui.url)
        client = live.user("alice")
        assert post(client, "Before", "fresh.safetensors").status_code == 422
        # Dropped into the models folder: A1111 lists it only after a rescan, which the check
        # asks for before it refuses (as a job does before it fails).
        webui.settings = dataclasses.replace(
            settings, models=["diving.safetensors", "fresh.safetensors"]
        )
        made = post(client, "After", "fresh")
        assert made.status_code == 201, made.text


def test_the_character_form_shows_the_refusal_on_the_checkpoint_field(
    live: Live, sims: tuple[A1111Simulator, A1111Simulator]
) -> None:
    with httpx.Client(base_url=live.url, timeout=30) as browser:
        setup_admin(browser)
        form = {"name": "Kai", "art_style": "anime"}
        refused = browser.post(
            "/characters/new",
            data={
                **form,
                "model": "kai.safetensors",
                "csrf_token": csrf_of(browser, "/characters/new"),
            },
            headers=HTML,
        )
        assert refused.status_code == 422
        assert "kai.safetensors" in refused.text and "diving.safetensors" in refused.text
        assert re.search(
            r'id="model" name="model" value="kai.safetensors"[^>]*aria-invalid', refused.text
        )
        created = browser.post(
            "/characters/new",
            data={**form, "model": "other", "csrf_token": csrf_of(browser, "/characters/new")},
        )
        assert created.status_code == 303, created.text
        edit = created.headers["location"] + "/edit"
        again = browser.post(
            edit,
            data={**form, "model": "gone.safetensors", "csrf_token": csrf_of(browser, edit)},
            headers=HTML,
        )
        assert again.status_code == 422 and "gone.safetensors" in again.text
