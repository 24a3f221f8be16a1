"""Batches over real HTTP against the A1111 stand-in: every item checked before anything is
queued, one failing item never stops the others (the batch ends partial, the failure on its
item), cancel mid-batch keeps finished images, events stream the progress, owner-scoped."""

from __future__ import annotations

import json
import time
from typing import Any

import httpx

from charforge.simulator import A1111Simulator
from tests.api.test_generate import create
from tests.conftest import Live

Sims = tuple[A1111Simulator, A1111Simulator]


def wait_batch(client: httpx.Client, batch_id: str, timeout: float = 60) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        batch: dict[str, Any] = client.get(f"/api/batches/{batch_id}").json()
        if batch["state"] not in ("queued", "running"):
            return batch
        time.sleep(0.1)
    raise AssertionError(f"batch {batch_id} still {batch['state']}")


def test_one_failing_item_leaves_the_others_and_the_batch_is_partial(
    live: Live, sims: Sims
) -> None:
    alice = live.user("alice")
    sakura = create(alice, "Sakura")
    sims[1].faults.nan_prompts = ["cursed"]  # the backend fails this item, every time
    response = alice.post(
        "/api/batches",
        json={
            "characterId": sakura["id"],
            "steps": 20,
            "seed": 7,
            "items": [
                {"prompt": "at the beach"},
                {"prompt": "a cursed mirror"},
                {"prompt": "in the snow", "negativePrompt": "sunshine", "count": 2},
                {"prompt": "at a ballroom", "seed": 99},
            ],
        },
    )
    assert response.status_code == 202, response.text
    assert response.headers["location"] == f"/api/batches/{response.json()['id']}"
    queued = response.json()
    assert queued["total"] == 4 and len(queued["jobs"]) == 4
    batch = wait_batch(alice, queued["id"])
    assert batch["state"] == "partial", batch
    assert (batch["succeeded"], batch["failed"], batch["images"]) == (3, 1, 4)
    failed = batch["jobs"][1]
    assert failed["state"] == "failed" and failed["error"]["code"] == "nan_error"
    assert failed["prompt"] == "a cursed mirror" and failed["images"] == []
    assert [len(j["images"]) for j in batch["jobs"]] == [1, 0, 2, 1]
    # Shared fields reach every item; an item's own win.
    sent = sims[1].txt2img_bodies()
    beach = next(b for b in sent if "beach" in b["prompt"])
    snow = next(b for b in sent if "snow" in b["prompt"])
    ballroom = next(b for b in sent if "ballroom" in b["prompt"])
    assert (beach["steps"], beach["seed"]) == (20, 7)
    assert "sunshine" not in beach["negative_prompt"]
    assert (snow["steps"], snow["n_iter"]) == (20, 2) and "sunshine" in snow["negative_prompt"]
    assert ballroom["seed"] == 99
    listed = alice.get("/api/batches").json()["items"]
    assert [b["id"] for b in listed] == [queued["id"]] and listed[0]["state"] == "partial"


def test_every_item_is_checked_before_anything_is_queued(live: Live, sims: Sims) -> None:
    alice, bob = live.user("alice"), live.user("bob")
    sakura = create(alice, "Sakura")
    bobs = create(bob, "Ben")
    good = {"prompt": "at the beach"}
    for items, field, status in (
        ([good, good, {"prompt": "x", "steps": 1000}], "items[2].steps", 422),
        ([good, {"prompt": "x", "stepz": 3}], "items[1].stepz", 422),
        ([good, {"prompt": "x", "characterId": bobs["id"]}], "items[1].characterId", 404),
        ([good, {"seed": 3}], "items[1].prompt", 422),
    ):
        response = alice.post("/api/batches", json={"characterId": sakura["id"], "items": items})
        assert response.status_code == status, response.text
        assert response.json()["error"]["field"] == field, response.text
    no_character = alice.post("/api/batches", json={"items": [good]})
    assert no_character.json()["error"]["field"] == "items[0].characterId"
    shared = alice.post(
        "/api/batches", json={"characterId": sakura["id"], "cfgScale": 99, "items": [good]}
    )
    assert shared.status_code == 422 and shared.json()["error"]["field"] == "cfgScale"
    empty = alice.post("/api/batches", json={"characterId": sakura["id"], "items": []})
    assert empty.status_code == 422 and empty.json()["error"]["field"] == "items"
    too_many = alice.post("/api/batches", json={"characterId": sakura["id"], "items": [good] * 201})
    assert too_many.status_code == 422 and too_many.json()["error"]["field"] == "items"
    # Nothing was queued, nothing was sent.
    assert alice.get("/api/jobs").json()["items"] == []
    assert alice.get("/api/batches").json()["items"] == []
    assert sims[1].txt2img_bodies() == []


def test_cancel_mid_batch_keeps_finished_images(live: Live, sims: Sims) -> None:
    alice, bob = live.user("alice"), live.user("bob")
    sakura = create(alice, "Sakura")
    sims[1].faults.delay_seconds = 0.6
    items = [{"prompt": f"scene {n}"} for n in range(6)]
    batch = alice.post("/api/batches", json={"characterId": sakura["id"], "items": items}).json()
    deadline = time.monotonic() + 30
    while alice.get(f"/api/batches/{batch['id']}").json()["succeeded"] < 1:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    # Another user can neither see nor cancel it.
    assert bob.get(f"/api/batches/{batch['id']}").status_code == 404
    assert bob.post(f"/api/batches/{batch['id']}/cancel").status_code == 404
    assert bob.get(f"/api/batches/{batch['id']}/events").status_code == 404
    cancelled = alice.post(f"/api/batches/{batch['id']}/cancel")
    assert cancelled.status_code == 200, cancelled.text
    final = wait_batch(alice, batch["id"])
    assert final["state"] == "cancelled" and final["cancelledAt"] is not None
    done = [j for j in final["jobs"] if j["state"] == "succeeded"]
    assert 1 <= len(done) < 6 and all(len(j["images"]) == 1 for j in done)
    assert final["cancelled"] == 6 - len(done)
    for job in done:  # their images stay, with their files
        assert alice.get(job["images"][0]["url"]).status_code == 200
    sent = len(sims[1].txt2img_bodies())
    time.sleep(1.0)
    assert len(sims[1].txt2img_bodies()) == sent  # nothing more was sent
    sims[1].faults.delay_seconds = 0.0


def test_events_stream_the_batch_to_its_end(live: Live, sims: Sims) -> None:
    alice = live.user("alice")
    sakura = create(alice, "Sakura")
    items = [{"prompt": "at the beach"}, {"prompt": "in the snow"}]
    batch = alice.post("/api/batches", json={"characterId": sakura["id"], "items": items}).json()
    events: list[tuple[str, dict[str, Any]]] = []
    with alice.stream("GET", f"/api/batches/{batch['id']}/events", timeout=60) as stream:
        assert stream.headers["content-type"].startswith("text/event-stream")
        name = ""
        for line in stream.iter_lines():
            if line.startswith("event: "):
                name = line.removeprefix("event: ")
            elif line.startswith("data: "):
                events.append((name, json.loads(line.removeprefix("data: "))))
                if name == "done":
                    break
    names = [n for n, _ in events]
    assert names[-1] == "done" and events[-1][1]["state"] == "succeeded"
    assert "batch" in names and names.count("job") >= 2
    finished = [d for n, d in events if n == "job" and d["state"] == "succeeded"]
    assert {d["prompt"] for d in finished} == {"at the beach", "in the snow"}


def test_items_can_fill_a_shared_template(live: Live, sims: Sims) -> None:
    alice = live.user("alice")
    sakura = create(alice, "Sakura")
    body: dict[str, Any] = {
        "characterId": sakura["id"],
        "templateId": "builtin-outfit-change",
        "items": [
            {"variables": {"outfit": "a red evening dress"}},
            {"variables": {"outfit": "a raincoat"}, "seed": 5},
        ],
    }
    missing = alice.post(
        "/api/batches", json={**body, "items": [*body["items"], {"variables": {}}]}
    )
    assert missing.status_code == 422, missing.text
    assert missing.json()["error"]["field"] == "items[2].variables.outfit"
    assert alice.get("/api/jobs").json()["items"] == []
    batch = alice.post("/api/batches", json=body)
    assert batch.status_code == 202, batch.text
    assert wait_batch(alice, batch.json()["id"])["state"] == "succeeded"
    prompts = [b["prompt"] for b in sims[1].txt2img_bodies()]
    assert any("a red evening dress" in p for p in prompts)
    assert any("a raincoat" in p for p in prompts)
