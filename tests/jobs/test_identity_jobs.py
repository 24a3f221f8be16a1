"""Identity end to end: ControlNet units really sent to the A1111 stand-in, the consistency
score on real face photos, the retry below minScore, style transfer, and the character's own
negative prompt, LoRAs and seed."""

from __future__ import annotations

import base64
from collections.abc import Iterator
from dataclasses import replace
from typing import Any

import httpx
import pytest

from charforge.simulator import A1111Simulator
from tests.api.test_references import upload
from tests.conftest import Live
from tests.jobs.conftest import create_character, submit, wait_final
from tests.photos import astronaut_png, kafka_png, on_canvas


@pytest.fixture
def stand_ins(sims: tuple[A1111Simulator, A1111Simulator]) -> Iterator[Any]:
    """Change the simulators' settings for one test (before charforge starts, so that its
    first probe sees them); restored afterwards."""
    saved = [sim.settings for sim in sims]

    def change(**settings: Any) -> None:
        for sim in sims:
            sim.settings = replace(sim.settings, **settings)
            sim.reset()

    yield change
    for sim, settings in zip(sims, saved, strict=True):
        sim.settings = settings
        sim.reset()


def _with_reference(
    live: Live, style: str = "realistic", photo: bytes | None = None
) -> tuple[httpx.Client, str, str]:
    client = live.user("alice")
    character_id = create_character(client, "Eileen", style)
    added = upload(client, character_id, photo or astronaut_png())
    assert added.status_code == 201, added.text
    return client, character_id, added.json()["id"]


def _image(client: httpx.Client, image_id: str) -> dict[str, Any]:
    response = client.get(f"/api/images/{image_id}")
    assert response.status_code == 200, response.text
    return dict(response.json())


def test_controlnet_units_are_sent_and_only_generated_images_stored(
    live_factory: Any, sims: tuple[A1111Simulator, A1111Simulator], stand_ins: Any
) -> None:
    stand_ins(controlnet=True)
    realistic, _ = sims
    live = live_factory(realistic.url, sims[1].url)
    client, character_id, ref_id = _with_reference(live)

    job = wait_final(client, submit(client, character_id, count=2)["id"])
    assert job["state"] == "succeeded", job
    sent = realistic.txt2img_bodies()[-1]
    units = sent["alwayson_scripts"]["controlnet"]["args"]
    assert len(units) == 1
    unit = units[0]
    assert unit["enabled"] is True and unit["module"] == "reference_only"
    assert unit["model"] == "None" and unit["weight"] == 0.6
    assert unit["save_detected_map"] is False
    stored_ref = client.get(f"/api/characters/{character_id}/references/{ref_id}/file").content
    assert base64.b64decode(unit["image"]) == stored_ref
    assert realistic.controlnet_units[-1]  # the stand-in applied it
    styles = {s["style"]: s for s in client.get("/api/styles").json()}
    backend = styles["realistic"]["backends"][0]
    assert "reference_image" in backend["capabilities"]
    assert backend["identityMethod"] == "controlnet reference_only"

    assert len(job["images"]) == 2  # two generated images, no detected maps
    image = _image(client, job["images"][0]["id"])
    assert image["identity"] == {
        "applied": True,
        "strength": 0.6,
        "method": "controlnet reference_only",
    }
    assert 'Identity: "controlnet reference_only, strength 0.6"' in image["infotext"]
    assert job["identity"]["applied"] is True and job["identity"]["references"] == [ref_id]

    # Strength 0 turns it off for one request: no units, and the image says why.
    off = wait_final(client, submit(client, character_id, identity={"strength": 0})["id"])
    assert "alwayson_scripts" not in realistic.txt2img_bodies()[-1]
    assert _image(client, off["images"][0]["id"])["identity"] == {
        "applied": False,
        "reason": "identity.strength is 0",
    }


def test_an_ip_adapter_face_model_is_chosen_for_realistic_styles(
    live_factory: Any, sims: tuple[A1111Simulator, A1111Simulator], stand_ins: Any
) -> None:
    stand_ins(
        controlnet=True,
        controlnet_models=["ip-adapter_sd15 [6a3f6166]", "ip-adapter-plus-face_sd15 [71693645]"],
    )
    realistic, anime = sims
    live = live_factory(realistic.url, anime.url)
    client, character_id, _ = _with_reference(live)
    job = wait_final(client, submit(client, character_id, identity={"strength": 0.8})["id"])
    assert job["state"] == "succeeded", job
    unit = realistic.txt2img_bodies()[-1]["alwayson_scripts"]["controlnet"]["args"][0]
    assert unit["model"] == "ip-adapter-plus-face_sd15 [71693645]" and unit["weight"] == 0.8
    assert unit["module"].startswith("ip-adapter")

    anime_id = create_character(client, "Hana", "anime")
    assert upload(client, anime_id, kafka_png()).status_code == 201
    wait_final(client, submit(client, anime_id)["id"])
    drawn = anime.txt2img_bodies()[-1]["alwayson_scripts"]["controlnet"]["args"][0]
    assert drawn["model"] == "ip-adapter_sd15 [6a3f6166]"  # no face model on drawn styles


def test_without_the_extension_identity_is_refused_when_asked_and_reported_when_not(
    live_factory: Any, sims: tuple[A1111Simulator, A1111Simulator], stand_ins: Any
) -> None:
    stand_ins(controlnet=False)
    realistic, anime = sims
    live = live_factory(realistic.url, anime.url)
    client, character_id, _ = _with_reference(live)

    styles = client.get("/api/styles").json()
    realistic_style = next(s for s in styles if s["style"] == "realistic")
    assert "reference_image" not in realistic_style["backends"][0]["capabilities"]

    asked = client.post(
        "/api/image-generation/generate",
        json={"prompt": "at the beach", "characterId": character_id, "identity": {"strength": 0.7}},
    )
    assert asked.status_code == 422, asked.text
    error = asked.json()["error"]
    assert error["code"] == "unsupported_capability" and error["field"] == "identity"
    assert error["backends"] == ["realistic"]

    default = wait_final(client, submit(client, character_id)["id"])
    assert default["state"] == "succeeded"
    identity = _image(client, default["images"][0]["id"])["identity"]
    assert identity["applied"] is False and "realistic" in identity["reason"]
    assert "alwayson_scripts" not in realistic.txt2img_bodies()[-1]

    typo = client.post(
        "/api/jobs", json={"prompt": "x", "characterId": character_id, "identity": {"strenght": 1}}
    )
    assert typo.status_code == 422 and "strenght" in typo.json()["error"]["field"]


def test_consistency_score_on_real_photos(
    live_factory: Any, sims: tuple[A1111Simulator, A1111Simulator], stand_ins: Any
) -> None:
    stand_ins(photo_outputs=[astronaut_png(), kafka_png()])
    realistic, anime = sims
    live = live_factory(realistic.url, anime.url)
    client, character_id, _ = _with_reference(live)

    same = wait_final(client, submit(client, character_id, width=512, height=768)["id"])
    assert same["state"] == "succeeded", same
    score = _image(client, same["images"][0]["id"])["consistency"]
    assert score["method"].startswith("face-embedding") and score["score"] >= 0.5, score
    other = wait_final(client, submit(client, character_id, width=512, height=768)["id"])
    different = _image(client, other["images"][0]["id"])["consistency"]
    assert different["score"] < 0.5, different
    assert other["images"][0]["consistency"] == different  # in the job's image list too

    # A character without references gets no score at all.
    plain = create_character(client, "Nobody", "realistic")
    job = wait_final(client, submit(client, plain)["id"])
    assert job["images"][0]["consistency"] is None and job["identity"] is None


def test_below_min_score_it_generates_again_and_keeps_the_best(
    live_factory: Any, sims: tuple[A1111Simulator, A1111Simulator], stand_ins: Any
) -> None:
    # A different person first, the same person second.
    stand_ins(photo_outputs=[kafka_png(), astronaut_png()])
    realistic, anime = sims
    live = live_factory(realistic.url, anime.url)
    client, character_id, _ = _with_reference(live)

    job = wait_final(
        client,
        submit(
            client,
            character_id,
            width=512,
            height=768,
            seed=1000,
            identity={"strength": 0, "minScore": 0.5, "maxTries": 3},
        )["id"],
        timeout=60,
    )
    assert job["state"] == "succeeded", job
    tries = job["identity"]["tries"]
    assert [t["seed"] for t in tries] == [1000, 1001]
    assert tries[0]["score"] < 0.5 <= tries[1]["score"]
    assert len(realistic.txt2img_bodies()) == 2 and job["attempts"] == 1  # one attempt, two tries
    image = _image(client, job["images"][0]["id"])
    assert image["seed"] == 1001 and image["consistency"]["reachedMinScore"] is True
    assert len(job["images"]) == 1

    # Never reached: the best of maxTries is kept and flagged.
    realistic.reset()
    stand_ins(photo_outputs=[kafka_png()])
    never = wait_final(
        client,
        submit(client, character_id, identity={"strength": 0, "minScore": 0.5, "maxTries": 2})[
            "id"
        ],
        timeout=60,
    )
    assert never["state"] == "succeeded"
    assert len(never["identity"]["tries"]) == 2
    assert _image(client, never["images"][0]["id"])["consistency"]["reachedMinScore"] is False

    bad = client.post(
        "/api/jobs", json={"prompt": "x", "characterId": character_id, "identity": {"maxTries": 9}}
    )
    assert bad.status_code == 422 and bad.json()["error"]["field"] == "identity.maxTries"


def test_style_transfer_renders_on_the_other_route_and_keeps_the_character(
    live: Live, sims: tuple[A1111Simulator, A1111Simulator]
) -> None:
    realistic, anime = sims
    client = live.user("alice")
    character_id = create_character(client, "Sakura", "anime")
    client.patch(
        f"/api/characters/{character_id}",
        json={"negativePrompt": "glasses", "imageGeneration": {"seed": 77}},
    )

    mismatch = client.post(
        "/api/jobs", json={"prompt": "x", "characterId": character_id, "artStyle": "realistic"}
    )
    assert mismatch.status_code == 409 and "styleTransfer" in mismatch.json()["error"]["hint"]
    missing = client.post(
        "/api/jobs", json={"prompt": "x", "characterId": character_id, "styleTransfer": True}
    )
    assert missing.status_code == 422 and missing.json()["error"]["field"] == "artStyle"

    job = wait_final(
        client, submit(client, character_id, artStyle="realistic", styleTransfer=True)["id"]
    )
    assert job["state"] == "succeeded", job
    assert job["styleTransfer"] == {"from": "anime", "to": "realistic"}
    assert job["model"] == "cyberrealistic.safetensors" and anime.txt2img_bodies() == []
    sent = realistic.txt2img_bodies()[-1]
    assert "pink hair" in sent["prompt"] and "glasses" in sent["negative_prompt"]
    assert sent["seed"] == 77
    image = _image(client, job["images"][0]["id"])
    assert image["styleTransfer"] == {"from": "anime", "to": "realistic"}
    assert "Style transfer: anime to realistic" in image["infotext"]
    character = client.get(f"/api/characters/{character_id}").json()
    assert character["artStyle"]["primaryStyle"] == "anime"
    assert character["imageGeneration"]["model"] == "diving.safetensors"


def test_the_characters_loras_are_added_and_checked(
    live_factory: Any, sims: tuple[A1111Simulator, A1111Simulator], stand_ins: Any
) -> None:
    stand_ins(loras=["sakura_v2.safetensors"])
    realistic, anime = sims
    live = live_factory(realistic.url, anime.url)
    client = live.user("alice")
    character_id = create_character(client, "Sakura", "anime")
    patched = client.patch(
        f"/api/characters/{character_id}",
        json={"imageGeneration": {"loras": [{"name": "sakura_v2", "weight": 0.7}]}},
    )
    assert patched.status_code == 200, patched.text
    assert patched.json()["imageGeneration"]["loras"] == [{"name": "sakura_v2", "weight": 0.7}]
    job = wait_final(client, submit(client, character_id)["id"])
    assert job["state"] == "succeeded", job
    assert "<lora:sakura_v2:0.7>" in anime.txt2img_bodies()[-1]["prompt"]

    client.patch(
        f"/api/characters/{character_id}",
        json={"imageGeneration": {"loras": [{"name": "nosuch", "weight": 1}]}},
    )
    failed = client.post(
        "/api/image-generation/generate",
        json={"prompt": "x", "characterId": character_id, "width": 64, "height": 64},
    )
    assert failed.status_code == 422 and failed.json()["error"]["code"] == "lora_missing"
    assert "nosuch" in failed.json()["error"]["message"]
    bad = client.patch(
        f"/api/characters/{character_id}",
        json={"imageGeneration": {"loras": [{"name": "a>b"}]}},
    )
    assert bad.status_code == 422


def test_no_more_units_than_the_extension_takes(
    live_factory: Any, sims: tuple[A1111Simulator, A1111Simulator], stand_ins: Any
) -> None:
    stand_ins(controlnet=True)
    realistic, anime = sims
    live = live_factory(realistic.url, anime.url)
    client, character_id, first = _with_reference(live)
    for photo in (
        kafka_png(),
        on_canvas(astronaut_png(), 256, 256),
        on_canvas(kafka_png(), 300, 200),
    ):
        assert upload(client, character_id, photo).status_code == 201
    job = wait_final(client, submit(client, character_id)["id"])
    units = realistic.txt2img_bodies()[-1]["alwayson_scripts"]["controlnet"]["args"]
    assert len(units) == 3  # the extension's default "Max models": a fourth would be dropped
    stored = client.get(f"/api/characters/{character_id}/references/{first}/file").content
    assert base64.b64decode(units[0]["image"]) == stored  # the main picture first
    assert all(u["applied"] for u in realistic.controlnet_units[-1])
    identity = client.get(f"/api/images/{job['images'][0]['id']}").json()["identity"]
    assert identity["applied"] is True and "3 of 4 references" in identity["method"]
