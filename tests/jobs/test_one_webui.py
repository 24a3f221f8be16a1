"""One A1111 WebUI serving both routes (both RUNPOD_* variables name it), through charforge's
HTTP API: one backend, one job at a time, cancels and interrupts that touch only their own
task, names as they ran, LoRA tags, and errors that must not be retried on the same WebUI."""

from __future__ import annotations

import io
import threading
import time
from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import httpx
import pytest
from PIL import Image

from charforge.container import build_container
from charforge.db import repositories as repo
from charforge.db.migrate import upgrade
from charforge.db.models import utcnow
from charforge.domain.infotext import parse_infotext
from charforge.domain.params import GenerateBody
from charforge.jobs.tickets import JobTicket
from charforge.services import characters, generation, users
from charforge.simulator import A1111Simulator, Faults, SimulatorSettings
from tests.conftest import Live, make_settings
from tests.jobs.conftest import create_character, job_of, submit, wait_final

MODELS = ["diving.safetensors", "cyberrealistic.safetensors", "broken.safetensors"]


@pytest.fixture(scope="module")
def one_webui() -> Iterator[A1111Simulator]:
    sim = A1111Simulator(
        SimulatorSettings(models=MODELS, loras=["detail_tweaker.safetensors"], name="one-webui")
    )
    sim.start()
    yield sim
    sim.stop()


@pytest.fixture
def webui(one_webui: A1111Simulator) -> Iterator[A1111Simulator]:
    one_webui.reset()
    yield one_webui
    one_webui.faults = Faults()


@pytest.fixture
def live(live_factory: Any, webui: A1111Simulator) -> Live:
    """A charforge whose two env vars name the same WebUI (written two ways)."""
    result: Live = live_factory(webui.url + "/", webui.url)
    return result


def running_task(webui: A1111Simulator, job_id: str) -> bool:
    return (webui.current_task or "").startswith(f"charforge-{job_id}-")


def wait_for(condition: Any, what: str, timeout: float = 15) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"waited {timeout}s for {what}"
        time.sleep(0.02)


def png_info(client: httpx.Client, image: dict[str, Any]) -> dict[str, str]:
    file = client.get(image["url"])
    assert file.status_code == 200
    with Image.open(io.BytesIO(file.content)) as png:
        return parse_infotext(png.info["parameters"])


def first_running(live: Live, webui: A1111Simulator) -> tuple[httpx.Client, str, str]:
    """A user, a character, and its first job running on the WebUI (one second long)."""
    webui.faults.delay_seconds = 1.0
    client = live.user("alice")
    character = create_character(client)
    first = submit(client, character, prompt="first", steps=20)["id"]
    wait_for(lambda: running_task(webui, first), "the first job to run")
    return client, character, first


def generate(client: httpx.Client, character: str, **extra: Any) -> httpx.Response:
    body = {"prompt": "in a garden", "characterId": character, "width": 64, "height": 64}
    return client.post(
        "/api/image-generation/generate", json={"steps": 2, "hires": False, **body, **extra}
    )


def test_two_routes_on_one_webui_are_one_backend_running_one_job_at_a_time(
    live: Live, webui: A1111Simulator
) -> None:
    assert list(live.container.table.backends) == ["realistic"]
    webui.faults.delay_seconds = 0.2
    client = live.user("alice")
    anime, real = create_character(client), create_character(client, "Alex", "realistic")
    jobs = [submit(client, anime if i % 2 else real)["id"] for i in range(6)]

    assert all(wait_final(client, job)["state"] == "succeeded" for job in jobs)
    # Never two generations at once, and never one waiting inside the WebUI's own queue.
    assert webui.max_concurrent_generations == 1 and webui.max_in_flight == 1
    styles = {s["style"]: s for s in client.get("/api/styles").json()}
    for style in ("anime", "realistic"):
        (backend,) = styles[style]["backends"]
        assert backend["name"] == "realistic"
        assert backend["routes"] == ["anime", "cartoon", "fantasy", "realistic"]


def test_cancelling_the_job_waiting_behind_the_running_one_never_disturbs_it(
    live: Live, webui: A1111Simulator
) -> None:
    client, character, first = first_running(live, webui)
    second = submit(client, character, prompt="second")["id"]
    # It is prepared and waits at the WebUI's door (the backend's second slot), still queued.
    wait_for(lambda: second in live.container.runner.attempts, "the second job at the door")
    assert live.container.pool.in_flight("realistic") == 2
    assert job_of(client, second)["state"] == "queued"

    cancelled = client.post(f"/api/jobs/{second}/cancel")
    assert cancelled.status_code == 200 and cancelled.json()["state"] == "cancelled"

    done = wait_final(client, first)
    assert done["state"] == "succeeded" and len(done["images"]) == 1
    assert webui.interrupted_tasks == []  # the running job was never interrupted ...
    assert webui.task_runs[f"charforge-{first}-1"]["outcome"] == "finished"
    assert [b["prompt"].startswith("second") for b in webui.txt2img_bodies()] == [False]
    gone = job_of(client, second)  # ... and the cancelled one never reached the WebUI
    assert gone["images"] == [] and gone["attemptHistory"] == []


def test_cancelling_the_running_job_stops_its_task_and_the_next_runs_whole(
    live: Live, webui: A1111Simulator
) -> None:
    client, character, first = first_running(live, webui)
    second = submit(client, character, prompt="second", steps=20)["id"]

    assert client.post(f"/api/jobs/{first}/cancel").json()["state"] == "cancelled"

    assert wait_final(client, second)["state"] == "succeeded"
    assert [t["task"] for t in webui.interrupted_tasks] == [f"charforge-{first}-1"]
    assert job_of(client, first)["images"] == []


def test_an_interrupt_from_outside_is_never_stored_and_the_job_runs_again(
    live: Live, webui: A1111Simulator
) -> None:
    client, _character, job = first_running(live, webui)
    httpx.post(f"{webui.url}/sdapi/v1/interrupt")  # someone presses Interrupt in the WebUI
    webui.faults.delay_seconds = 0.0

    done = wait_final(client, job)
    assert done["state"] == "succeeded" and len(done["images"]) == 1
    history = [(a["outcome"], a["errorCode"]) for a in done["attemptHistory"]]
    assert history == [("retried", "backend_interrupted"), ("succeeded", None)]
    assert webui.task_runs[f"charforge-{job}-1"]["outcome"] == "interrupted"
    assert webui.task_runs[f"charforge-{job}-2"]["outcome"] == "finished"


def test_samplers_in_any_spelling_are_recorded_as_they_ran(
    live: Live, webui: A1111Simulator
) -> None:
    client = live.user("alice")
    character = create_character(client)

    combined = generate(client, character, sampler="DPM++ 2M Karras")
    assert combined.status_code == 200, combined.text
    result = combined.json()
    assert (result["parameters"]["sampler"], result["parameters"]["scheduler"]) == (
        "DPM++ 2M",
        "Karras",
    )
    info = png_info(client, result["images"][0])
    assert (info["Sampler"], info["Schedule type"]) == ("DPM++ 2M", "Karras")

    alias = generate(client, character, sampler="k_euler_a", scheduler="sgm_uniform")
    assert alias.status_code == 200, alias.text
    assert alias.json()["parameters"]["sampler"] == "Euler a"
    assert alias.json()["parameters"]["scheduler"] == "SGM Uniform"
    stored = client.get(f"/api/jobs/{alias.json()['jobId']}").json()
    assert stored["parameters"]["sampler"] == "Euler a"
    assert webui.txt2img_bodies()[-1]["sampler_name"] == "Euler a"


def test_lora_tags_are_checked_and_their_hashes_kept(live: Live, webui: A1111Simulator) -> None:
    client = live.user("alice")
    character = create_character(client)

    unknown = generate(client, character, prompt="<lora:nosuch:0.8> in a garden")
    assert unknown.status_code == 422, unknown.text
    error = unknown.json()["error"]
    assert error["code"] == "lora_missing" and error["field"] == "prompt"
    assert "nosuch" in error["message"] and "has: detail_tweaker" in error["message"]
    assert webui.txt2img_bodies() == []  # nothing ran
    assert len(job_of(client, error["jobId"])["attemptHistory"]) == 1

    known = generate(client, character, prompt="<lora:detail_tweaker:0.6> in a garden")
    assert known.status_code == 200, known.text
    info = png_info(client, known.json()["images"][0])
    assert info["Lora hashes"].startswith("detail_tweaker: ")


def test_nans_fail_at_once_with_the_fix_not_three_times(live: Live, webui: A1111Simulator) -> None:
    webui.faults.nan_prompts = ["cursed"]
    client = live.user("alice")
    character = create_character(client)

    response = generate(client, character, prompt="a cursed portrait")
    assert response.status_code == 502, response.text
    error = response.json()["error"]
    assert error["code"] == "nan_error" and "--no-half" in error["hint"]
    assert len(job_of(client, error["jobId"])["attemptHistory"]) == 1
    assert len(webui.txt2img_bodies()) == 1


def test_a_damaged_checkpoint_fails_once_and_its_loaded_report_is_not_believed(
    live: Live, webui: A1111Simulator
) -> None:
    webui.faults.corrupt_checkpoints = ["broken.safetensors"]
    client = live.user("alice")
    made = client.post(
        "/api/characters",
        json={
            "name": "Broken",
            "artStyle": {"primaryStyle": "anime"},
            "imageGeneration": {"model": "broken.safetensors"},
        },
    )
    assert made.status_code == 201, made.text

    response = generate(client, made.json()["id"])
    assert response.status_code == 502, response.text
    error = response.json()["error"]
    assert error["code"] == "checkpoint_unloadable" and "broken.safetensors" in error["hint"]
    assert len(job_of(client, error["jobId"])["attemptHistory"]) == 1
    # The WebUI now names the broken file as loaded; charforge does not take its word for it.
    assert (
        httpx.get(f"{webui.url}/sdapi/v1/options")
        .json()["sd_model_checkpoint"]
        .startswith("broken")
    )
    pool = live.container.pool
    pool.probe(["realistic"], max_age=0.0)
    status = pool.status("realistic")
    assert status.loaded is None and status.load_failed == "broken.safetensors"

    good = generate(client, create_character(client))
    assert good.status_code == 200, good.text
    status = pool.status("realistic")
    assert status.loaded == "diving.safetensors" and status.load_failed is None


def test_the_answers_model_hash_is_the_runs(live: Live, webui: A1111Simulator) -> None:
    client = live.user("alice")
    character = create_character(client)
    webui.faults.delay_seconds = 1.0
    answers: list[httpx.Response] = []
    waiting = threading.Thread(target=lambda: answers.append(generate(client, character)))
    waiting.start()
    wait_for(lambda: webui.current_task is not None, "the job to run")
    # Meanwhile the owner points the character at another checkpoint (it forgets its hash).
    moved = client.patch(
        f"/api/characters/{character}", json={"imageGeneration": {"model": "cyberrealistic"}}
    )
    assert moved.status_code == 200, moved.text
    waiting.join(30)

    (answer,) = answers
    assert answer.status_code == 200, answer.text
    listed = httpx.get(f"{webui.url}/sdapi/v1/sd-models").json()
    diving = next(m["hash"] for m in listed if m["title"].startswith("diving"))
    assert answer.json()["model"] == "diving.safetensors"
    assert answer.json()["modelHash"] == diving  # what ran, not what the character holds now


def test_a_crash_before_the_claim_fails_the_job_visibly(
    live: Live, webui: A1111Simulator, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(name: str, *, style: str) -> Any:
        raise OSError("disk gone")

    monkeypatch.setattr(live.container.pool.backends["realistic"], "find_checkpoint", broken)
    client = live.user("alice")
    job = wait_final(client, submit(client, create_character(client))["id"])
    assert job["state"] == "failed" and job["error"]["code"] == "internal_error"
    assert [a["outcome"] for a in job["attemptHistory"]] == ["failed"]


def test_a_restart_frees_jobs_an_earlier_process_reserved_at_a_door(
    tmp_path: Any, database_url: str, webui: A1111Simulator
) -> None:
    settings = make_settings(tmp_path / "data", database_url, webui.url, webui.url)
    first = build_container(settings)
    upgrade(first.db.engine)
    with first.db.session() as session:
        owner = users.create_user(session, "alice", "password-alice")
        fields = characters.CharacterFields(name="Sakura", art_style="anime")
        character = characters.create(session, owner, fields, first.table).id
        body = GenerateBody(prompt="x", character_id=character, width=64, height=64, steps=2)
        job = generation.submit(session, owner, body, first.table, settings.defaults)
        ticket = JobTicket.of(job)
    with first.db.session() as session:  # a process that died while it waited at a door
        until = utcnow() + timedelta(seconds=600)
        assert repo.reserve_job(session, ticket.id, "dead-host:1", utcnow(), until)
    first.db.dispose()
    first.pool.close()

    restarted = build_container(settings)
    restarted.start()
    try:
        assert restarted.queue.wait(ticket.id, 30)
        with restarted.db.session() as session:
            stored = repo.job_any_owner(session, ticket.id)
            assert stored is not None and stored.state == "succeeded"
    finally:
        restarted.close()
