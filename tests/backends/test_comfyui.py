"""The ComfyUI adapter over real HTTP and websockets against the fake ComfyUI."""

from __future__ import annotations

import io
import json
import threading
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import httpx
import pytest
from PIL import Image

from charforge.backends.base import BackendRequest, CheckpointInfo, Progress
from charforge.backends.comfyui import ComfyUIBackend
from charforge.backends.comfyui.graph import HiresUpscale, build_graph, hires_upscale
from charforge.backends.comfyui.prompts import PromptRunner
from charforge.config import BackendConfig, RouteConfig
from charforge.domain.capabilities import capabilities_for
from charforge.domain.params import SEED_MAX, GenerationParams
from charforge.domain.routes import BackendSpec
from charforge.errors import (
    BackendAuthFailed,
    BackendBadResponse,
    BackendRejected,
    BackendTimeout,
    BackendUnavailable,
    CheckpointMissing,
    InvalidInput,
    LoraMissing,
    UnsupportedCapability,
)
from charforge.simulator import A1111Simulator
from tests.fakes.comfyui import FakeComfyUI
from tests.jobs.conftest import create_character

SOURCE = "[backends.comfy] in charforge.toml"
DIVING = CheckpointInfo("diving.safetensors", "diving.safetensors", None)
# How long a test waits for something the fake does in the background. Generous: a loaded
# 2-core CI machine runs the fake's server, its worker thread and the test side by side.
WAIT = 30.0


@pytest.fixture
def fake() -> Iterator[FakeComfyUI]:
    server = FakeComfyUI().start()
    yield server
    server.stop()


def spec_for(url: str, **changes: Any) -> BackendSpec:
    spec = BackendSpec(
        name="comfy",
        kind="comfyui",
        url=url,
        auth=None,
        timeout=WAIT,
        connect_timeout=2.0,
        source=SOURCE,
        capabilities=capabilities_for("comfyui"),
    )
    return replace(spec, **changes)


@pytest.fixture
def backend(fake: FakeComfyUI) -> Iterator[ComfyUIBackend]:
    adapter = ComfyUIBackend(spec_for(fake.url), probe_timeout=2.0)
    yield adapter
    adapter.close()


def params(**changes: Any) -> GenerationParams:
    """charforge's defaults (DESIGN.md section 2), few steps to keep tests quick."""
    base = GenerationParams(
        prompt="Sakura in a garden, pink hair",
        negative_prompt="blurry",
        width=512,
        height=768,
        steps=3,
        cfg_scale=8.0,
        seed=1234,
        sampler="DPM++ 2M",
        scheduler="Karras",
        hires=True,
        hires_scale=1.5,
        hires_upscaler="Latent",
        denoising_strength=0.5,
    )
    return replace(base, **changes)


TASK = "charforge-job-1"


def request(count: int = 1, checkpoint: CheckpointInfo = DIVING, **changes: Any) -> BackendRequest:
    return BackendRequest("anime", checkpoint, params(**changes), count, task_id=TASK)


def size_of(data: bytes) -> tuple[int, int]:
    with Image.open(io.BytesIO(data)) as png:
        return png.size


def wait_for(condition: Any, what: str) -> None:
    deadline = time.monotonic() + WAIT
    while not condition():
        assert time.monotonic() < deadline, f"waited {WAIT:g}s for {what}"
        time.sleep(0.02)


def queue_of(fake: FakeComfyUI) -> tuple[list[str], list[str]]:
    """The prompt ids running and pending, read from GET /queue as a client would."""
    body = httpx.get(f"{fake.url}/queue").json()
    return [item[1] for item in body["queue_running"]], [item[1] for item in body["queue_pending"]]


def history_reads(fake: FakeComfyUI) -> int:
    return len([r for r in fake.requests if r.path.startswith("/history/")])


def in_background(call: Any) -> tuple[threading.Thread, list[Any]]:
    """Run ``call`` in a thread; its result or exception lands in the list."""
    outcome: list[Any] = []

    def run() -> None:
        try:
            outcome.append(call())
        except BaseException as exc:
            outcome.append(exc)

    worker = threading.Thread(target=run, daemon=True)
    worker.start()
    return worker, outcome


def finished(worker: threading.Thread, outcome: list[Any]) -> Any:
    worker.join(WAIT)
    assert not worker.is_alive(), "the generation did not end"
    return outcome[0]


# -- the graph and what comes back -------------------------------------------------------------


def test_default_request_sends_comfyuis_txt2img_graph_with_the_hires_pass(
    fake: FakeComfyUI, backend: ComfyUIBackend
) -> None:
    seen: list[Progress] = []
    result = backend.generate(BackendRequest("anime", DIVING, params(), 2, on_progress=seen.append))

    first, second = fake.prompts()
    sampling = {
        "model": ["4", 0],
        "seed": 1234,
        "steps": 3,
        "cfg": 8.0,
        "sampler_name": "dpmpp_2m",
        "scheduler": "karras",
        "positive": ["6", 0],
        "negative": ["7", 0],
    }
    assert first == {
        "4": {
            "class_type": "CheckpointLoaderSimple",
            "inputs": {"ckpt_name": "diving.safetensors"},
        },
        "6": {
            "class_type": "CLIPTextEncode",
            "inputs": {"text": "Sakura in a garden, pink hair", "clip": ["4", 1]},
        },
        "7": {"class_type": "CLIPTextEncode", "inputs": {"text": "blurry", "clip": ["4", 1]}},
        "5": {
            "class_type": "EmptyLatentImage",
            "inputs": {"width": 512, "height": 768, "batch_size": 1},
        },
        "3": {
            "class_type": "KSampler",
            "inputs": {**sampling, "latent_image": ["5", 0], "denoise": 1.0},
        },
        "10": {
            "class_type": "LatentUpscaleBy",
            "inputs": {"samples": ["3", 0], "upscale_method": "bilinear", "scale_by": 1.5},
        },
        "11": {
            "class_type": "KSampler",
            "inputs": {**sampling, "latent_image": ["10", 0], "denoise": 0.5},
        },
        "8": {"class_type": "VAEDecode", "inputs": {"samples": ["11", 0], "vae": ["4", 2]}},
        "9": {
            "class_type": "SaveImage",
            "inputs": {"images": ["8", 0], "filename_prefix": "charforge"},
        },
    }
    assert second["3"]["inputs"]["seed"] == second["11"]["inputs"]["seed"] == 1235
    # Each prompt's events went to the websocket opened for it, before it was queued.
    sockets = [r.query["clientId"] for r in fake.requests if r.method == "WS"]
    assert sockets == [body["client_id"] for body in fake.posted("/prompt")]
    assert len(set(sockets)) == 2

    assert [image.seed for image in result.images] == [1234, 1235]
    assert [size_of(image.data) for image in result.images] == [(768, 1152)] * 2
    assert result.checkpoint == "diving.safetensors" and result.checkpoint_hash is None
    assert result.info["hires_upscaler_used"] == "bilinear (latent)"
    assert result.info["hires_upscaler_asked"] == "Latent"
    with Image.open(io.BytesIO(result.images[0].data)) as png:
        assert json.loads(png.info["prompt"])["3"]["inputs"]["seed"] == 1234

    fractions = [p.fraction for p in seen]
    assert fractions == sorted(fractions) and fractions[-1] == 1.0
    assert any(0.4 < f < 0.6 for f in fractions)  # the first of two images done: half way
    assert {(p.step, p.steps) for p in seen if p.step is not None} == {(1, 3), (2, 3), (3, 3)}


def test_random_seed_is_chosen_once_and_counted_up(
    fake: FakeComfyUI, backend: ComfyUIBackend
) -> None:
    result = backend.generate(request(count=2, seed=-1, hires=False))

    seeds = [graph["3"]["inputs"]["seed"] for graph in fake.prompts()]
    assert seeds[1] == (seeds[0] + 1) % (SEED_MAX + 1) and 0 <= seeds[0] <= SEED_MAX
    assert [image.seed for image in result.images] == seeds
    assert size_of(result.images[0].data) == (512, 768)
    assert "10" not in fake.prompts()[0]  # no second pass without hires
    assert "hires_upscaler_used" not in result.info


def test_seeds_counted_up_from_the_largest_wrap_around_to_zero(
    fake: FakeComfyUI, backend: ComfyUIBackend
) -> None:
    result = backend.generate(request(count=2, seed=SEED_MAX, hires=False))

    assert [graph["3"]["inputs"]["seed"] for graph in fake.prompts()] == [4294967295, 0]
    assert [image.seed for image in result.images] == [4294967295, 0]
    assert result.info["seeds"] == [4294967295, 0]


@pytest.mark.parametrize(
    ("upscaler", "method"), [("R-ESRGAN 4x+", "lanczos"), ("Lanczos", "lanczos")]
)
def test_a_pixel_upscaler_runs_the_hires_pass_in_pixel_space(
    fake: FakeComfyUI, backend: ComfyUIBackend, upscaler: str, method: str
) -> None:
    result = backend.generate(request(hires_upscaler=upscaler))

    graph = fake.prompts()[0]
    assert graph["12"] == {
        "class_type": "VAEDecode",
        "inputs": {"samples": ["3", 0], "vae": ["4", 2]},
    }
    assert graph["10"] == {
        "class_type": "ImageScaleBy",
        "inputs": {"image": ["12", 0], "upscale_method": method, "scale_by": 1.5},
    }
    assert graph["13"] == {
        "class_type": "VAEEncode",
        "inputs": {"pixels": ["10", 0], "vae": ["4", 2]},
    }
    second = graph["11"]["inputs"]
    assert (second["latent_image"], second["denoise"]) == (["13", 0], 0.5)
    assert graph["8"]["inputs"]["samples"] == ["11", 0]
    assert "LatentUpscaleBy" not in {node["class_type"] for node in graph.values()}
    assert size_of(result.images[0].data) == (768, 1152)  # the first pass x 1.5
    assert result.info["hires_upscaler_used"] == f"{method} (pixel)"
    assert result.info["hires_upscaler_asked"] == upscaler


@pytest.mark.parametrize(
    ("upscaler", "expected"),
    [
        ("Latent", HiresUpscale("latent", "bilinear")),
        ("Latent (nearest-exact)", HiresUpscale("latent", "nearest-exact")),
        ("latent (something new)", HiresUpscale("latent", "bislerp")),
        ("ESRGAN_4x", HiresUpscale("pixel", "lanczos")),
        ("SwinIR 4x", HiresUpscale("pixel", "lanczos")),
        ("None", HiresUpscale("pixel", "lanczos")),
        ("Nearest", HiresUpscale("pixel", "nearest-exact")),
        ("bicubic", HiresUpscale("pixel", "bicubic")),
    ],
)
def test_hires_upscaler_names_map_to_a_latent_or_a_pixel_pass(
    upscaler: str, expected: HiresUpscale
) -> None:
    assert hires_upscale(upscaler) == expected
    graph = build_graph(params(hires_upscaler=upscaler), "x.safetensors", 1)
    kind = "LatentUpscaleBy" if expected.space == "latent" else "ImageScaleBy"
    assert graph["10"]["class_type"] == kind
    assert graph["10"]["inputs"]["upscale_method"] == expected.method


def test_lora_tags_become_loader_nodes_and_leave_the_prompt(
    fake: FakeComfyUI, backend: ComfyUIBackend
) -> None:
    backend.generate(request(prompt="<lora:detail:0.7> Sakura, pink hair", hires=False))

    graph = fake.prompts()[0]
    assert graph["lora1"] == {
        "class_type": "LoraLoader",
        "inputs": {
            "model": ["4", 0],
            "clip": ["4", 1],
            "lora_name": "detail.safetensors",
            "strength_model": 0.7,
            "strength_clip": 0.7,
        },
    }
    assert graph["6"]["inputs"] == {"text": "Sakura, pink hair", "clip": ["lora1", 1]}
    assert graph["3"]["inputs"]["model"] == ["lora1", 0]


def test_identical_graph_returns_the_cached_image_without_running_again(
    fake: FakeComfyUI, backend: ComfyUIBackend
) -> None:
    first = backend.generate(request(seed=7, hires=False))
    again = backend.generate(request(seed=7, hires=False))

    assert fake.saves == 1  # ComfyUI ran nothing the second time
    second_id = again.info["prompt_ids"][0]
    messages = dict(fake.history[second_id]["status"]["messages"])
    assert sorted(messages["execution_cached"]["nodes"]) == sorted(fake.prompts()[1])
    assert again.images[0].data == first.images[0].data
    assert again.images[0].seed == 7 and again.checkpoint == "diving.safetensors"


# -- names checked before queueing --------------------------------------------------------------


@pytest.mark.parametrize("shape", ["old", "new"])
def test_checkpoints_are_listed_from_either_object_info_shape(shape: str) -> None:
    server = FakeComfyUI(["diving.safetensors", "sd15/other.safetensors"], object_info_shape=shape)
    server.start()
    adapter = ComfyUIBackend(spec_for(server.url))
    try:
        raw = httpx.get(f"{server.url}/object_info/CheckpointLoaderSimple").json()
        spec = raw["CheckpointLoaderSimple"]["input"]["required"]["ckpt_name"]
        assert (spec[0] == "COMBO") == (shape == "new")

        assert adapter.find_checkpoint("other.safetensors", style="anime") == CheckpointInfo(
            "sd15/other.safetensors", "sd15/other.safetensors", None
        )
        probe = adapter.probe()
        assert probe.ok and probe.loaded is None
        assert [c.name for c in probe.checkpoints] == [
            "diving.safetensors",
            "sd15/other.safetensors",
        ]
        with pytest.raises(CheckpointMissing) as missing:
            adapter.find_checkpoint("gone.safetensors", style="anime")
    finally:
        adapter.close()
        server.stop()
    message = missing.value.message
    assert "'gone.safetensors'" in message and "'comfy'" in message
    assert "diving.safetensors, sd15/other.safetensors" in message and server.url not in message
    assert "models/checkpoints" in (missing.value.hint or "") and SOURCE in (
        missing.value.hint or ""
    )


def test_unknown_sampler_is_refused_before_anything_is_queued(
    fake: FakeComfyUI, backend: ComfyUIBackend
) -> None:
    with pytest.raises(InvalidInput) as refused:
        backend.generate(request(sampler="Fancy Sampler"))

    assert refused.value.field == "sampler"
    assert "'Fancy Sampler'" in refused.value.message and "dpmpp_2m" in refused.value.message
    with pytest.raises(InvalidInput) as bad_scheduler:
        backend.generate(request(scheduler="wobbly"))
    assert bad_scheduler.value.field == "scheduler" and "karras" in bad_scheduler.value.message
    assert fake.posted("/prompt") == []


# -- ComfyUI's refusals and failures ------------------------------------------------------------


def test_fake_answers_an_unknown_checkpoint_like_comfyui(fake: FakeComfyUI) -> None:
    graph = build_graph(params(), "x.safetensors", 1)
    graph["8"]["inputs"]["vae"] = ["4", 1]  # a CLIP where the VAE belongs
    response = httpx.post(f"{fake.url}/prompt", json={"prompt": graph})

    assert response.status_code == 400
    body = response.json()
    assert body["error"]["type"] == "prompt_outputs_failed_validation"
    assert body["node_errors"]["4"]["class_type"] == "CheckpointLoaderSimple"
    error = body["node_errors"]["4"]["errors"][0]
    assert error["type"] == "value_not_in_list"
    assert (
        error["details"]
        == "ckpt_name: 'x.safetensors' not in ['diving.safetensors', 'sd15/other.safetensors']"
    )
    assert error["extra_info"]["received_value"] == "x.safetensors"
    assert body["node_errors"]["4"]["dependent_outputs"] == ["9"]
    mismatch = body["node_errors"]["8"]["errors"][0]
    assert (mismatch["type"], mismatch["details"]) == ("return_type_mismatch", "vae, CLIP != VAE")
    assert "Value not in list" not in body["error"]["details"]  # only the output's own reasons


def test_checkpoint_comfyui_refuses_is_checkpoint_missing(
    fake: FakeComfyUI, backend: ComfyUIBackend
) -> None:
    gone = CheckpointInfo("gone.safetensors", "gone.safetensors", None)
    with pytest.raises(CheckpointMissing) as missing:
        backend.generate(request(checkpoint=gone))

    message = missing.value.message
    assert "'gone.safetensors'" in message and "'comfy'" in message and "not in" in message
    assert fake.url not in message and "models/checkpoints" in (missing.value.hint or "")


def test_other_validation_errors_quote_node_input_and_message(
    fake: FakeComfyUI, backend: ComfyUIBackend
) -> None:
    with pytest.raises(BackendRejected) as rejected:
        backend.generate(request(prompt="<lora:detail:500> Sakura", hires=False))

    assert rejected.value.retriable is False
    message = rejected.value.message
    assert "LoraLoader (node lora1) input strength_model" in message
    assert "500" in message and fake.url not in message


def test_an_unknown_lora_is_refused_before_anything_is_queued(
    fake: FakeComfyUI, backend: ComfyUIBackend
) -> None:
    with pytest.raises(LoraMissing) as missing:
        backend.generate(request(prompt="<lora:missing:1> Sakura", hires=False))

    assert missing.value.status == 422 and missing.value.field == "prompt"
    assert "'missing'" in missing.value.message and "detail.safetensors" in missing.value.message
    assert missing.value.backend_specific  # another backend of the pool may have it
    assert fake.posted("/prompt") == []


def test_a_lora_tag_finds_its_file_in_a_subfolder(
    fake: FakeComfyUI, backend: ComfyUIBackend
) -> None:
    fake.loras = ["detail.safetensors", "styles/outline.safetensors"]
    backend.generate(request(prompt="<lora:outline:0.5> Sakura", hires=False))

    (graph,) = fake.prompts()
    assert graph["lora1"]["inputs"]["lora_name"] == "styles/outline.safetensors"


@pytest.mark.parametrize(
    ("exception", "retriable"),
    [
        (("torch.OutOfMemoryError", "Allocation on device"), True),
        (("ValueError", "bad latent"), False),
    ],
)
def test_execution_error_names_the_node_and_retries_only_when_out_of_memory(
    fake: FakeComfyUI, backend: ComfyUIBackend, exception: tuple[str, str], retriable: bool
) -> None:
    fake.faults.execution_error = exception

    with pytest.raises(BackendRejected) as failed:
        backend.generate(request(hires=False))

    assert failed.value.retriable is retriable
    assert "node 3 (KSampler)" in failed.value.message and exception[1] in failed.value.message


def test_failure_seen_only_in_the_history_is_reported_too(
    fake: FakeComfyUI, backend: ComfyUIBackend
) -> None:
    fake.faults.drop_websocket = True
    fake.faults.execution_error = ("RuntimeError", "mat1 and mat2 shapes cannot be multiplied")

    with pytest.raises(BackendRejected) as failed:
        backend.generate(request(hires=False))

    assert failed.value.retriable is False
    assert "node 3 (KSampler): RuntimeError: mat1 and mat2" in failed.value.message


def test_websocket_dropped_mid_prompt_falls_back_to_polling_history(
    fake: FakeComfyUI, backend: ComfyUIBackend
) -> None:
    fake.faults.drop_websocket = True

    result = backend.generate(request(count=2, hires=False))

    assert [size_of(image.data) for image in result.images] == [(512, 768)] * 2
    assert len([r for r in fake.requests if r.path.startswith("/history/")]) >= 2


def test_websocket_refused_is_followed_by_polling(
    fake: FakeComfyUI, backend: ComfyUIBackend
) -> None:
    fake.faults.refuse_websocket = True
    fake.faults.step_delay = 0.05

    result = backend.generate(request(hires=False))

    assert result.checkpoint == "diving.safetensors" and len(result.images) == 1


def test_prompt_that_never_finishes_times_out_and_is_interrupted(fake: FakeComfyUI) -> None:
    fake.faults.hang = True
    # The whole budget: long enough that queueing always happens before the deadline.
    adapter = ComfyUIBackend(spec_for(fake.url, timeout=3.0))
    try:
        with pytest.raises(BackendTimeout) as timed_out:
            adapter.generate(request(hires=False))
    finally:
        adapter.close()

    assert timed_out.value.retriable and "3s" in timed_out.value.message
    [interrupt] = fake.posted("/interrupt")
    prompt_id = interrupt["prompt_id"]
    assert fake.posted("/queue") == []  # it ran: nothing to delete from the queue
    # The interrupted prompt ends in the history.
    wait_for(lambda: prompt_id in fake.history, "the interrupted prompt's history")
    assert fake.history[prompt_id]["status"]["status_str"] == "error"


def test_interrupt_stops_the_running_generation(fake: FakeComfyUI, backend: ComfyUIBackend) -> None:
    fake.faults.hang = True
    worker, outcome = in_background(lambda: backend.generate(request(count=3, hires=False)))
    wait_for(lambda: queue_of(fake)[0], "the prompt to run")
    (running,) = queue_of(fake)[0]
    assert backend.interrupt("charforge-another-job-1") is False  # not this task: untouched
    assert fake.posted("/interrupt") == [] and queue_of(fake)[0] == [running]
    assert backend.interrupt(TASK) is True
    failed = finished(worker, outcome)

    assert isinstance(failed, BackendRejected) and failed.retriable
    assert "interrupted" in failed.message
    assert len(fake.posted("/prompt")) == 1  # the other two images were never queued
    assert fake.posted("/interrupt") == [{"prompt_id": running}]
    assert fake.posted("/queue") == []  # it ran: nothing to delete from the queue
    assert backend.interrupt(TASK) is False  # nothing of ours runs any more


def test_a_prompt_still_queued_is_deleted_and_nothing_else_interrupted(
    fake: FakeComfyUI, backend: ComfyUIBackend
) -> None:
    fake.faults.hang = True
    fake.faults.interrupt_ignores_prompt_id = True  # a ComfyUI from before 2025
    graph = build_graph(params(hires=False), "diving.safetensors", 5)
    queued = httpx.post(f"{fake.url}/prompt", json={"prompt": graph, "client_id": "someone"})
    other = queued.json()["prompt_id"]  # another client's prompt runs
    wait_for(lambda: queue_of(fake)[0] == [other], "the other client's prompt to run")
    worker, outcome = in_background(lambda: backend.generate(request(hires=False)))
    wait_for(lambda: len(queue_of(fake)[1]) == 1, "charforge's prompt to wait in the queue")
    (ours,) = queue_of(fake)[1]

    assert backend.interrupt(TASK) is True
    failed = finished(worker, outcome)

    assert isinstance(failed, BackendRejected) and "interrupted" in failed.message
    assert fake.posted("/queue") == [{"delete": [ours]}]
    assert fake.posted("/interrupt") == []  # it would have stopped the other client's prompt
    assert queue_of(fake) == ([other], [])
    assert other not in fake.history


@pytest.mark.parametrize("refused", ["interrupt", "queue"])
def test_interrupt_says_false_when_comfyui_refuses_to_stop(
    fake: FakeComfyUI, backend: ComfyUIBackend, refused: str
) -> None:
    fake.faults.hang = True
    worker, outcome = in_background(lambda: backend.generate(request(hires=False)))
    wait_for(lambda: queue_of(fake)[0], "the prompt to run")
    if refused == "interrupt":
        fake.faults.interrupt_status = 500
    else:
        fake.faults.queue_status = 503

    assert backend.interrupt(TASK) is False
    failed = finished(worker, outcome)  # charforge gives up on it all the same

    assert isinstance(failed, BackendRejected) and "interrupted" in failed.message
    fake.faults.interrupt_status = fake.faults.queue_status = None
    assert queue_of(fake)[0]  # ComfyUI's refusal left it running


@pytest.mark.parametrize("failure", ["500", "json"])
def test_a_few_failed_history_reads_in_a_row_are_ridden_out(
    fake: FakeComfyUI, backend: ComfyUIBackend, failure: str
) -> None:
    fake.faults.history_failures = 4
    fake.faults.history_failure = failure

    result = backend.generate(request(hires=False))

    assert len(result.images) == 1 and size_of(result.images[0].data) == (512, 768)
    assert fake.faults.history_failures == 0 and history_reads(fake) >= 5  # 4 failed in a row
    assert fake.posted("/interrupt") == [] and fake.posted("/queue") == []


@pytest.mark.parametrize(
    ("failure", "error"), [("500", BackendRejected), ("json", BackendBadResponse)]
)
def test_history_that_keeps_failing_gives_up_and_stops_the_prompt(
    fake: FakeComfyUI, backend: ComfyUIBackend, failure: str, error: type[Exception]
) -> None:
    fake.faults.hang = True
    fake.faults.refuse_websocket = True  # polling only
    fake.faults.history_failures = 10**6
    fake.faults.history_failure = failure

    with pytest.raises(error) as failed:
        backend.generate(request(hires=False))

    assert isinstance(failed.value, BackendRejected | BackendBadResponse)
    assert failed.value.retriable and fake.url not in failed.value.message
    assert history_reads(fake) == 5
    [interrupt] = fake.posted("/interrupt")  # else it would hang on, the next prompt behind it
    prompt_id = interrupt["prompt_id"]
    wait_for(lambda: prompt_id in fake.history, "the interrupted prompt's history")
    assert fake.history[prompt_id]["status"]["status_str"] == "error"


def test_an_error_in_charforge_while_it_waits_stops_the_prompt(
    fake: FakeComfyUI, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake.faults.hang = True
    adapter = ComfyUIBackend(spec_for(fake.url), quiet_seconds=0.1)

    def broken(self: PromptRunner, prompt_id: str, style: str) -> None:
        raise RuntimeError("a bug while reading the history")

    monkeypatch.setattr(PromptRunner, "_history", broken)
    try:
        with pytest.raises(RuntimeError, match="a bug"):
            adapter.generate(request(hires=False))
    finally:
        adapter.close()

    [interrupt] = fake.posted("/interrupt")
    wait_for(lambda: interrupt["prompt_id"] in fake.history, "the interrupted prompt's history")


def test_server_faults_map_to_retriable_errors(fake: FakeComfyUI, backend: ComfyUIBackend) -> None:
    fake.faults.prompt_status = 500
    with pytest.raises(BackendRejected) as server_error:
        backend.generate(request(hires=False))
    assert server_error.value.retriable and "HTTP 500" in server_error.value.message

    fake.faults.prompt_status = None
    fake.faults.missing_view = True
    with pytest.raises(BackendBadResponse) as no_file:
        backend.generate(request(hires=False))
    assert no_file.value.retriable and "charforge_00001_.png" in no_file.value.message

    fake.stop()
    with pytest.raises(BackendUnavailable) as refused:
        backend.generate(request(hires=False))
    assert refused.value.retriable and fake.url not in refused.value.message
    assert SOURCE in (refused.value.hint or "")
    assert backend.probe().ok is False


def test_basic_auth_goes_with_http_and_the_websocket() -> None:
    server = FakeComfyUI(auth=("comfy", "s3cret")).start()
    anonymous = ComfyUIBackend(spec_for(server.url))
    # A long quiet period: no look at the history while the websocket is silent (a slow
    # machine may pause longer than the default between events).
    signed = ComfyUIBackend(spec_for(server.url, auth=("comfy", "s3cret")), quiet_seconds=WAIT)
    seen: list[Progress] = []
    try:
        with pytest.raises(BackendAuthFailed) as refused:
            anonymous.find_checkpoint("diving.safetensors", style="anime")
        result = signed.generate(
            BackendRequest("anime", DIVING, params(hires=False), 1, on_progress=seen.append)
        )
    finally:
        anonymous.close()
        signed.close()
        server.stop()

    assert SOURCE in (refused.value.hint or "")
    assert len(result.images) == 1
    sockets = [r for r in server.requests if r.method == "WS"]
    assert sockets and all(r.headers["authorization"].startswith("Basic ") for r in sockets)
    # The websocket was used, not refused: its step events came, and the history was read
    # only once, at the end.
    assert {(p.step, p.steps) for p in seen if p.step is not None} == {(1, 3), (2, 3), (3, 3)}
    assert len([r for r in server.requests if r.path.startswith("/history/")]) == 1


# -- a user's own workflow ----------------------------------------------------------------------

WORKFLOW: dict[str, Any] = {
    "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "{{checkpoint}}"}},
    "2": {
        "class_type": "CLIPTextEncode",
        "inputs": {"text": "masterpiece, {{prompt}}", "clip": ["1", 1]},
    },
    "3": {
        "class_type": "CLIPTextEncode",
        "inputs": {"text": "{{negative_prompt}}", "clip": ["1", 1]},
    },
    "4": {
        "class_type": "EmptyLatentImage",
        "inputs": {"width": "{{width}}", "height": "{{height}}", "batch_size": 1},
    },
    "5": {
        "class_type": "KSampler",
        "inputs": {
            "model": ["1", 0],
            "seed": "{{seed}}",
            "steps": "{{ steps }}",
            "cfg": "{{cfg}}",
            "sampler_name": "{{sampler}}",
            "scheduler": "{{scheduler}}",
            "positive": ["2", 0],
            "negative": ["3", 0],
            "latent_image": ["4", 0],
            "denoise": 1.0,
        },
    },
    "6": {"class_type": "VAEDecode", "inputs": {"samples": ["5", 0], "vae": ["1", 2]}},
    "7": {
        "class_type": "SaveImage",
        "inputs": {"images": ["6", 0], "filename_prefix": "mine/char"},
    },
}


def test_workflow_placeholders_are_filled_with_the_right_types(
    fake: FakeComfyUI, tmp_path: Path
) -> None:
    adapter = workflow_backend(fake, tmp_path)
    try:
        result = adapter.generate(request(seed=99, width=576, height=704, hires=False))
    finally:
        adapter.close()

    sent = fake.prompts()[0]
    assert sent["1"]["inputs"]["ckpt_name"] == "diving.safetensors"
    assert sent["2"]["inputs"]["text"] == "masterpiece, Sakura in a garden, pink hair"
    assert sent["3"]["inputs"]["text"] == "blurry"
    assert sent["4"]["inputs"] == {"width": 576, "height": 704, "batch_size": 1}
    sampler = sent["5"]["inputs"]
    assert (sampler["seed"], sampler["steps"], sampler["cfg"]) == (99, 3, 8.0)
    assert isinstance(sampler["cfg"], float) and isinstance(sampler["seed"], int)
    assert (sampler["sampler_name"], sampler["scheduler"]) == ("dpmpp_2m", "karras")
    assert size_of(result.images[0].data) == (576, 704)
    assert "hires_upscaler_used" not in result.info
    assert result.checkpoint == "diving.safetensors"
    assert [r.query for r in fake.requests if r.path == "/view"] == [
        {"filename": "char_00001_.png", "subfolder": "mine", "type": "output"}
    ]


def workflow_backend(fake: FakeComfyUI, tmp_path: Path) -> ComfyUIBackend:
    """A backend of WORKFLOW, with the capabilities charforge's config gives it."""
    path = tmp_path / "workflow.json"
    path.write_text(json.dumps(WORKFLOW))
    caps = capabilities_for("comfyui", custom_workflow=True)
    return ComfyUIBackend(spec_for(fake.url, workflow=path, capabilities=caps))


@pytest.mark.parametrize(
    ("changes", "capability", "field"),
    [
        ({"hires": True}, "hires", "hires"),
        ({"hires": False, "prompt": "<lora:detail:0.7> Sakura"}, "lora", "prompt"),
    ],
)
def test_workflow_backend_refuses_what_its_workflow_cannot_do_before_queueing(
    fake: FakeComfyUI, tmp_path: Path, changes: dict[str, Any], capability: str, field: str
) -> None:
    adapter = workflow_backend(fake, tmp_path)
    try:
        with pytest.raises(UnsupportedCapability) as refused:
            adapter.generate(request(**changes))
    finally:
        adapter.close()

    error = refused.value
    assert "'comfy'" in error.message and f"({capability})" in error.message
    assert error.field == field and error.retriable is False
    assert error.extra == {"capability": capability, "backends": ["comfy"]}
    assert fake.posted("/prompt") == []  # never run without the pass or the LoRA


def test_workflow_without_placeholders_fails_at_construction(tmp_path: Path) -> None:
    lacking = json.loads(json.dumps(WORKFLOW))
    lacking["5"]["inputs"]["seed"] = 5
    lacking["5"]["inputs"]["cfg"] = 7.0
    path = tmp_path / "workflow.json"
    path.write_text(json.dumps(lacking))

    with pytest.raises(
        ValueError, match=r"lacks the placeholders \{\{seed\}\}, \{\{cfg\}\}"
    ) as bad:
        ComfyUIBackend(spec_for("http://127.0.0.1:9", workflow=path))
    assert str(bad.value).startswith(SOURCE)


# -- end to end through charforge's API ---------------------------------------------------------


def test_generate_endpoint_renders_an_anime_character_on_comfyui(
    live_factory: Any, sims: tuple[A1111Simulator, A1111Simulator], fake: FakeComfyUI
) -> None:
    realistic, anime = sims
    live = live_factory(
        realistic.url,
        anime.url,
        backends={"comfy": BackendConfig(kind="comfyui", url=fake.url)},
        routes={"anime": RouteConfig(backends=["comfy"])},
    )
    client = live.user("alice")
    character_id = create_character(client, "Sakura", "anime")

    response = client.post(
        "/api/image-generation/generate",
        json={"prompt": "in a garden", "characterId": character_id, "steps": 3},
    )

    assert response.status_code == 200, response.text
    result = response.json()
    assert result["backend"] == "comfy" and result["model"] == "diving.safetensors"
    image = result["images"][0]
    assert (image["width"], image["height"]) == (768, 1152)
    file = client.get(image["url"])
    assert file.status_code == 200 and file.headers["content-type"] == "image/png"
    assert size_of(file.content) == (768, 1152)

    graph = fake.prompts()[0]
    assert graph["4"]["inputs"]["ckpt_name"] == "diving.safetensors"
    assert graph["6"]["inputs"]["text"].startswith("in a garden")
    assert "pink hair" in graph["6"]["inputs"]["text"]
    assert graph["3"]["inputs"]["seed"] == image["seed"]
    assert anime.txt2img_bodies() == []  # the A1111 backend of the default route was not used
