"""A route whose pool mixes kinds: an A1111 WebUI and a ComfyUI serving the same checkpoint.

Whatever kind a job lands on, it runs the route's checkpoint; a backend that cannot do what a
job asks for (here a ComfyUI with a user's own workflow, which has no second pass) is never
given that job, even when every other backend fails.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from charforge.config import BackendConfig, RouteConfig
from charforge.domain.capabilities import Capability
from charforge.simulator import A1111Simulator
from tests.conftest import Live
from tests.fakes.comfyui import USER_WORKFLOW, FakeComfyUI
from tests.helpers import free_port
from tests.jobs.conftest import create_character, submit, wait_final

A1111 = "anime-cartoon-fantasy"  # the A1111 simulator behind RUNPOD_ANIME_CARTOON_FANTASY_URL


@pytest.fixture
def comfy() -> Iterator[FakeComfyUI]:
    server = FakeComfyUI(["diving.safetensors"]).start()
    yield server
    server.stop()


def _start(live_factory: Any, sims: tuple[A1111Simulator, A1111Simulator], **extra: Any) -> Live:
    live: Live = live_factory(sims[0].url, sims[1].url, backend_timeout=5.0, **extra)
    deadline = time.monotonic() + 10
    while not all(s.checked for s in live.container.pool.statuses()):  # first probes answered
        assert time.monotonic() < deadline, live.container.pool.statuses()
        time.sleep(0.02)
    return live


def test_a_job_failing_on_a1111_lands_on_comfyui_with_the_same_checkpoint(
    live_factory: Any, sims: tuple[A1111Simulator, A1111Simulator], comfy: FakeComfyUI
) -> None:
    anime = sims[1]
    anime.faults.fail_status = 500
    live = _start(
        live_factory,
        sims,
        backends={"comfy": BackendConfig(kind="comfyui", url=comfy.url)},
        routes={"anime": RouteConfig(backends=[A1111, "comfy"])},
    )
    client = live.user("alice")
    job = wait_final(client, submit(client, create_character(client), hires=True)["id"])

    assert job["state"] == "succeeded", job
    # A1111 has diving loaded, so it is tried first; its 500 sends the job to ComfyUI.
    assert [(a["backend"], a["outcome"]) for a in job["attemptHistory"]] == [
        (A1111, "retried"),
        ("comfy", "succeeded"),
    ]
    assert len(anime.txt2img_bodies()) == 1
    (graph,) = comfy.prompts()
    assert graph["4"]["inputs"]["ckpt_name"] == "diving.safetensors"
    assert graph["11"]["class_type"] == "KSampler"  # the hires pass went along
    (image,) = job["images"]
    stored = client.get(image["url"].removesuffix("/file")).json()
    assert stored["backend"] == "comfy"
    assert stored["model"] == "diving.safetensors"
    assert (image["width"], image["height"]) == (96, 96)  # 64 x the 1.5 hires scale


def test_a_job_needing_hires_never_goes_to_a_backend_without_it(
    live_factory: Any,
    sims: tuple[A1111Simulator, A1111Simulator],
    comfy: FakeComfyUI,
    tmp_path: Path,
) -> None:
    anime = sims[1]
    anime.faults.fail_status = 500
    workflow = tmp_path / "workflow.json"
    workflow.write_text(json.dumps(USER_WORKFLOW))
    live = _start(
        live_factory,
        sims,
        backends={"mine": BackendConfig(kind="comfyui", url=comfy.url, workflow=workflow)},
        routes={"anime": RouteConfig(backends=[A1111, "mine"])},
    )
    client = live.user("alice")
    character = create_character(client)

    wanted_hires = wait_final(client, submit(client, character, hires=True)["id"])
    assert wanted_hires["state"] == "failed", wanted_hires
    assert {a["backend"] for a in wanted_hires["attemptHistory"]} == {A1111}
    assert comfy.prompts() == []

    without = wait_final(client, submit(client, character, hires=False)["id"])
    assert without["state"] == "succeeded", without
    assert without["attemptHistory"][-1]["backend"] == "mine"
    (graph,) = comfy.prompts()
    assert graph["ckpt"]["inputs"]["ckpt_name"] == "diving.safetensors"
    assert graph["latent"]["inputs"] == {"width": 64, "height": 64, "batch_size": 1}


def test_the_styles_endpoint_shows_each_backends_kind_and_capabilities(
    live_factory: Any,
    sims: tuple[A1111Simulator, A1111Simulator],
    comfy: FakeComfyUI,
    tmp_path: Path,
) -> None:
    workflow = tmp_path / "workflow.json"
    workflow.write_text(json.dumps(USER_WORKFLOW))
    live = _start(
        live_factory,
        sims,
        backends={"mine": BackendConfig(kind="comfyui", url=comfy.url, workflow=workflow)},
        routes={
            "anime": RouteConfig(backends=[A1111, "mine"]),
            "sketch": RouteConfig(checkpoint="diving.safetensors", backends=["mine"]),
        },
    )
    client = live.user("alice")
    styles = {s["style"]: s for s in client.get("/api/styles").json()}
    (mine,) = styles["sketch"]["backends"]
    assert mine["kind"] == "comfyui (custom workflow)"
    assert "hires" not in mine["capabilities"] and "progress" in mine["capabilities"]
    assert mine["checkpointPresent"] is True
    assert "hires" not in styles["sketch"]["capabilities"]
    assert "hires" in styles["anime"]["capabilities"]  # A1111 in its pool has it
    assert [b["kind"] for b in styles["anime"]["backends"]] == [
        "a1111",
        "comfyui (custom workflow)",
    ]

    # Both idle: a preference (avoid) is overruled by what the job needs.
    route, pool = live.container.table.route("anime"), live.container.pool
    assert pool.choose(route, "diving.safetensors", avoid=[A1111]) == "mine"
    hires = frozenset({Capability.HIRES})
    assert pool.choose(route, "diving.safetensors", avoid=[A1111], needs=hires) == A1111

    character = create_character(client, style="sketch")
    asked = client.post(
        "/api/jobs",
        json={"prompt": "in a garden", "characterId": character, "hires": True},
    )
    assert asked.status_code == 422, asked.text
    error = asked.json()["error"]
    assert error["code"] == "unsupported_capability" and error["field"] == "hires"
    assert "'mine' (comfyui (custom workflow))" in error["message"]

    # Left to the default, the pass is simply not asked of a route that cannot do it.
    default = client.post(
        "/api/image-generation/generate",
        json={"prompt": "in a garden", "characterId": character, "width": 64, "height": 64},
    )
    assert default.status_code == 200, default.text
    assert default.json()["parameters"]["hires"] is False
    assert (default.json()["images"][0]["width"], default.json()["images"][0]["height"]) == (64, 64)


def test_a_job_whose_capable_backends_are_all_down_fails_instead_of_waiting(
    live_factory: Any,
    sims: tuple[A1111Simulator, A1111Simulator],
    comfy: FakeComfyUI,
    tmp_path: Path,
) -> None:
    workflow = tmp_path / "workflow.json"
    workflow.write_text(json.dumps(USER_WORKFLOW))
    dead = f"http://127.0.0.1:{free_port()}"  # the route's only backend with a hires pass
    live: Live = live_factory(
        sims[0].url,
        dead,
        backend_timeout=5.0,
        health_failures=1,
        backends={"mine": BackendConfig(kind="comfyui", url=comfy.url, workflow=workflow)},
        # Every route that has the dead backend also has a healthy one: only the job's own
        # capable pool is stranded.
        routes={
            style: RouteConfig(backends=[A1111, "mine"])
            for style in ("anime", "cartoon", "fantasy")
        },
    )
    deadline = time.monotonic() + 10
    while live.container.pool.status(A1111).healthy:  # the first probe marks it down
        assert time.monotonic() < deadline
        time.sleep(0.02)
    client = live.user("alice")
    job = wait_final(client, submit(client, create_character(client), hires=True)["id"])

    assert job["state"] == "failed", job
    assert job["error"]["code"] == "backend_unavailable"
    assert {a["backend"] for a in job["attemptHistory"]} == {A1111}
    assert comfy.prompts() == []
