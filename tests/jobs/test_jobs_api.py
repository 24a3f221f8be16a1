"""/api/jobs over real HTTP: submit, follow (JSON and Server-Sent Events), list, cancel."""

from __future__ import annotations

import json
import time
from typing import Any

import httpx

from charforge.simulator import A1111Simulator
from tests.conftest import Live
from tests.jobs.conftest import create_character, job_of, submit, wait_final


def test_a_job_answers_202_with_its_location_and_makes_count_images(live: Live) -> None:
    client = live.user("alice")
    character = create_character(client)
    response = client.post(
        "/api/jobs",
        json={
            "prompt": "at the beach",
            "characterId": character,
            "count": 3,
            "seed": 1234,
            "width": 64,
            "height": 64,
            "hires": False,
        },
    )
    assert response.status_code == 202
    created = response.json()
    assert response.headers["location"] == f"/api/jobs/{created['id']}"
    assert created["state"] in ("queued", "running", "succeeded") and created["count"] == 3
    job = wait_final(client, created["id"])
    assert job["state"] == "succeeded"
    assert [i["seed"] for i in job["images"]] == [1234, 1235, 1236]
    assert job["progress"] == 1.0
    assert len({client.get(i["url"]).content for i in job["images"]}) == 3


def test_count_and_body_are_validated(live: Live) -> None:
    client = live.user("alice")
    character = create_character(client)
    for count in (0, 17):
        response = client.post(
            "/api/jobs", json={"prompt": "x", "characterId": character, "count": count}
        )
        assert response.status_code == 422
        assert response.json()["error"]["field"] == "count"


def test_jobs_are_listed_newest_first_and_filtered_by_state(live: Live) -> None:
    client = live.user("alice")
    character = create_character(client)
    ids = [submit(client, character)["id"] for _ in range(3)]
    for job_id in ids:
        wait_final(client, job_id)
    page = client.get("/api/jobs", params={"limit": 2}).json()
    assert [j["id"] for j in page["items"]] == ids[::-1][:2]
    rest = client.get("/api/jobs", params={"limit": 2, "cursor": page["nextCursor"]}).json()
    assert [j["id"] for j in rest["items"]] == [ids[0]] and rest["nextCursor"] is None
    assert client.get("/api/jobs", params={"state": "queued,running"}).json()["items"] == []
    assert len(client.get("/api/jobs", params={"state": "succeeded"}).json()["items"]) == 3
    bad = client.get("/api/jobs", params={"state": "done"})
    assert bad.status_code == 422 and bad.json()["error"]["field"] == "state"


def test_another_users_job_is_not_found_anywhere(live: Live) -> None:
    alice, bob = live.user("alice"), live.user("bob")
    job_id = submit(alice, create_character(alice))["id"]
    for method, path in (
        ("GET", f"/api/jobs/{job_id}"),
        ("POST", f"/api/jobs/{job_id}/cancel"),
        ("GET", f"/api/jobs/{job_id}/events"),
    ):
        assert bob.request(method, path).status_code == 404, path
    assert bob.get("/api/jobs").json()["items"] == []
    assert wait_final(alice, job_id)["state"] == "succeeded"  # bob's cancel did nothing


def test_a_queued_job_cancelled_never_runs(
    live: Live, sims: tuple[A1111Simulator, A1111Simulator]
) -> None:
    sims[1].faults.delay_seconds = 1.0  # the first job holds the only anime backend
    client = live.user("alice")
    character = create_character(client)
    first = submit(client, character, prompt="first")
    second = submit(client, character, prompt="second one")
    assert job_of(client, second["id"])["queuePosition"] == 0  # next in line (none ahead)
    response = client.post(f"/api/jobs/{second['id']}/cancel")
    assert response.status_code == 200 and response.json()["state"] == "cancelled"
    assert wait_final(client, first["id"])["state"] == "succeeded"
    time.sleep(0.3)
    assert job_of(client, second["id"])["state"] == "cancelled"
    assert not any("second one" in b["prompt"] for b in sims[1].txt2img_bodies())
    again = client.post(f"/api/jobs/{second['id']}/cancel")
    assert again.status_code == 409 and "already cancelled" in again.json()["error"]["message"]


def test_a_running_job_cancelled_is_interrupted_and_stores_nothing(
    live: Live, sims: tuple[A1111Simulator, A1111Simulator]
) -> None:
    sims[1].faults.delay_seconds = 10.0
    client = live.user("alice")
    job_id = submit(client, create_character(client))["id"]
    deadline = time.monotonic() + 5
    # Running, and the WebUI has the task: a job cancelled between its claim and its request
    # is simply never sent, and then there is nothing to interrupt.
    while job_of(client, job_id)["state"] != "running" or sims[1].current_task is None:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    started = time.monotonic()
    assert client.post(f"/api/jobs/{job_id}/cancel").json()["state"] == "cancelled"
    deadline = time.monotonic() + 5
    while not any(r.path == "/sdapi/v1/interrupt" for r in sims[1].requests):
        assert time.monotonic() < deadline, "the WebUI was never told to stop"
        time.sleep(0.05)
    # The backend is free again long before the 10 s generation would have ended.
    sims[1].faults.delay_seconds = 0
    assert (
        wait_final(client, submit(client, create_character(client, "Hana"))["id"])["state"]
        == "succeeded"
    )
    assert time.monotonic() - started < 5
    job = job_of(client, job_id)
    assert job["state"] == "cancelled" and job["images"] == []
    assert job["attemptHistory"][0]["outcome"] == "cancelled"


def read_events(client: httpx.Client, job_id: str) -> list[tuple[str, Any]]:
    events: list[tuple[str, Any]] = []
    with client.stream("GET", f"/api/jobs/{job_id}/events", timeout=30) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        name = None
        for line in response.iter_lines():
            if line.startswith("event: "):
                name = line.removeprefix("event: ")
            elif line.startswith("data: ") and name:
                events.append((name, json.loads(line.removeprefix("data: "))))
    return events


def test_events_stream_queue_position_state_progress_and_the_final_job(
    live: Live, sims: tuple[A1111Simulator, A1111Simulator]
) -> None:
    sims[1].faults.delay_seconds = 2.0
    client = live.user("alice")
    character = create_character(client)
    submit(client, character, prompt="ahead")
    job_id = submit(client, character, steps=20)["id"]
    events = read_events(client, job_id)
    names = [name for name, _ in events]
    assert names[0] == "state" and events[0][1]["state"] == "queued"
    assert ("queue", {"position": 0}) in events  # next in line behind the running one
    states = [data["state"] for name, data in events if name == "state"]
    assert states[-2:] == ["running", "succeeded"]
    steps = [data for name, data in events if name == "progress" and data["step"]]
    assert steps, events  # the WebUI's /progress was relayed
    assert all(s["steps"] == 20 and 0 < s["progress"] <= 1 for s in steps)
    assert names[-1] == "done" and events[-1][1]["state"] == "succeeded"
    assert len(events[-1][1]["images"]) == 1


def test_the_synchronous_endpoint_still_answers_with_the_image(live: Live) -> None:
    client = live.user("alice")
    response = client.post(
        "/api/image-generation/generate",
        json={"prompt": "x", "characterId": create_character(client)},
    )
    assert response.status_code == 200
    body = response.json()
    assert body["model"] == "diving.safetensors" and len(body["images"]) == 1
    assert job_of(client, body["jobId"])["state"] == "succeeded"


def test_a_running_count_job_cancelled_keeps_the_images_already_made(
    live: Live, sims: tuple[A1111Simulator, A1111Simulator]
) -> None:
    """Four images, one after the other: cancelled while the third is being sampled, the two
    already whole are kept (never the half-made third), and the job says how many of how many."""
    sims[1].faults.delay_seconds = 8.0  # 2 s an image
    client = live.user("alice")
    job_id = submit(client, create_character(client), count=4, seed=40)["id"]
    deadline = time.monotonic() + 10
    while httpx.get(f"{sims[1].url}/sdapi/v1/progress").json()["state"]["job_no"] < 2:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert client.post(f"/api/jobs/{job_id}/cancel").json()["state"] == "cancelled"
    deadline = time.monotonic() + 10
    while not (job := job_of(client, job_id))["images"]:
        assert time.monotonic() < deadline, job
        time.sleep(0.05)
    assert job["state"] == "cancelled"
    assert [i["seed"] for i in job["images"]] == [40, 41]
    assert "after 2 of 4 images" in job["error"]["message"]
    # The WebUI answered with three pictures, the third cut short; the two kept are whole.
    (run,) = [r for r in sims[1].task_runs.values() if r.get("seeds", [None])[0] == 40]
    assert run["outcome"] == "interrupted" and run["images"] == 3
    steps = job["parameters"]["steps"]
    assert run["steps_finished"][:2] == [steps, steps] and run["steps_finished"][2] < steps
    for image in job["images"]:
        assert client.get(image["url"]).status_code == 200
    history = client.get(f"/api/characters/{job['characterId']}/images").json()["items"]
    assert sorted(i["seed"] for i in history) == [40, 41]
    sims[1].faults.delay_seconds = 0
