"""Advanced settings as A1111 users know them, over real HTTP: proven by the txt2img body the
A1111 stand-in received and by the image's infotext; upscalers checked against the WebUI; the
options endpoint the Generate page reads; saved presets."""

from __future__ import annotations

from typing import Any

import httpx
import pytest

from charforge.domain.infotext import parse_infotext
from charforge.simulator import A1111Simulator
from tests.api.test_generate import create, generate
from tests.api.test_templates import refused
from tests.conftest import Live
from tests.helpers import free_port

Sims = tuple[A1111Simulator, A1111Simulator]


def test_every_advanced_field_reaches_a1111_and_the_infotext(live: Live, sims: Sims) -> None:
    client = live.user("alice")
    sakura = create(client, "Sakura")
    response = generate(
        client,
        sakura,
        width=512,
        height=512,
        hires=True,
        hiresScale=2,
        hiresSteps=7,
        denoisingStrength=0.35,
        hiresUpscaler="r-esrgan 4x+",  # any case: sent as the WebUI spells it
        clipSkip=2,
    )
    assert response.status_code == 200, response.text
    sent = sims[1].txt2img_bodies()[-1]
    assert sent["enable_hr"] is True
    assert (sent["hr_scale"], sent["hr_second_pass_steps"]) == (2.0, 7)
    assert (sent["denoising_strength"], sent["hr_upscaler"]) == (0.35, "R-ESRGAN 4x+")
    assert sent["override_settings"]["CLIP_stop_at_last_layers"] == 2
    out = response.json()
    params = out["parameters"]
    assert (params["hiresScale"], params["hiresSteps"], params["clipSkip"]) == (2.0, 7, 2)
    assert (params["denoisingStrength"], params["hiresUpscaler"]) == (0.35, "R-ESRGAN 4x+")
    image = client.get(f"/api/images/{out['images'][0]['id']}").json()
    assert (image["width"], image["height"]) == (1024, 1024)
    fields = parse_infotext(image["infotext"])
    assert fields["Hires upscale"] == "2"
    assert fields["Hires steps"] == "7"
    assert fields["Hires upscaler"] == "R-ESRGAN 4x+"
    assert fields["Denoising strength"] == "0.35"
    assert fields["Clip skip"] == "2"


def test_clip_skip_1_is_sent_every_time(live: Live, sims: Sims) -> None:
    """Nothing is restored after a request (the checkpoint stays loaded), so a clip skip left
    out would be the previous request's: 1 is sent explicitly."""
    client = live.user("alice")
    sakura = create(client, "Sakura")
    assert generate(client, sakura, clipSkip=3, hires=False).status_code == 200
    assert generate(client, sakura, hires=False).status_code == 200
    first, second = sims[1].txt2img_bodies()[-2:]
    assert first["override_settings"]["CLIP_stop_at_last_layers"] == 3
    assert second["override_settings"]["CLIP_stop_at_last_layers"] == 1
    assert second["hr_second_pass_steps"] == 0  # A1111's "as many as steps"


def test_an_unknown_upscaler_is_a_422_listing_what_the_webui_has(live: Live, sims: Sims) -> None:
    client = live.user("alice")
    sakura = create(client, "Sakura")
    response = generate(client, sakura, hires=True, hiresUpscaler="Nope 4x")
    error = refused(response, 422, "hiresUpscaler")
    assert error["code"] == "upscaler_missing"
    assert "'Nope 4x'" in error["message"]
    assert "R-ESRGAN 4x+" in error["message"] and "Latent (bicubic)" in error["message"]
    assert sims[1].txt2img_bodies() == []
    # An upscaler model added to the WebUI since is found on a fresh read of its list.
    sims[1].settings.upscalers = ["4x-UltraSharp"]
    try:
        added = generate(client, sakura, hires=True, hiresUpscaler="4x-ultrasharp")
    finally:
        sims[1].settings.upscalers = []
    assert added.status_code == 200, added.text
    assert sims[1].txt2img_bodies()[-1]["hr_upscaler"] == "4x-UltraSharp"


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("hiresScale", 0.5),
        ("hiresScale", 4.5),
        ("hiresSteps", -1),
        ("hiresSteps", 151),
        ("denoisingStrength", 1.2),
        ("clipSkip", 0),
        ("clipSkip", 13),
        ("hiresUpscaler", "x" * 200),
    ],
)
def test_advanced_values_out_of_range_are_refused(
    live: Live, sims: Sims, field: str, value: Any
) -> None:
    client = live.user("alice")
    sakura = create(client, "Sakura")
    refused(generate(client, sakura, **{field: value}), 422, field)
    assert sims[1].txt2img_bodies() == []


def test_a_larger_hires_scale_is_held_to_the_output_limit(live: Live) -> None:
    client = live.user("alice")
    sakura = create(client, "Sakura")
    error = refused(generate(client, sakura, hires=True, hiresScale=4), 422, "hiresScale")
    assert "2048x3072" in error["message"]


def test_generation_options_come_from_the_characters_backends(live: Live, sims: Sims) -> None:
    alice, bob = live.user("alice"), live.user("bob")
    sakura = create(alice, "Sakura")
    path = f"/api/characters/{sakura['id']}/generation-options"
    response = alice.get(path)
    assert response.status_code == 200, response.text
    options = response.json()
    assert (options["source"], options["style"]) == ("backend", "anime")
    assert options["backends"] == ["anime-cartoon-fantasy"]
    assert {"DPM++ 2M", "Euler a"} <= set(options["samplers"])
    assert {"Automatic", "Karras"} <= set(options["schedulers"])
    assert options["upscalers"][:2] == ["Latent", "Latent (antialiased)"]
    assert "R-ESRGAN 4x+" in options["upscalers"]
    assert options["defaults"] == {
        "width": 512,
        "height": 768,
        "steps": 25,
        "cfgScale": 8.0,
        "sampler": "DPM++ 2M",
        "scheduler": "Karras",
        "hires": True,
        "hiresScale": 1.5,
        "hiresSteps": 0,
        "denoisingStrength": 0.5,
        "hiresUpscaler": "Latent",
        "clipSkip": 1,
    }
    asked = [r for r in sims[1].requests if r.path == "/sdapi/v1/upscalers"]
    assert alice.get(path).json() == options  # kept a minute: the WebUI is not asked again
    assert len([r for r in sims[1].requests if r.path == "/sdapi/v1/upscalers"]) == len(asked)
    refused(bob.get(path), 404, "characterId")


def test_generation_options_fall_back_to_builtin_lists(live_factory: Any, sims: Sims) -> None:
    live: Live = live_factory(sims[0].url, f"http://127.0.0.1:{free_port()}")  # nobody there
    client = live.user("alice")
    sakura = create(client, "Sakura")
    options = client.get(f"/api/characters/{sakura['id']}/generation-options").json()
    assert (options["source"], options["backends"]) == ("builtin", [])
    assert "DPM++ 2M" in options["samplers"] and "R-ESRGAN 4x+" in options["upscalers"]


# -- presets ---------------------------------------------------------------------------------


def test_presets_are_saved_changed_and_private(live: Live) -> None:
    alice, bob = live.user("alice"), live.user("bob")
    settings = {"steps": 30, "sampler": "Euler a", "hires": True, "hiresScale": 2, "clipSkip": 2}
    made = alice.post("/api/presets", json={"name": "Crisp", "params": settings})
    assert made.status_code == 201, made.text
    preset = made.json()
    assert preset["params"] == {**settings, "hiresScale": 2.0}
    path = f"/api/presets/{preset['id']}"
    assert made.headers["location"] == path
    assert alice.get(path).json() == preset
    assert [p["name"] for p in alice.get("/api/presets").json()["items"]] == ["Crisp"]

    refused(alice.post("/api/presets", json={"name": "Crisp", "params": {}}), 409, "name")
    for response in (bob.get(path), bob.patch(path, json={"name": "x"}), bob.delete(path)):
        refused(response, 404, None)
    assert bob.get("/api/presets").json()["items"] == []

    changed = alice.patch(path, json={"params": {"steps": 20}})
    assert changed.status_code == 200, changed.text
    assert changed.json()["params"] == {"steps": 20} and changed.json()["name"] == "Crisp"
    renamed = alice.patch(path, json={"name": "Quick"}).json()
    assert renamed["params"] == {"steps": 20} and renamed["name"] == "Quick"
    assert alice.delete(path).status_code == 204
    assert alice.get(path).status_code == 404


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"name": "P", "params": {"stepz": 10}}, "params.stepz"),
        ({"name": "P", "params": {"prompt": "x"}}, "params.prompt"),
        ({"name": "P", "params": {"clipSkip": 20}}, "params.clipSkip"),
        ({"name": "P", "params": {"denoisingStrength": -0.1}}, "params.denoisingStrength"),
        ({"name": "P", "colour": "red"}, "colour"),
        ({"params": {"steps": 10}}, "name"),
        ({"name": " ", "params": {}}, "name"),
    ],
)
def test_a_preset_with_unknown_or_bad_settings_is_refused(
    live: Live, body: dict[str, Any], field: str
) -> None:
    client: httpx.Client = live.user("alice")
    refused(client.post("/api/presets", json=body), 422, field)
