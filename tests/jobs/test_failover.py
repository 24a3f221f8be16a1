"""Fault injection against a pool of two A1111 simulators: every fault ends in success on the
other backend, or in a clear failure; never a lost job, a duplicate or an off-model image."""

from __future__ import annotations

from typing import Any

import httpx
import pytest

from charforge.simulator import A1111Simulator
from tests.helpers import character_whose_checkpoint_went_away, free_port
from tests.jobs.conftest import create_character, submit, wait_final

FAULTS: dict[str, dict[str, Any]] = {
    "http-500": {"fail_status": 500, "fail_message": "CUDA out of memory"},
    "http-502": {"fail_status": 502},
    "http-524": {"fail_status": 524},
    "malformed-json": {"malformed_json": True},
    "broken-image": {"broken_image": True},
    "dropped-connection": {"drop_connection": True},
    "hang-past-timeout": {"delay_seconds": 5.0},
    # Fails again on the same WebUI: tried on the other one only (not retried in place).
    "nans": {"nan_prompts": ["garden"]},
}


@pytest.mark.parametrize("fault", list(FAULTS))
def test_a_faulty_backend_hands_the_job_to_the_other(
    fault: str, pool_live: Any, pool: tuple[A1111Simulator, A1111Simulator]
) -> None:
    faulty, healthy = pool
    for key, value in FAULTS[fault].items():
        setattr(faulty.faults, key, value)
    live = pool_live(backend_timeout=2.0)
    client = live.user("alice")
    job = wait_final(client, submit(client, create_character(client))["id"])

    assert job["state"] == "succeeded", job
    history = job["attemptHistory"]
    assert [a["backend"] for a in history] == ["anime-cartoon-fantasy", "anime-cartoon-fantasy-2"]
    assert history[0]["outcome"] == "retried" and history[0]["errorCode"]
    assert history[1]["outcome"] == "succeeded"
    assert len(faulty.txt2img_bodies()) == 1  # tried once there, not again
    assert job["backend"] == "anime-cartoon-fantasy-2" and job["attempts"] == 2
    assert len(job["images"]) == 1
    assert len(healthy.txt2img_bodies()) == 1
    image = client.get(job["images"][0]["url"].removesuffix("/file")).json()
    assert image["backend"] == "anime-cartoon-fantasy-2"
    assert image["model"] == "diving.safetensors"


def test_a_refused_connection_fails_over(
    pool_live: Any, pool: tuple[A1111Simulator, A1111Simulator]
) -> None:
    live = pool_live(first_url=f"http://127.0.0.1:{free_port()}")
    client = live.user("alice")
    job = wait_final(client, submit(client, create_character(client))["id"])
    assert job["state"] == "succeeded" and job["backend"] == "anime-cartoon-fantasy-2"
    # Tried first only if the scheduler had not yet learnt (by probe) that it is dead.
    assert all(a["errorCode"] == "backend_unavailable" for a in job["attemptHistory"][:-1])
    assert len(pool[1].txt2img_bodies()) == 1


def test_a_backend_that_ignores_the_checkpoint_never_yields_an_off_model_image(
    pool_live: Any, pool: tuple[A1111Simulator, A1111Simulator]
) -> None:
    faulty = pool[0]
    # Both have another model loaded (so neither is preferred); the faulty WebUI ignores the
    # requested one and renders with what it has.
    for sim in pool:
        httpx.post(f"{sim.url}/sdapi/v1/options", json={"sd_model_checkpoint": "other.safetensors"})
    faulty.faults.ignore_checkpoint = True
    live = pool_live()
    client = live.user("alice")
    job = wait_final(client, submit(client, create_character(client))["id"])
    assert job["state"] == "succeeded"
    assert job["attemptHistory"][0]["errorCode"] == "wrong_checkpoint"
    assert job["backend"] == "anime-cartoon-fantasy-2"
    with live.container.db.session() as session:
        from sqlalchemy import select

        from charforge.db.models import Image

        models = session.scalars(select(Image.checkpoint)).all()
    assert models == ["diving.safetensors"]


def test_a_slow_checkpoint_switch_still_succeeds_and_is_counted(
    pool_live: Any, pool: tuple[A1111Simulator, A1111Simulator]
) -> None:
    for sim in pool:  # neither has the checkpoint: a switch is unavoidable, and slow
        httpx.post(f"{sim.url}/sdapi/v1/options", json={"sd_model_checkpoint": "other.safetensors"})
        sim.faults.switch_delay_seconds = 0.5
    live = pool_live()
    client = live.user("alice")
    job = wait_final(client, submit(client, create_character(client))["id"])
    assert job["state"] == "succeeded" and job["attempts"] == 1
    metrics = client.get("/metrics").text
    assert 'charforge_checkpoint_switches_total{backend="anime-cartoon-fantasy"} 1.0' in metrics


def test_when_every_backend_fails_the_job_fails_clearly_after_its_attempts(
    pool_live: Any, pool: tuple[A1111Simulator, A1111Simulator]
) -> None:
    for sim in pool:
        sim.faults.fail_status = 500
        sim.faults.fail_message = "CUDA out of memory"
    live = pool_live(job_max_attempts=3)
    client = live.user("alice")
    job = wait_final(client, submit(client, create_character(client))["id"])
    assert job["state"] == "failed"
    assert job["attempts"] == 3 and len(job["attemptHistory"]) == 3
    assert [a["outcome"] for a in job["attemptHistory"]] == ["retried", "retried", "failed"]
    # It alternated instead of hammering one backend.
    assert job["attemptHistory"][0]["backend"] != job["attemptHistory"][1]["backend"]
    assert job["error"]["code"] == "backend_error"
    assert "CUDA out of memory" in job["error"]["message"]
    assert job["images"] == []


def test_a_permanent_error_fails_at_once(
    pool_live: Any, pool: tuple[A1111Simulator, A1111Simulator]
) -> None:
    live = pool_live()
    client = live.user("alice")
    character = create_character(client)
    job = wait_final(client, submit(client, character, sampler="No Such Sampler")["id"])
    assert job["state"] == "failed" and job["attempts"] == 1
    assert job["error"]["code"] == "validation_error" and job["error"]["field"] == "sampler"
    assert all(not sim.txt2img_bodies() for sim in pool)


def test_a_missing_checkpoint_is_tried_on_the_rest_of_the_pool_only(
    pool_live: Any, pool: tuple[A1111Simulator, A1111Simulator]
) -> None:
    live = pool_live()
    client = live.user("alice")
    made = character_whose_checkpoint_went_away(live, "alice", "Mika", "nowhere.safetensors")
    job = wait_final(client, submit(client, made)["id"])
    assert job["state"] == "failed" and job["attempts"] == 2  # each backend once, no more
    assert job["error"]["code"] == "checkpoint_missing"
    assert {a["backend"] for a in job["attemptHistory"]} == {
        "anime-cartoon-fantasy",
        "anime-cartoon-fantasy-2",
    }


def test_a_backend_marked_down_is_skipped_until_it_recovers(
    pool_live: Any, pool: tuple[A1111Simulator, A1111Simulator]
) -> None:
    faulty = pool[0]
    faulty.faults.fail_status = 502
    live = pool_live(health_failures=2, health_interval=2.0)
    client = live.user("alice")
    character = create_character(client)
    for _ in range(2):
        assert wait_final(client, submit(client, character)["id"])["state"] == "succeeded"
    status = live.container.pool.status("anime-cartoon-fantasy")
    assert not status.healthy and status.failures >= 2
    faulty.clear_requests()
    # While down, jobs go straight to the healthy one: no wasted attempt on the faulty one.
    job = wait_final(client, submit(client, character)["id"])
    assert job["attempts"] == 1 and job["backend"] == "anime-cartoon-fantasy-2"
    assert not faulty.txt2img_bodies()
    # Fixed: the background probe brings it back (after a short backoff).
    faulty.faults.fail_status = None
    import time

    deadline = time.monotonic() + 10
    while not live.container.pool.status("anime-cartoon-fantasy").healthy:
        assert time.monotonic() < deadline, "the backend was never probed back to health"
        time.sleep(0.1)
