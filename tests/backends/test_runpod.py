"""The RunPod serverless adapter over real HTTP against a fake RunPod endpoint."""

from __future__ import annotations

import io
import json
import logging
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from charforge.backends.base import BackendRequest, BackendResult, Progress
from charforge.backends.comfyui.graph import REQUIRED_PLACEHOLDERS, build_graph
from charforge.backends.runpod import Pacing, RunPodBackend
from charforge.backends.runpod import adapter as runpod_adapter
from charforge.config import BackendConfig, RouteConfig
from charforge.domain.capabilities import capabilities_for
from charforge.domain.params import SEED_MAX, GenerationParams
from charforge.domain.routes import BackendSpec
from charforge.errors import (
    BackendAuthFailed,
    BackendRejected,
    BackendTimeout,
    CheckpointMissing,
    InvalidInput,
    UnsupportedCapability,
)
from charforge.simulator import A1111Simulator
from tests.fakes.runpod import RunPodFake
from tests.jobs.conftest import create_character

KEY_VAR = "CF_TEST_RUNPOD_KEY"
KEY = "rp-test-key"
SOURCE = "[backends.rp] in charforge.toml"
FAST = Pacing(
    first_poll=0.01,
    growth=1.5,
    longest_poll=0.05,
    rate_limited=0.02,
    longest_rate_limited=0.1,
    call_timeout=5.0,
    poll_failures=3,
)


@pytest.fixture
def key(monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setenv(KEY_VAR, KEY)
    return KEY


@pytest.fixture
def fakes() -> Iterator[Callable[..., RunPodFake]]:
    started: list[RunPodFake] = []

    def start(**settings: Any) -> RunPodFake:
        started.append(RunPodFake(api_key=KEY, **settings).start())
        return started[-1]

    yield start
    for fake in started:
        fake.stop()


@pytest.fixture
def backends() -> Iterator[Callable[..., RunPodBackend]]:
    made: list[RunPodBackend] = []

    def make(
        fake: RunPodFake, *, timeout: float = 10.0, workflow: Path | None = None
    ) -> RunPodBackend:
        spec = BackendSpec(
            name="rp",
            kind="runpod",
            url=fake.url_for_endpoint,
            auth=None,
            timeout=timeout,
            connect_timeout=2.0,
            source=SOURCE,
            capabilities=capabilities_for(
                "runpod", worker=fake.worker, custom_workflow=workflow is not None
            ),
            worker=fake.worker,
            api_key_env=KEY_VAR,
            workflow=workflow,
        )
        made.append(RunPodBackend(spec, probe_timeout=2.0, pacing=FAST))
        return made[-1]

    yield make
    for backend in made:
        backend.close()


def params(**changes: Any) -> GenerationParams:
    values: dict[str, Any] = {
        "prompt": "Alex on a mountain peak",
        "negative_prompt": "blurry",
        "width": 64,
        "height": 96,
        "steps": 4,
        "cfg_scale": 8.0,
        "seed": 1234,
        "sampler": "DPM++ 2M",
        "scheduler": "Karras",
        "hires": False,
        "hires_scale": 1.5,
        "hires_upscaler": "Latent",
        "denoising_strength": 0.5,
    }
    return GenerationParams(**{**values, **changes})


TASK = "charforge-job-1"


def request(
    backend: RunPodBackend,
    p: GenerationParams | None = None,
    *,
    count: int = 1,
    checkpoint: str = "cyberrealistic.safetensors",
    on_progress: Callable[[Progress], None] | None = None,
) -> BackendRequest:
    info = backend.find_checkpoint(checkpoint, style="realistic")
    return BackendRequest("realistic", info, p or params(), count, on_progress, task_id=TASK)


def sizes(result: BackendResult) -> list[tuple[int, int]]:
    found = []
    for image in result.images:
        with Image.open(io.BytesIO(image.data)) as png:
            found.append(png.size)
    return found


def assert_polled_to_completion(fake: RunPodFake, jobs: int = 1) -> None:
    """Every job: /run, then /status answered IN_QUEUE, IN_PROGRESS, COMPLETED; all with the key."""
    assert [r.path for r in fake.requests if r.path == "/run"] == ["/run"] * jobs
    assert fake.states() == ["IN_QUEUE", "IN_PROGRESS", "COMPLETED"] * jobs
    assert {r.headers["authorization"] for r in fake.requests} == {f"Bearer {KEY}"}


# -- the two workers ---------------------------------------------------------------------


def test_a1111_worker_gets_the_full_txt2img_payload(
    key: str,
    fakes: Callable[..., RunPodFake],
    backends: Callable[..., RunPodBackend],
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    fake = fakes(worker="a1111")
    backend = backends(fake)

    result = backend.generate(request(backend, params(hires=True), count=2))

    sent = fake.requests[0].body
    assert sent["policy"]["executionTimeout"] > 5000  # RunPod stops the worker at our limit too
    payload = sent["input"]
    assert payload["override_settings"] == {
        "sd_model_checkpoint": "cyberrealistic.safetensors",
        "CLIP_stop_at_last_layers": 1,  # always sent: nothing is restored afterwards
    }
    assert payload["override_settings_restore_afterwards"] is False
    assert (payload["n_iter"], payload["batch_size"]) == (2, 1)
    assert (payload["width"], payload["height"], payload["steps"]) == (64, 96, 4)
    assert (payload["cfg_scale"], payload["seed"]) == (8.0, 1234)
    assert (payload["sampler_name"], payload["scheduler"]) == ("DPM++ 2M", "Karras")
    assert payload["enable_hr"] is True and payload["hr_scale"] == 1.5
    assert (payload["hr_upscaler"], payload["denoising_strength"]) == ("Latent", 0.5)
    assert (payload["prompt"], payload["negative_prompt"]) == ("Alex on a mountain peak", "blurry")
    assert_polled_to_completion(fake)

    assert [image.seed for image in result.images] == [1234, 1235]
    assert sizes(result) == [(96, 144), (96, 144)]  # the hires pass, as A1111 renders it
    assert result.checkpoint == "cyberrealistic"  # info.sd_model_name
    assert result.checkpoint_hash and len(result.checkpoint_hash) == 10
    assert "HTTP Request" in caplog.text and KEY not in caplog.text  # the key is never logged


@pytest.mark.parametrize(
    ("sampler", "scheduler", "field", "asked", "ran"),
    [
        ("Foo", "Karras", "sampler", "'Foo'", "'DPM++ 2M'"),
        ("k_euler_a", "Karras", "sampler", "'k_euler_a'", "'DPM++ 2M'"),  # not an alias of it
        ("DPM++ 2M", "Foo", "scheduler", "'Foo'", "'Karras'"),
        ("DPM++ 2M SDE", "Foo", "scheduler", "'Foo'", "'Exponential'"),
    ],
)
def test_a1111_worker_running_another_sampler_or_scheduler_is_refused(
    key: str,
    fakes: Callable[..., RunPodFake],
    backends: Callable[..., RunPodBackend],
    sampler: str,
    scheduler: str,
    field: str,
    asked: str,
    ran: str,
) -> None:
    fake = fakes(worker="a1111")
    backend = backends(fake)

    # A1111 silently runs its default for a name it does not know; RunPod cannot list them.
    with pytest.raises(InvalidInput) as caught:
        backend.generate(request(backend, params(sampler=sampler, scheduler=scheduler)))

    error = caught.value
    assert error.field == field and not error.retriable
    assert asked in error.message and ran in error.message and "'rp'" in error.message
    assert "discarded" in error.message
    sent = fake.inputs()[0]
    assert (sent["sampler_name"], sent["scheduler"]) == (sampler, scheduler)
    assert fake.states()[-1] == "COMPLETED"  # it did run: what ran is in its info


@pytest.mark.parametrize(
    ("sampler", "scheduler"),
    [
        ("dpm++ 2m", "karras"),  # A1111 reports its own spelling
        ("Euler a", "sgm_uniform"),  # a schedule's name for its label ("SGM Uniform")
        ("DPM++ 2M Karras", "Automatic"),  # the combined name of A1111 before 1.9
        ("DPM++ 2M Exponential", "Karras"),  # ... whose schedule wins over the field
        ("k_dpmpp_2m", "Karras"),  # an alias, reported by the sampler's name
        ("Euler", "Automatic"),  # whatever the sampler's default schedule is
        ("DPM++ 2M", "Automatic"),
        ("DPM++ 2M", ""),  # none: A1111's Automatic
    ],
)
def test_a1111_worker_names_that_are_the_same_to_a1111_pass(
    key: str,
    fakes: Callable[..., RunPodFake],
    backends: Callable[..., RunPodBackend],
    sampler: str,
    scheduler: str,
) -> None:
    fake = fakes(worker="a1111", queue_polls=0, progress_polls=0)
    backend = backends(fake)

    result = backend.generate(request(backend, params(sampler=sampler, scheduler=scheduler)))

    assert len(result.images) == 1


def test_comfyui_worker_gets_one_graph_per_image(
    key: str, fakes: Callable[..., RunPodFake], backends: Callable[..., RunPodBackend]
) -> None:
    fake = fakes(worker="comfyui")
    backend = backends(fake)
    progress: list[Progress] = []
    p = params(seed=77)

    result = backend.generate(request(backend, p, count=2, on_progress=progress.append))

    graphs = [i["workflow"] for i in fake.inputs()]
    assert graphs == [build_graph(p, "cyberrealistic.safetensors", s) for s in (77, 78)]
    assert graphs[1]["4"]["inputs"]["ckpt_name"] == "cyberrealistic.safetensors"
    assert graphs[1]["3"]["inputs"]["seed"] == 78
    assert (graphs[0]["5"]["inputs"]["width"], graphs[0]["5"]["inputs"]["height"]) == (64, 96)
    assert_polled_to_completion(fake, jobs=2)

    assert [image.seed for image in result.images] == [77, 78]
    assert sizes(result) == [(64, 96), (64, 96)]
    # What charforge sent: ComfyUI refuses an unknown ckpt_name rather than substituting.
    assert (result.checkpoint, result.checkpoint_hash) == ("cyberrealistic.safetensors", None)
    # The worker's step progress (12 of 25) inside each image, then each image done.
    assert [(round(u.fraction, 2), u.step) for u in progress] == [
        (0.24, 12),
        (0.5, None),
        (0.74, 12),
        (1.0, None),
    ]


def test_a_failing_progress_callback_does_not_end_the_generation(
    key: str,
    fakes: Callable[..., RunPodFake],
    backends: Callable[..., RunPodBackend],
    caplog: pytest.LogCaptureFixture,
) -> None:
    fake = fakes(worker="comfyui")
    backend = backends(fake)
    calls: list[Progress] = []

    def broken(update: Progress) -> None:  # as when the runner's database write fails
        calls.append(update)
        raise RuntimeError("database is locked")

    result = backend.generate(request(backend, count=2, on_progress=broken))

    assert len(result.images) == 2 and len(calls) == 4  # every report was still tried
    assert_polled_to_completion(fake, jobs=2)
    assert fake.cancelled() == []
    assert "progress callback failed" in caplog.text and "database is locked" in caplog.text


class _Abort(BaseException):
    """Not an Exception: what a thread being stopped sees (like KeyboardInterrupt)."""


def test_anything_that_ends_the_wait_cancels_the_runpod_job(
    key: str, fakes: Callable[..., RunPodFake], backends: Callable[..., RunPodBackend]
) -> None:
    fake = fakes(worker="comfyui", progress_polls=10**6)  # it would run on and on
    backend = backends(fake)

    def stop(update: Progress) -> None:
        raise _Abort

    with pytest.raises(_Abort):
        backend.generate(request(backend, on_progress=stop))

    assert fake.cancelled() == fake.job_ids() and len(fake.job_ids()) == 1
    assert fake.requests[-1].state == "CANCELLED"  # the GPU is not kept busy
    assert backend.interrupt(TASK) is False  # and it is no longer counted as running


def test_comfyui_random_seed_is_picked_once_and_counted_up(
    key: str, fakes: Callable[..., RunPodFake], backends: Callable[..., RunPodBackend]
) -> None:
    fake = fakes(worker="comfyui", queue_polls=0, progress_polls=0)
    backend = backends(fake)

    result = backend.generate(request(backend, params(seed=-1), count=3))

    seeds = [image.seed for image in result.images]
    assert 0 <= seeds[0] <= SEED_MAX
    assert seeds == [(seeds[0] + i) % (SEED_MAX + 1) for i in range(3)]
    assert [i["workflow"]["3"]["inputs"]["seed"] for i in fake.inputs()] == seeds


def test_comfyui_seeds_wrap_within_the_seed_range(
    key: str, fakes: Callable[..., RunPodFake], backends: Callable[..., RunPodBackend]
) -> None:
    fake = fakes(worker="comfyui", queue_polls=0, progress_polls=0)
    backend = backends(fake)

    result = backend.generate(request(backend, params(seed=SEED_MAX), count=2))

    # As A1111's n_iter would number them: every seed can be asked for again.
    assert [image.seed for image in result.images] == [SEED_MAX, 0]
    assert [i["workflow"]["3"]["inputs"]["seed"] for i in fake.inputs()] == [SEED_MAX, 0]


def test_comfyui_worker_fills_a_users_workflow(
    key: str,
    fakes: Callable[..., RunPodFake],
    backends: Callable[..., RunPodBackend],
    tmp_path: Path,
) -> None:
    template = {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "{{checkpoint}}"}},
        "2": {"class_type": "CLIPTextEncode", "inputs": {"text": "{{prompt}}", "clip": ["1", 1]}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"text": "{{negative_prompt}}"}},
        "4": {
            "class_type": "EmptyLatentImage",
            "inputs": {"width": "{{width}}", "height": "{{height}}", "batch_size": 1},
        },
        "5": {
            "class_type": "KSampler",
            "inputs": {
                "seed": "{{seed}}",
                "steps": "{{steps}}",
                "cfg": "{{cfg}}",
                "sampler_name": "{{sampler}}",
                "scheduler": "{{scheduler}}",
            },
        },
        "6": {"class_type": "SaveImage", "inputs": {"images": ["5", 0]}},
    }
    workflow = tmp_path / "workflow.json"
    workflow.write_text(json.dumps(template))
    fake = fakes(worker="comfyui")
    backend = backends(fake, workflow=workflow)
    workflow.unlink()  # read once, when the backend was made

    result = backend.generate(request(backend, params(seed=5)))

    graph = fake.inputs()[0]["workflow"]
    assert graph["1"]["inputs"]["ckpt_name"] == "cyberrealistic.safetensors"
    assert graph["4"]["inputs"] == {"width": 64, "height": 96, "batch_size": 1}
    assert graph["5"]["inputs"] == {
        "seed": 5,
        "steps": 4,
        "cfg": 8.0,
        "sampler_name": "dpmpp_2m",  # A1111's "DPM++ 2M" / "Karras" in ComfyUI's words
        "scheduler": "karras",
    }
    assert sizes(result) == [(64, 96)] and result.checkpoint == "cyberrealistic.safetensors"


@pytest.mark.parametrize(
    ("content", "words"),
    [
        ("{not json", "not readable JSON"),
        (json.dumps({"1": {"class_type": "SaveImage", "inputs": {}}}), "lacks the placeholders"),
    ],
)
def test_a_broken_workflow_fails_when_the_backend_is_made(
    key: str,
    fakes: Callable[..., RunPodFake],
    backends: Callable[..., RunPodBackend],
    tmp_path: Path,
    content: str,
    words: str,
) -> None:
    workflow = tmp_path / "workflow.json"
    workflow.write_text(content)
    fake = fakes(worker="comfyui")

    # At startup and in `charforge backends check`, not on the first job.
    with pytest.raises(ValueError, match=words) as caught:
        backends(fake, workflow=workflow)

    assert str(caught.value).startswith(SOURCE) and fake.requests == []


@pytest.mark.parametrize(
    ("changes", "capability", "field"),
    [
        ({"hires": True}, "hires", "hires"),
        ({"prompt": "Alex <lora:freckles:0.7> on a mountain peak"}, "lora", "prompt"),
    ],
)
def test_a_users_workflow_refuses_hires_and_lora_before_submitting(
    key: str,
    fakes: Callable[..., RunPodFake],
    backends: Callable[..., RunPodBackend],
    tmp_path: Path,
    changes: dict[str, Any],
    capability: str,
    field: str,
) -> None:
    template = {
        "1": {"class_type": "SaveImage", "inputs": {}},
        "2": {
            "class_type": "Anything",
            "inputs": {name: "{{" + name + "}}" for name in REQUIRED_PLACEHOLDERS},
        },
    }
    workflow = tmp_path / "workflow.json"
    workflow.write_text(json.dumps(template))
    fake = fakes(worker="comfyui")
    backend = backends(fake, workflow=workflow)

    # The route keeps such requests away; should one arrive, it must not run without it.
    with pytest.raises(UnsupportedCapability) as caught:
        backend.generate(request(backend, params(**changes)))

    error = caught.value
    assert "'rp'" in error.message and f"({capability})" in error.message
    assert error.field == field and error.extra["capability"] == capability
    assert not error.retriable
    assert fake.requests == []  # nothing submitted, nothing billed


@pytest.mark.parametrize("output", ["s3_url", "legacy"])
def test_comfyui_s3_url_and_pre_5_outputs(
    key: str,
    fakes: Callable[..., RunPodFake],
    backends: Callable[..., RunPodBackend],
    output: str,
) -> None:
    fake = fakes(worker="comfyui", comfy_output=output)
    backend = backends(fake)

    result = backend.generate(request(backend, params(hires=True)))

    assert sizes(result) == [(96, 144)]
    downloads = [r for r in fake.requests if r.path.startswith("/_s3/")]
    if output == "s3_url":
        assert len(downloads) == 1 and downloads[0].status == 200
        assert "authorization" not in downloads[0].headers  # the key never goes to a bucket
    else:
        assert downloads == []


def test_find_checkpoint_needs_no_network(
    key: str, fakes: Callable[..., RunPodFake], backends: Callable[..., RunPodBackend]
) -> None:
    fake = fakes()
    info = backends(fake).find_checkpoint("cyberrealistic.safetensors [0123456789]", style="x")
    assert (info.name, info.title, info.hash) == (
        "cyberrealistic.safetensors",
        "cyberrealistic.safetensors",
        None,
    )
    assert fake.requests == []


# -- RunPod's answers and faults ---------------------------------------------------------


def test_429_is_backed_off_and_the_job_still_succeeds(
    key: str, fakes: Callable[..., RunPodFake], backends: Callable[..., RunPodBackend]
) -> None:
    fake = fakes()
    fake.faults.rate_limit = 4  # /run, then /status polls
    backend = backends(fake)

    result = backend.generate(request(backend))

    assert len(result.images) == 1
    assert [r.status for r in fake.requests][:4] == [429] * 4
    assert fake.states() == ["IN_QUEUE", "IN_PROGRESS", "COMPLETED"]


def test_retry_after_is_honoured(
    key: str, fakes: Callable[..., RunPodFake], backends: Callable[..., RunPodBackend]
) -> None:
    fake = fakes()
    fake.faults.rate_limit, fake.faults.retry_after = 1, "1"
    backend = backends(fake)

    started = time.monotonic()
    backend.generate(request(backend))

    run_answers = [r for r in fake.requests if r.path == "/run"]
    assert [r.status for r in run_answers] == [429, 200]
    assert time.monotonic() - started >= 1.0


def test_429_past_the_budget_is_a_timeout(
    key: str, fakes: Callable[..., RunPodFake], backends: Callable[..., RunPodBackend]
) -> None:
    fake = fakes()
    fake.faults.rate_limit, fake.faults.retry_after = 100, "30"
    backend = backends(fake, timeout=5.0)

    with pytest.raises(BackendTimeout, match="429") as caught:
        backend.generate(request(backend))
    assert caught.value.retriable
    assert len(fake.requests) == 1  # it did not wait 30 s of a 5 s budget


def test_5xx_on_run_is_a_retriable_error(
    key: str, fakes: Callable[..., RunPodFake], backends: Callable[..., RunPodBackend]
) -> None:
    fake = fakes()
    fake.faults.server_error = 1
    backend = backends(fake)

    with pytest.raises(BackendRejected, match="HTTP 500") as caught:
        backend.generate(request(backend))
    assert caught.value.retriable and "'rp'" in caught.value.message
    assert fake.url not in caught.value.message


def test_5xx_while_polling_is_ridden_out(
    key: str, fakes: Callable[..., RunPodFake], backends: Callable[..., RunPodBackend]
) -> None:
    fake = fakes()
    fake.faults.server_error, fake.faults.only = 2, "/status/"
    backend = backends(fake)

    result = backend.generate(request(backend))

    assert len(result.images) == 1 and fake.cancelled() == []
    assert [r.status for r in fake.requests if r.path.startswith("/status/")][:2] == [500, 500]


def test_failed_job_carries_the_workers_error(
    key: str, fakes: Callable[..., RunPodFake], backends: Callable[..., RunPodBackend]
) -> None:
    fake = fakes()
    fake.faults.ending, fake.faults.error = "FAILED", "prompt has an unsupported token"
    backend = backends(fake)

    with pytest.raises(BackendRejected) as caught:
        backend.generate(request(backend))

    message = caught.value.message
    assert "RuntimeError: prompt has an unsupported token" in message and "'rp'" in message
    assert not caught.value.retriable  # the same input fails the same way
    assert fake.cancelled() == []

    fake.faults.error = "CUDA out of memory. Tried to allocate 2.00 GiB"
    with pytest.raises(BackendRejected) as again:
        backend.generate(request(backend))
    assert again.value.retriable  # another worker (or a second try) may have the memory


def test_a1111_error_inside_the_worker_fails_the_job_with_its_message(
    key: str, fakes: Callable[..., RunPodFake], backends: Callable[..., RunPodBackend]
) -> None:
    fake = fakes(worker="a1111")
    fake.a1111.faults.fail_status = 500
    fake.a1111.faults.fail_message = "Sampler 'Foo' not found"
    backend = backends(fake)

    with pytest.raises(BackendRejected) as caught:
        backend.generate(request(backend))

    assert "RuntimeError" in caught.value.message
    assert "Sampler 'Foo' not found" in caught.value.message


def test_cancelled_elsewhere_says_so(
    key: str, fakes: Callable[..., RunPodFake], backends: Callable[..., RunPodBackend]
) -> None:
    fake = fakes()
    fake.faults.ending = "CANCELLED"
    backend = backends(fake)

    with pytest.raises(BackendRejected, match="cancelled") as caught:
        backend.generate(request(backend))
    assert not caught.value.retriable


def test_timed_out_at_runpod_is_a_timeout(
    key: str, fakes: Callable[..., RunPodFake], backends: Callable[..., RunPodBackend]
) -> None:
    fake = fakes()
    fake.faults.ending = "TIMED_OUT"
    backend = backends(fake)

    with pytest.raises(BackendTimeout, match="RunPod timed out") as caught:
        backend.generate(request(backend))
    assert SOURCE in (caught.value.hint or "")


@pytest.mark.parametrize(
    ("stuck_in", "words"), [("IN_PROGRESS", "still running"), ("IN_QUEUE", "queue")]
)
def test_a_job_past_the_timeout_is_cancelled(
    key: str,
    fakes: Callable[..., RunPodFake],
    backends: Callable[..., RunPodBackend],
    stuck_in: str,
    words: str,
) -> None:
    # IN_PROGRESS from the first poll on, and a budget that a loaded CI machine still fits
    # /run and a poll into: the test is about what happens at the deadline.
    fake = fakes(queue_polls=10**6 if stuck_in == "IN_QUEUE" else 0)
    fake.faults.ending = "stuck"
    backend = backends(fake, timeout=2.0)

    started = time.monotonic()
    with pytest.raises(BackendTimeout, match=words) as caught:
        backend.generate(request(backend))

    elapsed = time.monotonic() - started
    assert 2.0 <= elapsed < 2.0 + 3  # it waited its budget, and not a poll or call longer
    assert fake.cancelled() == fake.job_ids() and len(fake.job_ids()) == 1
    assert fake.requests[-1].state == "CANCELLED"
    assert "2s" in caught.value.message and SOURCE in (caught.value.hint or "")


def test_interrupt_cancels_the_running_job(
    key: str, fakes: Callable[..., RunPodFake], backends: Callable[..., RunPodBackend]
) -> None:
    fake = fakes()
    fake.faults.ending = "stuck"
    backend = backends(fake)
    errors: list[Exception] = []

    def run() -> None:
        try:
            backend.generate(request(backend))
        except Exception as exc:
            errors.append(exc)

    worker = threading.Thread(target=run)
    worker.start()
    deadline = time.monotonic() + 10  # generous: a loaded CI machine is slow, not wrong
    while "IN_PROGRESS" not in fake.states():
        assert time.monotonic() < deadline
        time.sleep(0.01)

    assert backend.interrupt(TASK) is True
    worker.join(10)

    assert len(fake.cancelled()) == 1
    assert len(errors) == 1 and isinstance(errors[0], BackendRejected)
    assert "cancelled" in errors[0].message
    assert backend.interrupt(TASK) is False  # nothing runs any more


def test_unknown_checkpoint_on_comfyui_is_checkpoint_missing(
    key: str, fakes: Callable[..., RunPodFake], backends: Callable[..., RunPodBackend]
) -> None:
    fake = fakes(worker="comfyui")
    backend = backends(fake)

    with pytest.raises(CheckpointMissing) as caught:
        backend.generate(request(backend, checkpoint="mika.safetensors"))

    message = caught.value.message
    assert "'mika.safetensors'" in message and "'rp'" in message and "realistic" in message
    assert "cyberrealistic.safetensors, other.safetensors" in message  # what it has
    assert SOURCE in (caught.value.hint or "")


# -- the API key -------------------------------------------------------------------------


def test_missing_key_variable_is_named_and_nothing_is_sent(
    monkeypatch: pytest.MonkeyPatch,
    fakes: Callable[..., RunPodFake],
    backends: Callable[..., RunPodBackend],
) -> None:
    monkeypatch.delenv(KEY_VAR, raising=False)
    fake = fakes()
    backend = backends(fake)

    with pytest.raises(BackendAuthFailed) as caught:
        backend.generate(request(backend))

    assert KEY_VAR in caught.value.message and KEY_VAR in (caught.value.hint or "")
    assert fake.requests == []
    probe = backend.probe()
    assert not probe.ok and KEY_VAR in (probe.error or "")


def test_wrong_key_is_auth_failed_without_showing_it(
    monkeypatch: pytest.MonkeyPatch,
    fakes: Callable[..., RunPodFake],
    backends: Callable[..., RunPodBackend],
) -> None:
    monkeypatch.setenv(KEY_VAR, "rp-wrong-key")
    fake = fakes()
    backend = backends(fake)

    with pytest.raises(BackendAuthFailed, match="HTTP 401") as caught:
        backend.generate(request(backend))

    assert KEY_VAR in caught.value.message and "rp-wrong-key" not in caught.value.message
    assert fake.requests[0].headers["authorization"] == "Bearer rp-wrong-key"
    assert fake.requests[0].status == 401


def test_probe_asks_health_with_the_key(
    key: str, fakes: Callable[..., RunPodFake], backends: Callable[..., RunPodBackend]
) -> None:
    fake = fakes()
    backend = backends(fake)

    probe = backend.probe()

    assert probe.ok and probe.latency_ms is not None and probe.checkpoints == []
    assert probe.loaded is None and backend.loaded_checkpoint() is None
    assert [(r.method, r.path) for r in fake.requests] == [("GET", "/health")]
    assert fake.requests[0].headers["authorization"] == f"Bearer {KEY}"


# -- end to end through charforge's API --------------------------------------------------


def rp_live(
    live_factory: Any,
    sims: tuple[A1111Simulator, A1111Simulator],
    fake: RunPodFake,
    monkeypatch: pytest.MonkeyPatch,
) -> Any:
    monkeypatch.setattr(runpod_adapter, "DEFAULT_PACING", FAST)
    return live_factory(
        sims[0].url,
        sims[1].url,
        backends={
            "rp": BackendConfig(
                kind="runpod", url=fake.url_for_endpoint, worker=fake.worker, api_key_env=KEY_VAR
            )
        },
        routes={"realistic": RouteConfig(backends=["rp"])},
    )


def generate_realistic(live: Any) -> tuple[Any, str, Any]:
    client = live.user("alice")
    character_id = create_character(client, "Alex", style="realistic")
    response = client.post(
        "/api/image-generation/generate",
        json={
            "prompt": "on a mountain peak",
            "characterId": character_id,
            "width": 64,
            "height": 64,
            "steps": 2,
            "hires": False,
        },
    )
    return client, character_id, response


def test_a_realistic_character_is_generated_on_runpod_end_to_end(
    key: str,
    live_factory: Any,
    sims: tuple[A1111Simulator, A1111Simulator],
    fakes: Callable[..., RunPodFake],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    fake = fakes(worker="comfyui")
    live = rp_live(live_factory, sims, fake, monkeypatch)

    client, _, response = generate_realistic(live)

    assert response.status_code == 200, response.text
    result = response.json()
    assert result["backend"] == "rp" and result["model"] == "cyberrealistic.safetensors"
    assert len(result["images"]) == 1
    image = result["images"][0]
    assert (image["width"], image["height"]) == (64, 64)
    graph = fake.inputs()[0]["workflow"]
    assert graph["4"]["inputs"]["ckpt_name"] == "cyberrealistic.safetensors"
    assert graph["3"]["inputs"]["seed"] == image["seed"]
    assert client.get(image["url"]).headers["content-type"] == "image/png"
    assert sims[0].txt2img_bodies() == []  # the realistic route went to RunPod only


def test_a1111_worker_running_another_checkpoint_fails_the_job(
    key: str,
    live_factory: Any,
    sims: tuple[A1111Simulator, A1111Simulator],
    fakes: Callable[..., RunPodFake],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    fake = fakes(worker="a1111", models=("other.safetensors",))  # no cyberrealistic there
    live = rp_live(live_factory, sims, fake, monkeypatch)

    client, character_id, response = generate_realistic(live)

    assert response.status_code == 502, response.text
    error = response.json()["error"]
    assert error["code"] == "wrong_checkpoint"
    assert "'other'" in error["message"] and "cyberrealistic.safetensors" in error["message"]
    sent = fake.inputs()[0]["override_settings"]["sd_model_checkpoint"]
    assert sent == "cyberrealistic.safetensors"
    history = client.get(f"/api/characters/{character_id}/images").json()
    assert history["items"] == []  # no off-model image was stored
