"""The A1111 adapter against the A1111 stand-in over real HTTP: one task followed in a WebUI
whose progress and interrupt are global, names as A1111 spells them, LoRA tags, and the
errors that fail again (NaNs, a damaged checkpoint)."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from typing import Any

import httpx
import pytest

from charforge.backends.a1111 import A1111Backend
from charforge.backends.a1111 import adapter as adapter_module
from charforge.backends.base import BackendRequest, BackendResult, Progress
from charforge.domain.params import GenerationParams
from charforge.domain.routes import BackendSpec
from charforge.errors import (
    BackendInterrupted,
    BackendTimeout,
    CheckpointUnloadable,
    LoraMissing,
    NanProduced,
)
from charforge.simulator import A1111Simulator, Faults, SimulatorSettings

WAIT = 15.0
MODELS = ["diving.safetensors", "other.safetensors", "broken.safetensors"]
LORAS = ["detail_tweaker.safetensors", "styles/outline.safetensors"]


def _start(name: str, **settings: Any) -> A1111Simulator:
    sim = A1111Simulator(SimulatorSettings(models=list(MODELS), name=name, **settings))
    sim.start()
    return sim


@pytest.fixture(scope="module")
def webui() -> Iterator[A1111Simulator]:
    sim = _start("webui", loras=list(LORAS))
    yield sim
    sim.stop()


@pytest.fixture(scope="module")
def api_only_webui() -> Iterator[A1111Simulator]:
    sim = _start("api-only", nowebui=True)  # A1111 --nowebui: no /internal/progress
    yield sim
    sim.stop()


@pytest.fixture
def sim(webui: A1111Simulator) -> Iterator[A1111Simulator]:
    webui.reset()
    webui.settings.loras = list(LORAS)
    yield webui
    webui.faults = Faults()


def backend_for(sim: A1111Simulator, timeout: float = 10.0) -> A1111Backend:
    spec = BackendSpec(
        name="gpu",
        kind="a1111",
        url=sim.url,
        auth=None,
        timeout=timeout,
        connect_timeout=2.0,
        source="RUNPOD_ANIME_CARTOON_FANTASY_URL",
    )
    return A1111Backend(spec, probe_timeout=2.0)


@pytest.fixture
def backend(sim: A1111Simulator) -> Iterator[A1111Backend]:
    adapter = backend_for(sim)
    yield adapter
    adapter.close()


def params(**changes: Any) -> GenerationParams:
    base = GenerationParams(
        prompt="Sakura in a garden",
        negative_prompt="",
        width=64,
        height=64,
        steps=4,
        cfg_scale=8.0,
        seed=1234,
        sampler="DPM++ 2M",
        scheduler="Karras",
        hires=False,
        hires_scale=1.5,
        hires_upscaler="Latent",
        denoising_strength=0.5,
    )
    return replace(base, **changes)


def request(
    backend: A1111Backend,
    task: str,
    *,
    checkpoint: str = "diving.safetensors",
    on_progress: Callable[[Progress], None] | None = None,
    **changes: Any,
) -> BackendRequest:
    listed = backend.find_checkpoint(checkpoint, style="anime")
    return BackendRequest(
        "anime", listed, params(**changes), 1, on_progress=on_progress, task_id=task
    )


def wait_for(condition: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + WAIT
    while not condition():
        assert time.monotonic() < deadline, f"waited {WAIT:g}s for {what}"
        time.sleep(0.01)


class Call:
    """A generate call in a thread of its own, as the job runner makes it."""

    def __init__(self, backend: A1111Backend, req: BackendRequest) -> None:
        self.result: BackendResult | None = None
        self.error: Exception | None = None
        self._thread = threading.Thread(target=self._run, args=(backend, req), daemon=True)
        self._thread.start()

    def _run(self, backend: A1111Backend, req: BackendRequest) -> None:
        try:
            self.result = backend.generate(req)
        except Exception as exc:
            self.error = exc

    def join(self) -> Call:
        self._thread.join(WAIT)
        assert not self._thread.is_alive(), "the generate call did not return"
        return self


def sampling_step(sim: A1111Simulator) -> int:
    state = httpx.get(f"{sim.url}/sdapi/v1/progress").json()["state"]
    return int(state["sampling_step"]) if state["job_count"] else 0


def stopped(sim: A1111Simulator) -> list[str]:
    return [entry["task"] for entry in sim.interrupted_tasks + sim.skipped_tasks]


# -- one task at a time in a WebUI whose state is global -------------------------------------


def test_cancelling_a_task_that_waits_behind_another_never_stops_the_running_one(
    sim: A1111Simulator, backend: A1111Backend
) -> None:
    sim.faults.delay_seconds = 1.0
    seen_a: list[Progress] = []
    first = Call(backend, request(backend, "task-a", steps=20, on_progress=seen_a.append))
    wait_for(lambda: sim.current_task == "task-a", "task A to run")
    second = Call(backend, request(backend, "task-b", steps=5))
    wait_for(lambda: "task-b" in sim.pending_tasks, "task B to wait in the WebUI's queue")

    assert backend.interrupt("task-b") is True  # it waits: stopped when it starts
    assert stopped(sim) == []  # ... and the running task A was not touched

    first.join()
    second.join()
    assert first.error is None and first.result is not None
    assert sim.task_runs["task-a"]["outcome"] == "finished"
    assert isinstance(second.error, BackendInterrupted)
    assert stopped(sim) == ["task-b"]  # B was stopped once it ran, and only B
    assert {p.steps for p in seen_a} <= {None, 20}  # A's progress was A's own


def test_a_cancel_before_the_task_is_known_sends_nothing(
    sim: A1111Simulator, backend: A1111Backend
) -> None:
    cancelled = threading.Event()
    cancelled.set()  # e.g. while the names were still being checked
    with pytest.raises(BackendInterrupted):
        backend.generate(replace(request(backend, "task-a"), cancelled=cancelled))
    assert sim.txt2img_bodies() == []


def test_the_attempts_own_cancel_stops_its_running_task(
    sim: A1111Simulator, backend: A1111Backend
) -> None:
    sim.faults.delay_seconds = 2.0
    cancelled = threading.Event()
    call = Call(backend, replace(request(backend, "task-a", steps=20), cancelled=cancelled))
    wait_for(lambda: sim.current_task == "task-a", "the task to run")
    cancelled.set()  # nobody calls interrupt(): the watch acts on the event alone

    call.join()
    assert isinstance(call.error, BackendInterrupted)
    assert stopped(sim) == ["task-a"]


def test_an_interrupt_from_outside_is_never_a_result(
    sim: A1111Simulator, backend: A1111Backend
) -> None:
    sim.faults.delay_seconds = 1.0
    call = Call(backend, request(backend, "task-a", steps=20))
    wait_for(lambda: sim.current_task == "task-a", "the task to run")
    httpx.post(f"{sim.url}/sdapi/v1/interrupt")  # someone presses Interrupt in the WebUI

    call.join()
    assert isinstance(call.error, BackendInterrupted)
    assert "half-made" in str(call.error)
    assert sim.task_runs["task-a"]["outcome"] == "interrupted"  # A1111 answered 200 anyway


@pytest.mark.parametrize("route", ["interrupt", "skip"])
def test_the_check_after_the_answer_catches_what_the_progress_watch_missed(
    sim: A1111Simulator, backend: A1111Backend, monkeypatch: pytest.MonkeyPatch, route: str
) -> None:
    monkeypatch.setattr(adapter_module, "_PROGRESS_INTERVAL", 60.0)  # the watch looks once
    sim.faults.delay_seconds = 1.0
    call = Call(backend, request(backend, "task-a", steps=20))
    wait_for(lambda: sim.current_task == "task-a", "the task to run")
    time.sleep(0.2)  # past the watch's first look
    httpx.post(f"{sim.url}/sdapi/v1/{route}")

    call.join()
    assert isinstance(call.error, BackendInterrupted)


def test_a_whole_run_is_a_result_even_after_an_interrupt_of_an_earlier_task(
    sim: A1111Simulator, backend: A1111Backend
) -> None:
    httpx.post(f"{sim.url}/sdapi/v1/interrupt")  # pressed while idle: A1111 keeps the flag
    result = backend.generate(request(backend, "task-a"))  # begin() clears it
    assert len(result.images) == 1 and stopped(sim) == []


def test_progress_never_carries_the_previous_tasks_step_count(
    sim: A1111Simulator, backend: A1111Backend
) -> None:
    backend.generate(request(backend, "task-long", steps=30))  # leaves sampling_steps = 30
    sim.faults.switch_delay_seconds = 1.2  # a checkpoint load before the sampler starts
    sim.faults.delay_seconds = 1.0
    seen: list[Progress] = []
    backend.generate(
        request(backend, "task-short", checkpoint="other", steps=4, on_progress=seen.append)
    )

    assert seen, "no progress was reported"
    assert {p.steps for p in seen} <= {None, 4}
    assert any(p.steps == 4 for p in seen)


def test_a_timed_out_task_is_stopped_when_it_starts_never_the_task_ahead(
    sim: A1111Simulator,
) -> None:
    backend = backend_for(sim, timeout=1.0)
    sim.faults.delay_seconds = 2.0
    body = {"prompt": "someone else's", "steps": 10, "width": 64, "height": 64}
    others = threading.Thread(
        target=lambda: httpx.post(
            f"{sim.url}/sdapi/v1/txt2img", json={**body, "force_task_id": "other"}, timeout=30
        )
    )
    others.start()
    wait_for(lambda: sim.current_task == "other", "the other client's task to run")
    try:
        with pytest.raises(BackendTimeout):
            backend.generate(request(backend, "task-a", steps=10))
        assert stopped(sim) == []  # the task running was the other client's
        wait_for(lambda: stopped(sim) == ["task-a"], "charforge's task to be stopped")
        others.join(WAIT)
        assert sim.task_runs["other"]["outcome"] == "finished"
    finally:
        backend.close()


def test_without_a_per_task_route_the_open_request_is_followed(
    api_only_webui: A1111Simulator,
) -> None:
    sim = api_only_webui
    sim.reset()
    assert httpx.post(f"{sim.url}/internal/progress", json={"id_task": "x"}).status_code == 404
    backend = backend_for(sim)
    try:
        sim.faults.delay_seconds = 1.0
        seen: list[Progress] = []
        backend.generate(request(backend, "task-a", steps=10, on_progress=seen.append))
        assert any(p.steps == 10 for p in seen)
        call = Call(backend, request(backend, "task-b", steps=10))
        wait_for(lambda: sampling_step(sim) > 0, "the task to run")
        assert backend.interrupt("task-b") is True
        call.join()
        assert isinstance(call.error, BackendInterrupted)
        assert stopped(sim) == ["task-b"]
    finally:
        sim.faults = Faults()
        backend.close()


# -- names as A1111 spells them --------------------------------------------------------------


@pytest.mark.parametrize(
    ("sampler", "scheduler", "ran"),
    [
        ("DPM++ 2M Karras", "Karras", ("DPM++ 2M", "Karras")),
        ("k_euler_a", "exponential", ("Euler a", "Exponential")),
        ("euler", "karras", ("Euler", "Karras")),
    ],
)
def test_every_spelling_a1111_takes_runs_and_reports_the_canonical_names(
    sim: A1111Simulator,
    backend: A1111Backend,
    sampler: str,
    scheduler: str,
    ran: tuple[str, str],
) -> None:
    result = backend.generate(request(backend, "task-a", sampler=sampler, scheduler=scheduler))

    (body,) = sim.txt2img_bodies()
    assert (body["sampler_name"], body["scheduler"]) == ran  # sent as txt2img looks them up
    assert (result.sampler, result.scheduler) == ran
    run = sim.task_runs["task-a"]
    assert (run["sampler_name"], run["schedule_type"]) == ran  # what the WebUI really ran


# -- LoRA tags -------------------------------------------------------------------------------


def test_a_known_lora_runs_and_its_hash_is_kept(sim: A1111Simulator, backend: A1111Backend) -> None:
    result = backend.generate(request(backend, "task-a", prompt="<lora:detail_tweaker:0.6> Sakura"))
    extra = result.images[0].extra
    assert extra["Lora hashes"].startswith("detail_tweaker: ")
    assert sim.task_runs["task-a"]["loras"]


def test_an_unknown_lora_is_refused_before_anything_runs(
    sim: A1111Simulator, backend: A1111Backend
) -> None:
    with pytest.raises(LoraMissing) as missing:
        backend.generate(request(backend, "task-a", prompt="<lora:nosuch:0.8> Sakura"))

    error = missing.value
    assert error.status == 422 and error.field == "prompt" and error.backend_specific
    assert "'nosuch'" in error.message and "detail_tweaker" in error.message
    assert error.extra["loras"] == ["detail_tweaker", "outline"]
    assert sim.txt2img_bodies() == []  # A1111 would have rendered without it
    assert any(r.path == "/sdapi/v1/refresh-loras" for r in sim.requests)  # looked again first

    sim.settings.loras = [*LORAS, "nosuch.safetensors"]  # the file is added to models/Lora
    backend.generate(request(backend, "task-b", prompt="<lora:nosuch:0.8> Sakura"))
    assert len(sim.txt2img_bodies()) == 1


# -- errors that fail again ------------------------------------------------------------------


def test_nans_are_their_own_error_with_the_fix_in_the_hint(
    sim: A1111Simulator, backend: A1111Backend
) -> None:
    sim.faults.nan_prompts = ["cursed"]
    with pytest.raises(NanProduced) as nan:
        backend.generate(request(backend, "task-a", prompt="a cursed portrait"))

    assert not nan.value.retriable and nan.value.backend_specific
    assert nan.value.code == "nan_error"
    assert "--no-half" in (nan.value.hint or "")
    assert "Upcast cross attention layer to float32" in (nan.value.hint or "")


def test_a_damaged_checkpoint_names_the_file(sim: A1111Simulator, backend: A1111Backend) -> None:
    sim.faults.corrupt_checkpoints = ["broken.safetensors"]
    with pytest.raises(CheckpointUnloadable) as broken:
        backend.generate(request(backend, "task-a", checkpoint="broken"))

    assert not broken.value.retriable and broken.value.backend_specific
    assert "broken.safetensors" in broken.value.message
    assert "MetadataIncompleteBuffer" in broken.value.message
    assert "broken.safetensors" in (broken.value.hint or "")
    # A1111 now names the file it failed on as loaded: the pool must not believe it.
    assert backend.loaded_checkpoint() == "broken.safetensors"
