"""The original generate endpoint end to end over HTTP, against A1111 simulators."""

from __future__ import annotations

import io
from typing import Any

import httpx
import pytest
from PIL import Image

from charforge.domain.infotext import parse_infotext
from charforge.simulator import A1111Simulator
from tests.conftest import Live
from tests.helpers import character_whose_checkpoint_went_away, free_port

EXAMPLES = [
    # (name, style, prompt, which simulator, checkpoint) -- the seed's three usage examples
    (
        "Sakura",
        "anime",
        "Sakura wearing a beautiful red evening dress, formal ballroom setting, elegant pose, sparkling jewelry",
        "anime",
        "diving.safetensors",
    ),
    (
        "Alex",
        "realistic",
        "Alex standing on a mountain peak at sunset, hiking gear, dramatic landscape, golden hour lighting",
        "realistic",
        "cyberrealistic.safetensors",
    ),
    (
        "Eldara",
        "fantasy",
        "Eldara casting a powerful spell, magical energy swirling around her, mystical forest background, dynamic action pose",
        "anime",
        "diving.safetensors",
    ),
]


def create(
    client: httpx.Client, name: str, style: str | None = "anime", **extra: Any
) -> dict[str, Any]:
    body: dict[str, Any] = {"name": name, "appearance": f"{name} look", **extra}
    if style is not None:
        body["artStyle"] = {"primaryStyle": style}
    response = client.post("/api/characters", json=body)
    assert response.status_code == 201, response.text
    return dict(response.json())


def generate(
    client: httpx.Client, character: dict[str, Any], prompt: str = "in a garden", **extra: Any
) -> httpx.Response:
    body = {
        "prompt": prompt,
        "characterId": character["id"],
        "characterName": character["name"],
        **extra,
    }
    return client.post("/api/image-generation/generate", json=body)


@pytest.mark.parametrize(("name", "style", "prompt", "target", "checkpoint"), EXAMPLES)
def test_seed_examples_reach_the_right_backend_with_the_right_settings(
    live: Live,
    sims: tuple[A1111Simulator, A1111Simulator],
    name: str,
    style: str,
    prompt: str,
    target: str,
    checkpoint: str,
) -> None:
    realistic, anime = sims
    chosen, other = (anime, realistic) if target == "anime" else (realistic, anime)
    client = live.user("alice")
    character = create(client, name, style)
    assert character["imageGeneration"]["model"] == checkpoint

    response = generate(client, character, prompt)

    assert response.status_code == 200, response.text
    result = response.json()
    assert result["artStyle"] == style
    assert result["model"] == checkpoint
    assert result["characterId"] == character["id"]
    assert result["backend"] == ("anime-cartoon-fantasy" if target == "anime" else "realistic")
    assert result["simulated"] is False  # simulated only in --demo, where the config says so
    assert len(result["images"]) == 1
    assert result["parameters"]["steps"] == 25 and result["parameters"]["cfgScale"] == 8

    sent = chosen.txt2img_bodies()
    assert len(sent) == 1 and other.txt2img_bodies() == []
    body = sent[0]
    assert body["override_settings"]["sd_model_checkpoint"].startswith(checkpoint)
    assert body["override_settings_restore_afterwards"] is False
    assert (body["width"], body["height"], body["steps"], body["cfg_scale"]) == (512, 768, 25, 8.0)
    assert body["enable_hr"] is True and body["hr_scale"] == 1.5
    assert body["denoising_strength"] == 0.5
    assert body["hr_additional_modules"] == ["Use same choices"]
    assert body["prompt"].startswith(prompt) and body["prompt"].endswith(f"{name} look")
    assert "nsfw" in body["negative_prompt"]

    image = result["images"][0]
    # The hires pass makes 768x1152 although A1111's info still says 512x768.
    assert (image["width"], image["height"]) == (768, 1152)
    file = client.get(image["url"])
    assert file.status_code == 200 and file.headers["content-type"] == "image/png"
    with Image.open(io.BytesIO(file.content)) as png:
        assert png.size == (768, 1152)
        info = parse_infotext(png.info["parameters"])
    assert info["Prompt"] == body["prompt"]
    assert info["Seed"] == str(image["seed"])
    assert info["Model"] == checkpoint.removesuffix(".safetensors")
    assert info["Steps"] == "25" and info["CFG scale"] == "8" and info["Size"] == "512x768"
    assert "Model hash" in info and info["Art style"] == style


def test_seed_body_as_the_original_page_sends_it(
    live: Live, sims: tuple[A1111Simulator, A1111Simulator]
) -> None:
    client = live.user("alice")
    character = create(client, "Sakura", "anime")
    response = client.post(
        "/api/image-generation/generate",
        json={
            "prompt": "Sakura at the beach",
            "negativePrompt": "blurry",
            "characterId": character["id"],
            "characterName": "Sakura",
            "artStyle": "anime",
            "model": "diving.safetensors",
            "steps": 25,
            "cfgScale": 8,
            "nsfw": False,
            "seed": 1234,
        },
    )
    assert response.status_code == 200, response.text
    assert response.json()["images"][0]["seed"] == 1234
    body = sims[1].txt2img_bodies()[0]
    assert body["seed"] == 1234 and body["negative_prompt"].startswith("blurry")


def test_older_character_goes_to_anime_and_keeps_it(
    live: Live, sims: tuple[A1111Simulator, A1111Simulator]
) -> None:
    client = live.user("alice")
    old = create(client, "Oldie", style=None)
    assert old["artStyle"] is None and old["imageGeneration"]["model"] is None

    response = generate(client, old)
    assert response.status_code == 200, response.text
    assert (response.json()["artStyle"], response.json()["model"]) == (
        "anime",
        "diving.safetensors",
    )
    stored = client.get(f"/api/characters/{old['id']}").json()
    assert stored["artStyle"] == {"primaryStyle": "anime"}
    assert stored["imageGeneration"]["model"] == "diving.safetensors"
    assert stored["imageGeneration"]["modelHash"]  # remembered from the first run

    # From now on it is an anime character: a realistic request contradicts it.
    clash = generate(client, old, artStyle="realistic")
    assert clash.status_code == 409
    assert sims[0].txt2img_bodies() == []


def test_older_character_takes_the_style_of_its_first_request(
    live: Live, sims: tuple[A1111Simulator, A1111Simulator]
) -> None:
    client = live.user("alice")
    old = create(client, "Oldie", style=None)
    response = generate(client, old, artStyle="Realistic")
    assert response.status_code == 200, response.text
    assert response.json()["model"] == "cyberrealistic.safetensors"
    assert (
        client.get(f"/api/characters/{old['id']}").json()["artStyle"]["primaryStyle"] == "realistic"
    )
    assert len(sims[0].txt2img_bodies()) == 1


@pytest.mark.parametrize(
    ("extra", "field"),
    [({"artStyle": "realistic"}, "artStyle"), ({"model": "cyberrealistic.safetensors"}, "model")],
)
def test_mismatching_request_is_409_and_nothing_is_generated(
    live: Live, sims: tuple[A1111Simulator, A1111Simulator], extra: dict[str, str], field: str
) -> None:
    client = live.user("alice")
    sakura = create(client, "Sakura", "anime")
    response = generate(client, sakura, **extra)
    assert response.status_code == 409
    error = response.json()["error"]
    assert error["code"] == "style_mismatch" and error["field"] == field
    assert "anime" in error["message"] and "diving.safetensors" in error["message"]
    assert "styleTransfer" in error["hint"]
    assert sims[0].txt2img_bodies() == [] and sims[1].txt2img_bodies() == []


@pytest.mark.parametrize(
    ("patch", "field"),
    [
        ({"prompt": ""}, "prompt"),
        ({"prompt": "x" * 2001}, "prompt"),
        ({"width": 500}, "width"),
        ({"height": 4096}, "height"),
        ({"width": 32}, "width"),
        ({"steps": 0}, "steps"),
        ({"steps": 151}, "steps"),
        ({"cfgScale": 0.5}, "cfgScale"),
        ({"cfgScale": 31}, "cfgScale"),
        ({"seed": -5}, "seed"),
        ({"artStyle": "watercolor"}, "artStyle"),
        ({"steps": "many"}, "steps"),
    ],
)
def test_limits_give_a_422_naming_the_field(
    live: Live, sims: tuple[A1111Simulator, A1111Simulator], patch: dict[str, Any], field: str
) -> None:
    client = live.user("alice")
    sakura = create(client, "Sakura", "anime")
    body = {"prompt": "ok", "characterId": sakura["id"], **patch}
    response = client.post("/api/image-generation/generate", json=body)
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert error["code"] == "validation_error"
    assert error["field"] == field
    assert field in error["message"]
    if field == "width" and patch["width"] == 500:
        assert "multiple of 8" in error["message"] and "496 or 504" in error["message"]
    if field == "artStyle":
        assert "anime, cartoon, fantasy, realistic" in error["message"]
    assert sims[1].txt2img_bodies() == []


def test_missing_character_and_bad_json(
    live: Live, sims: tuple[A1111Simulator, A1111Simulator]
) -> None:
    client = live.user("alice")
    missing = client.post("/api/image-generation/generate", json={"prompt": "x"})
    assert missing.status_code == 422 and missing.json()["error"]["field"] == "characterId"
    unknown = client.post(
        "/api/image-generation/generate", json={"prompt": "x", "characterId": "nope"}
    )
    assert unknown.status_code == 404 and unknown.json()["error"]["field"] == "characterId"
    broken = client.post(
        "/api/image-generation/generate",
        content=b"{not json",
        headers={"content-type": "application/json"},
    )
    assert broken.status_code == 422 and broken.json()["error"]["code"] == "validation_error"
    assert broken.json()["error"]["field"] is None
    assert "not valid JSON" in broken.json()["error"]["message"]


def _last_job(client: httpx.Client, response: httpx.Response) -> dict[str, Any]:
    job_id = response.json()["error"]["jobId"]
    job = client.get(f"/api/jobs/{job_id}")
    assert job.status_code == 200
    return dict(job.json())


def _no_images(client: httpx.Client, character: dict[str, Any]) -> None:
    history = client.get(f"/api/characters/{character['id']}/images").json()
    assert history["items"] == []


def test_backend_down_is_502_naming_style_backend_and_env_var(
    live_factory: Any, sims: tuple[A1111Simulator, A1111Simulator]
) -> None:
    live = live_factory(sims[0].url, f"http://127.0.0.1:{free_port()}")
    client = live.user("alice")
    sakura = create(client, "Sakura", "anime")
    response = generate(client, sakura)
    assert response.status_code == 502
    error = response.json()["error"]
    assert error["code"] == "backend_unavailable"
    assert "anime" in error["message"] and "anime-cartoon-fantasy" in error["message"]
    assert "RUNPOD_ANIME_CARTOON_FANTASY_URL" in error["hint"]
    job = _last_job(client, response)
    assert job["state"] == "failed" and job["error"]["code"] == "backend_unavailable"
    _no_images(client, sakura)


def test_slow_backend_is_504_with_the_timeout_to_raise(
    live_factory: Any, sims: tuple[A1111Simulator, A1111Simulator]
) -> None:
    live = live_factory(sims[0].url, sims[1].url, backend_timeout=1.0)
    sims[1].faults.delay_seconds = 3.0
    client = live.user("alice")
    sakura = create(client, "Sakura", "anime")
    response = generate(client, sakura)
    assert response.status_code == 504
    error = response.json()["error"]
    assert error["code"] == "backend_timeout"
    assert "anime-cartoon-fantasy" in error["message"] and "1s" in error["message"]
    assert (
        "CHARFORGE_BACKEND_TIMEOUT" in error["hint"]
        and "RUNPOD_ANIME_CARTOON_FANTASY_URL" in error["hint"]
    )
    assert _last_job(client, response)["state"] == "failed"
    _no_images(client, sakura)


def test_backend_500_passes_a1111s_message_on(
    live: Live, sims: tuple[A1111Simulator, A1111Simulator]
) -> None:
    sims[1].faults.fail_status = 500
    sims[1].faults.fail_message = "CUDA out of memory. Tried to allocate 2.00 GiB"
    client = live.user("alice")
    sakura = create(client, "Sakura", "anime")
    response = generate(client, sakura)
    assert response.status_code == 502
    error = response.json()["error"]
    assert error["code"] == "backend_error"
    assert "CUDA out of memory. Tried to allocate 2.00 GiB" in error["message"]
    assert "HTTP 500" in error["message"]
    assert _last_job(client, response)["state"] == "failed"
    _no_images(client, sakura)


def test_checkpoint_missing_is_503_naming_both(
    live: Live, sims: tuple[A1111Simulator, A1111Simulator]
) -> None:
    client = live.user("alice")
    made = character_whose_checkpoint_went_away(
        live, "alice", "Mika", "mika-lora-merge.safetensors"
    )
    custom = client.get(f"/api/characters/{made}").json()
    response = generate(client, custom)
    assert response.status_code == 503
    error = response.json()["error"]
    assert error["code"] == "checkpoint_missing"
    assert (
        "mika-lora-merge.safetensors" in error["message"]
        and "anime-cartoon-fantasy" in error["message"]
    )
    assert "diving.safetensors" in error["message"]  # what the backend does have
    assert sims[1].txt2img_bodies() == []
    _no_images(client, custom)


def test_backend_ignoring_the_checkpoint_never_yields_an_off_model_image(
    live: Live, sims: tuple[A1111Simulator, A1111Simulator]
) -> None:
    realistic = sims[0]
    client = live.user("alice")
    alex = create(client, "Alex", "realistic")
    # Load another model, then make the WebUI ignore the override (A1111's silent fallback).
    realistic.faults.ignore_checkpoint = False
    first = client.post(
        "/api/image-generation/generate", json={"prompt": "x", "characterId": alex["id"]}
    )
    assert first.status_code == 200
    other = create(client, "Other", "realistic", imageGeneration={"model": "other.safetensors"})
    assert generate(client, other).status_code == 200
    assert realistic.loaded_checkpoint.startswith("other")
    realistic.faults.ignore_checkpoint = True

    response = generate(client, alex)

    assert response.status_code == 502
    error = response.json()["error"]
    assert error["code"] == "wrong_checkpoint"
    assert "'other'" in error["message"] and "cyberrealistic.safetensors" in error["message"]
    assert _last_job(client, response)["state"] == "failed"
    history = client.get(f"/api/characters/{alex['id']}/images").json()["items"]
    assert len(history) == 1 and all(i["model"] == "cyberrealistic.safetensors" for i in history)


def test_backend_auth_is_sent_and_never_shown(
    live_factory: Any, sims: tuple[A1111Simulator, A1111Simulator], caplog: pytest.LogCaptureFixture
) -> None:
    import logging

    from charforge.simulator import SimulatorSettings

    caplog.set_level(logging.DEBUG)  # httpx logs every request URL at INFO/DEBUG
    with A1111Simulator(
        SimulatorSettings(
            models=["diving.safetensors"], api_auth=("webui", "pa55word"), name="auth"
        )
    ) as guarded:
        host_port = guarded.url.removeprefix("http://")
        live = live_factory(sims[0].url, f"http://webui:pa55word@{host_port}")
        client = live.user("alice")
        sakura = create(client, "Sakura", "anime")
        assert generate(client, sakura).status_code == 200
        assert guarded.requests[-1].headers["authorization"].startswith("Basic ")

        styles = client.get("/api/styles")
        assert styles.status_code == 200
        assert "pa55word" not in styles.text and "webui:" not in styles.text
        assert "HTTP Request" in caplog.text  # the request lines were captured ...
        assert "pa55word" not in caplog.text  # ... and hold no password

        wrong = live_factory(sims[0].url, f"http://webui:wrong@{host_port}")
        client2 = wrong.user("bob")
        bobs = create(client2, "Bob", "anime")
        response = generate(client2, bobs)
        assert response.status_code == 502
        error = response.json()["error"]
        assert error["code"] == "backend_auth_failed"
        assert "RUNPOD_ANIME_CARTOON_FANTASY_AUTH" in error["hint"]
        assert "wrong" not in response.text


def test_forge_flavor_works_with_hires_and_late_hashes(
    live_factory: Any, sims: tuple[A1111Simulator, A1111Simulator]
) -> None:
    from charforge.simulator import SimulatorSettings

    with A1111Simulator(
        SimulatorSettings(
            models=["other.safetensors", "diving.safetensors"], flavor="forge", name="forge"
        )
    ) as forge:
        listed = httpx.get(f"{forge.url}/sdapi/v1/sd-models").json()
        assert any(m["title"] == "diving.safetensors" and m["hash"] is None for m in listed)
        live = live_factory(sims[0].url, forge.url)
        client = live.user("alice")
        sakura = create(client, "Sakura", "anime")
        response = generate(client, sakura)
        assert response.status_code == 200, response.text
        assert response.json()["images"][0]["width"] == 768
        assert (
            forge.txt2img_bodies()[0]["override_settings"]["sd_model_checkpoint"]
            == "diving.safetensors"
        )
        # now loaded once, Forge reports the hash and the character remembers it
        character = client.get(f"/api/characters/{sakura['id']}").json()
        assert character["imageGeneration"]["modelHash"]

        forge.faults.fail_status = 500
        forge.faults.fail_message = "Forge says no"
        failed = generate(client, sakura)
        assert failed.status_code == 502 and "Forge says no" in failed.json()["error"]["message"]


def test_unknown_sampler_is_refused_before_generating(
    live: Live, sims: tuple[A1111Simulator, A1111Simulator]
) -> None:
    client = live.user("alice")
    sakura = create(client, "Sakura", "anime")
    response = generate(client, sakura, sampler="Not A Sampler")
    assert response.status_code == 422
    error = response.json()["error"]
    assert error["field"] == "sampler" and "DPM++ 2M" in error["message"]
    assert sims[1].txt2img_bodies() == []
    assert generate(client, sakura, sampler="Euler a").status_code == 200


def test_names_are_sent_as_a1111_spells_them(
    live: Live, sims: tuple[A1111Simulator, A1111Simulator]
) -> None:
    """txt2img looks a sampler up by its exact name (anything else silently becomes the
    default), a scheduler by name or label: an alias or another case is translated."""
    client = live.user("alice")
    sakura = create(client, "Sakura", "anime")
    response = generate(client, sakura, sampler="k_dpmpp_sde", scheduler="exponential")
    assert response.status_code == 200, response.text
    generate(client, sakura, sampler="euler A", scheduler="KARRAS")
    sent = [(b["sampler_name"], b["scheduler"]) for b in sims[1].txt2img_bodies()]
    assert sent == [("DPM++ SDE", "Exponential"), ("Euler a", "Karras")]


def test_checkpoint_drift_is_caught(
    live: Live, sims: tuple[A1111Simulator, A1111Simulator]
) -> None:
    client = live.user("alice")
    sakura = create(
        client,
        "Sakura",
        "anime",
        imageGeneration={"model": "diving.safetensors", "modelHash": "0123456789"},
    )
    response = generate(client, sakura)
    assert response.status_code == 502
    assert response.json()["error"]["code"] == "checkpoint_drift"
    assert sims[1].txt2img_bodies() == []  # caught from /sd-models, before spending GPU time
    # The owner accepts the new weights by clearing the remembered hash.
    patched = client.patch(
        f"/api/characters/{sakura['id']}", json={"imageGeneration": {"modelHash": None}}
    )
    assert patched.json()["imageGeneration"]["modelHash"] is None
    assert generate(client, sakura).status_code == 200


def test_one_generation_at_a_time_per_backend(
    live: Live, sims: tuple[A1111Simulator, A1111Simulator]
) -> None:
    import concurrent.futures

    sims[1].faults.delay_seconds = 0.3
    client = live.user("alice")
    sakura = create(client, "Sakura", "anime")
    with concurrent.futures.ThreadPoolExecutor(3) as executor:
        results = list(executor.map(lambda i: generate(client, sakura, f"scene {i}"), range(3)))
    assert [r.status_code for r in results] == [200, 200, 200]
    assert sims[1].max_concurrent_generations == 1
    assert len(client.get(f"/api/characters/{sakura['id']}/images").json()["items"]) == 3


def test_checkpoint_in_a_subfolder_is_accepted(
    live_factory: Any, sims: tuple[A1111Simulator, A1111Simulator]
) -> None:
    from charforge.simulator import SimulatorSettings

    # A1111 reports such a model as just "deep" in info; the image is still the right one.
    with A1111Simulator(
        SimulatorSettings(models=["diving.safetensors", "styles/deep.safetensors"], name="sub")
    ) as webui:
        live = live_factory(sims[0].url, webui.url)
        client = live.user("alice")
        deep = create(client, "Deep", "anime", imageGeneration={"model": "styles/deep.safetensors"})
        response = generate(client, deep)
        assert response.status_code == 200, response.text
        assert response.json()["model"] == "styles/deep.safetensors"
        sent = webui.txt2img_bodies()[0]["override_settings"]["sd_model_checkpoint"]
        assert sent.startswith("styles/deep.safetensors")


def test_a_misspelt_field_is_refused_naming_it(
    live: Live, sims: tuple[A1111Simulator, A1111Simulator]
) -> None:
    client = live.user("alice")
    sakura = create(client, "Sakura")
    for path in ("/api/image-generation/generate", "/api/jobs"):
        response = (
            generate(client, sakura, stepz=10)
            if "generate" in path
            else client.post(
                path, json={"prompt": "x", "characterId": sakura["id"], "identity": {"strenght": 1}}
            )
        )
        assert response.status_code == 422, response.text
        error = response.json()["error"]
        assert error["field"] in ("stepz", "identity.strenght"), error
        assert error["field"] in error["message"] or error["field"] in str(error.get("details"))
    assert sims[1].txt2img_bodies() == []


def test_the_synchronous_endpoint_answers_with_every_image_asked_for(
    live: Live, sims: tuple[A1111Simulator, A1111Simulator]
) -> None:
    client = live.user("alice")
    sakura = create(client, "Sakura")
    response = generate(client, sakura, count=3, seed=100)
    assert response.status_code == 200, response.text
    images = response.json()["images"]
    assert [i["seed"] for i in images] == [100, 101, 102]
    assert [b["n_iter"] for b in sims[1].txt2img_bodies()] == [3]
