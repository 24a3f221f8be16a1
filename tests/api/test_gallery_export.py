"""Replay, the streamed ZIP and withheld images, over real HTTP on SQLite and PostgreSQL.

A replay is proven by what the A1111 stand-in received: the very parameters and seed of the
image. The ZIP is opened and compared with the history and with each image's file."""

from __future__ import annotations

import io
import json
import zipfile
from typing import Any

from charforge.simulator import A1111Simulator
from charforge.storage.png import read_infotext
from tests.api.test_gallery import ids, make
from tests.api.test_generate import create
from tests.api.test_permissions import refused
from tests.conftest import Live
from tests.jobs.conftest import submit, wait_final

Sims = tuple[A1111Simulator, A1111Simulator]
# What decides the picture, as the WebUI is told it.
SAME = (
    "prompt",
    "negative_prompt",
    "width",
    "height",
    "sampler_name",
    "scheduler",
    "steps",
    "cfg_scale",
    "enable_hr",
    "hr_scale",
    "hr_upscaler",
    "denoising_strength",
    "hr_second_pass_steps",
    "override_settings",  # the checkpoint and clip skip
)


def test_replay_sends_the_backend_exactly_the_image_settings_and_seed(
    live: Live, sims: Sims
) -> None:
    alice, bob = live.user("alice"), live.user("bob")
    sakura = create(alice, "Sakura")
    asked = {
        "prompt": "at the beach, golden hour",
        "negativePrompt": "blurry",
        "width": 64,
        "height": 96,
        "steps": 3,
        "cfgScale": 6.5,
        "sampler": "k_euler_a",  # stored as it ran: "Euler a"
        "scheduler": "karras",
        "hires": True,
        "hiresScale": 2.0,
        "hiresSteps": 4,
        "denoisingStrength": 0.35,
        "clipSkip": 2,
        "seed": 4242,
        "count": 3,
    }
    job = wait_final(alice, submit(alice, sakura["id"], **asked)["id"])
    assert job["state"] == "succeeded", job
    second = job["images"][1]
    assert second["seed"] == 4243
    original = sims[1].txt2img_bodies()[-1]
    assert original["n_iter"] == 3 and original["seed"] == 4242
    # The character changes meanwhile; the replay still makes the image as it was.
    alice.patch(f"/api/characters/{sakura['id']}", json={"imageGeneration": {"seed": 7}})

    response = alice.post(f"/api/images/{second['id']}/replay")
    assert response.status_code == 202, response.text
    replay = response.json()
    assert response.headers["location"] == f"/api/jobs/{replay['id']}"
    assert replay["count"] == 1 and replay["state"] in ("queued", "running", "succeeded")
    done = wait_final(alice, replay["id"])
    assert done["state"] == "succeeded", done
    again = sims[1].txt2img_bodies()[-1]
    assert again["seed"] == 4243 and again["n_iter"] == 1
    assert {k: again[k] for k in SAME} == {k: original[k] for k in SAME}
    assert again["sampler_name"] == "Euler a" and again["scheduler"] == "Karras"
    assert (again["width"], again["height"], again["steps"]) == (64, 96, 3)
    assert again["cfg_scale"] == 6.5 and again["enable_hr"] is True
    assert (again["hr_scale"], again["hr_second_pass_steps"]) == (2.0, 4)
    assert again["denoising_strength"] == 0.35
    assert again["override_settings"]["CLIP_stop_at_last_layers"] == 2
    assert again["prompt"].startswith("at the beach, golden hour")
    assert again["negative_prompt"].startswith("blurry")

    made = alice.get(done["images"][0]["url"]).content
    first = alice.get(second["url"]).content
    old, new = read_infotext(first), read_infotext(made)
    assert old is not None and new is not None
    assert old.split("\n")[:2] == new.split("\n")[:2]  # prompt and negative prompt
    assert "Seed: 4243," in new and "Steps: 3," in new
    # The new job carries the prompt as the user wrote it.
    assert done["prompt"] == "at the beach, golden hour"

    refused(bob.post(f"/api/images/{second['id']}/replay"), 404, "not_found")
    refused(alice.post("/api/images/nope/replay"), 404, "not_found")


def test_the_zip_holds_every_png_and_its_metadata(live: Live) -> None:
    alice, bob = live.user("alice"), live.user("bob")
    sakura = create(alice, "Sakura")
    make(alice, sakura, "in a garden", count=2)
    make(alice, sakura, "at the beach")
    make(alice, create(alice, "Alex", "realistic"), "on a mountain")  # another character
    history = alice.get(f"/api/characters/{sakura['id']}/images").json()["items"]
    alice.patch(f"/api/images/{history[1]['id']}", json={"favorite": True, "note": "nice"})
    history = alice.get(f"/api/characters/{sakura['id']}/images").json()["items"]

    response = alice.get(f"/api/characters/{sakura['id']}/images.zip")
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "application/zip"
    assert response.headers["content-disposition"] == 'attachment; filename="Sakura-images.zip"'
    assert "content-length" not in response.headers  # streamed, not built first
    archive = zipfile.ZipFile(io.BytesIO(response.content))
    assert archive.testzip() is None
    names = [f"{n:04d}-{image['seed']}.png" for n, image in enumerate(history, 1)]
    assert archive.namelist() == [*names, "metadata.json"]
    for name, image in zip(names, history, strict=True):
        png = archive.read(name)
        assert png == alice.get(image["url"]).content
        assert read_infotext(png) == image["infotext"]

    metadata = json.loads(archive.read("metadata.json"))
    assert metadata["character"] == {"id": sakura["id"], "name": "Sakura"}
    entries: list[dict[str, Any]] = metadata["images"]
    assert [e["file"] for e in entries] == names
    for entry, image in zip(entries, history, strict=True):
        for key in (
            "id",
            "prompt",
            "negativePrompt",
            "parameters",
            "seed",
            "model",
            "createdAt",
            "favorite",
            "note",
            "consistency",
        ):
            assert entry[key] == image[key], key
    assert [e["note"] for e in entries] == [None, "nice", None]

    refused(bob.get(f"/api/characters/{sakura['id']}/images.zip"), 404, "not_found")
    refused(alice.get("/api/characters/nope/images.zip"), 404, "not_found")
    empty = alice.get(f"/api/characters/{create(alice, 'Mika')['id']}/images.zip")
    assert empty.status_code == 200
    only = zipfile.ZipFile(io.BytesIO(empty.content))
    assert only.namelist() == ["metadata.json"]
    assert json.loads(only.read("metadata.json"))["images"] == []


def test_withheld_images_are_in_none_of_it(live_factory: Any, sims: Sims) -> None:
    live: Live = live_factory(sims[0].url, sims[1].url, nsfw_threshold=0.0)
    root, alice = live.user("root", admin=True), live.user("alice")
    sakura = create(alice, "Sakura")
    job = wait_final(alice, submit(alice, sakura["id"], prompt="at the beach", count=3)["id"])
    assert job["state"] == "failed" and job["withheldImages"] == 3
    held = [h["id"] for h in root.get("/api/admin/quarantine").json()["items"]]
    assert len(held) == 3
    released = root.post(f"/api/admin/quarantine/{held[0]}/release")
    assert released.status_code == 200, released.text
    shown, hidden = held[0], held[1:]

    assert ids(alice.get("/api/images")) == [shown]
    assert ids(alice.get("/api/images", params={"q": "beach"})) == [shown]
    assert ids(alice.get("/api/images", params={"favorite": "false"})) == [shown]
    assert ids(alice.get("/api/images", params={"characterId": sakura["id"]})) == [shown]
    archive = zipfile.ZipFile(
        io.BytesIO(alice.get(f"/api/characters/{sakura['id']}/images.zip").content)
    )
    assert len(archive.namelist()) == 2
    assert [e["id"] for e in json.loads(archive.read("metadata.json"))["images"]] == [shown]
    for image in hidden:
        refused(alice.patch(f"/api/images/{image}", json={"favorite": True}), 404, "not_found")
        refused(alice.post(f"/api/images/{image}/replay"), 404, "not_found")
    answer = alice.post("/api/images/delete", json={"ids": [shown, *hidden]})
    assert answer.json() == {"deleted": [shown], "notFound": hidden}
    # Still in quarantine for the administrators.
    assert {h["id"] for h in root.get("/api/admin/quarantine").json()["items"]} == set(hidden)
