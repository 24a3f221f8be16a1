"""Regressions found in review: races, write-back, shutdown, deletion during a job."""

from __future__ import annotations

import concurrent.futures
import time
from typing import Any

from charforge.simulator import A1111Simulator
from tests.api.test_generate import create, generate
from tests.conftest import Live


def test_racing_first_requests_give_an_older_character_one_look(
    live: Live, sims: tuple[A1111Simulator, A1111Simulator]
) -> None:
    sims[0].faults.delay_seconds = sims[1].faults.delay_seconds = 0.05
    client = live.user("alice")
    olds = [create(client, f"Old{i}", style=None) for i in range(4)]
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        futures = [
            pool.submit(generate, client, old, artStyle=style)
            for old in olds
            for style in ("anime", "realistic")
        ]
        codes = [f.result().status_code for f in futures]
    assert sorted(set(codes)) <= [200, 409] and codes.count(200) >= len(olds)
    for old in olds:
        stored = client.get(f"/api/characters/{old['id']}").json()
        history = client.get(f"/api/characters/{old['id']}/images").json()["items"]
        models = {image["model"] for image in history}
        assert models == {stored["imageGeneration"]["model"]}, (stored, models)


def test_a_mistyped_model_does_not_stick_to_an_older_character(
    live: Live, sims: tuple[A1111Simulator, A1111Simulator]
) -> None:
    client = live.user("alice")
    old = create(client, "Oldie", style=None)
    typo = generate(client, old, model="divng.safetensors")
    assert typo.status_code == 503
    assert client.get(f"/api/characters/{old['id']}").json()["imageGeneration"]["model"] is None
    fixed = generate(client, old, model="diving.safetensors")
    assert fixed.status_code == 200, fixed.text
    stored = client.get(f"/api/characters/{old['id']}").json()
    assert stored["imageGeneration"]["model"] == "diving.safetensors"


def test_a_model_without_style_routes_by_its_model(
    live: Live, sims: tuple[A1111Simulator, A1111Simulator]
) -> None:
    client = live.user("alice")
    alex = create(client, "Alex", None, imageGeneration={"model": "cyberrealistic.safetensors"})
    clash = generate(client, alex, artStyle="anime")
    assert clash.status_code == 409
    ok = generate(client, alex)
    assert ok.status_code == 200, ok.text
    assert ok.json()["artStyle"] == "realistic" and len(sims[0].txt2img_bodies()) == 1


def test_changing_the_model_during_a_job_does_not_poison_the_hash(
    live: Live, sims: tuple[A1111Simulator, A1111Simulator]
) -> None:
    sims[1].faults.delay_seconds = 1.0
    client = live.user("alice")
    sakura = create(client, "Sakura", "anime")
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        running = pool.submit(generate, client, sakura)
        time.sleep(0.4)
        patched = client.patch(
            f"/api/characters/{sakura['id']}",
            json={"imageGeneration": {"model": "other.safetensors"}},
        )
        assert patched.status_code == 200
        assert running.result().status_code == 200
    stored = client.get(f"/api/characters/{sakura['id']}").json()
    assert stored["imageGeneration"]["model"] == "other.safetensors"
    assert stored["imageGeneration"]["modelHash"] is None
    sims[1].faults.delay_seconds = 0
    assert generate(client, sakura).status_code == 200  # no false drift


def test_deleting_the_character_while_its_image_is_made_answers_404(
    live: Live, sims: tuple[A1111Simulator, A1111Simulator]
) -> None:
    sims[1].faults.delay_seconds = 1.0
    client = live.user("alice")
    sakura = create(client, "Sakura", "anime")
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        running = pool.submit(generate, client, sakura)
        time.sleep(0.4)
        assert client.delete(f"/api/characters/{sakura['id']}").status_code == 204
        response = running.result()
    assert response.status_code == 404
    assert response.json()["error"]["code"] == "not_found"
    leftovers = list((live.container.settings.data_dir / "images").rglob("*.png"))
    assert leftovers == []


def test_a_vanished_file_is_a_404_not_a_500(
    live: Live, sims: tuple[A1111Simulator, A1111Simulator]
) -> None:
    client = live.user("alice")
    sakura = create(client, "Sakura", "anime")
    image = generate(client, sakura).json()["images"][0]
    for png in (live.container.settings.data_dir / "images").rglob("*.png"):
        png.unlink()
    response = client.get(image["url"])
    assert response.status_code == 404
    assert "missing from the data dir" in response.json()["error"]["message"]


def test_timeout_interrupts_the_webui(
    live_factory: Any, sims: tuple[A1111Simulator, A1111Simulator]
) -> None:
    live = live_factory(sims[0].url, sims[1].url, backend_timeout=0.5, job_max_attempts=1)
    sims[1].faults.delay_seconds = 5.0
    client = live.user("alice")
    sakura = create(client, "Sakura", "anime")
    started = time.monotonic()
    assert generate(client, sakura).status_code == 504
    assert any(r.path == "/sdapi/v1/interrupt" for r in sims[1].requests)
    assert time.monotonic() - started < 4  # the WebUI stopped early instead of running on


def test_a_long_job_answers_202_and_finishes_behind_it(
    live_factory: Any, sims: tuple[A1111Simulator, A1111Simulator]
) -> None:
    live = live_factory(sims[0].url, sims[1].url, generate_wait=0.3)
    sims[1].faults.delay_seconds = 1.5
    client = live.user("alice")
    sakura = create(client, "Sakura", "anime")
    response = generate(client, sakura)
    assert response.status_code == 202
    job = response.json()
    assert job["state"] in ("queued", "running") and job["images"] == []
    assert response.headers["location"] == f"/api/jobs/{job['id']}"
    deadline = time.monotonic() + 15
    while client.get(response.headers["location"]).json()["state"] != "succeeded":
        assert time.monotonic() < deadline, "the job never finished"
        time.sleep(0.2)
    assert len(client.get(response.headers["location"]).json()["images"]) == 1
