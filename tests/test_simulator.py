"""The A1111/Forge simulator, driven over real HTTP on 127.0.0.1."""

from __future__ import annotations

import base64
import dataclasses
import functools
import hashlib
import io
import json
import re
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import pytest
from PIL import Image, ImageOps, UnidentifiedImageError

from charforge.simulator import A1111Simulator, Faults, SimulatorSettings, create_simulator_app
from charforge.simulator.config import Flavor
from charforge.simulator.render import Placeholder, png_bytes, render_placeholder

MODELS = ["diving.safetensors", "anime/cute_v2.safetensors", "real.ckpt"]
LORAS = ["detail_tweaker.safetensors", "styles/outline.safetensors", "readme.txt"]
LORA_METADATA = {"styles/outline.safetensors": {"ss_output_name": "inkline"}}
HEX10 = re.compile(r"^[0-9a-f]{10}$")
TXT2IMG = "/sdapi/v1/txt2img"
INTERNAL_PROGRESS = "/internal/progress"


# --------------------------------------------------------------------------- helpers


def _start(
    flavor: Flavor = "a1111", api_auth: tuple[str, str] | None = None, **extra: Any
) -> A1111Simulator:
    settings = SimulatorSettings(
        models=list(MODELS),
        flavor=flavor,
        api_auth=api_auth,
        loras=list(LORAS),
        lora_metadata=dict(LORA_METADATA),
        **extra,
    )
    sim = A1111Simulator(settings)
    sim.start()
    return sim


@pytest.fixture(scope="module")
def a1111_server() -> Iterator[A1111Simulator]:
    simulator = _start("a1111")
    yield simulator
    simulator.stop()


@pytest.fixture(scope="module")
def forge_server() -> Iterator[A1111Simulator]:
    simulator = _start("forge")
    yield simulator
    simulator.stop()


@pytest.fixture
def sim(a1111_server: A1111Simulator) -> A1111Simulator:
    a1111_server.reset()
    return a1111_server


@pytest.fixture
def forge(forge_server: A1111Simulator) -> A1111Simulator:
    forge_server.reset()
    return forge_server


@pytest.fixture
def client(sim: A1111Simulator) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=sim.url, timeout=10) as c:
        yield c


@pytest.fixture
def forge_client(forge: A1111Simulator) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=forge.url, timeout=10) as c:
        yield c


def _info(response: httpx.Response) -> dict[str, Any]:
    assert response.status_code == 200, response.text
    info: dict[str, Any] = json.loads(response.json()["info"])
    return info


def _png(b64: str) -> Image.Image:
    image = Image.open(io.BytesIO(base64.b64decode(b64)))
    image.load()
    return image


_PARAM = re.compile(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')


def _parse_infotext(text: str) -> tuple[str, str, dict[str, str]]:
    """(prompt, negative prompt, key/values) the way A1111's paste parser reads them."""
    *head, last = text.strip().split("\n")
    prompt_lines, negative = [], ""
    for line in head:
        if line.startswith("Negative prompt:"):
            negative = line[len("Negative prompt:") :].strip()
        else:
            prompt_lines.append(line)
    values = {}
    for key, value in _PARAM.findall(last):
        values[key] = json.loads(value) if value.startswith('"') else value
    return "\n".join(prompt_lines), negative, values


# --------------------------------------------------------------------------- read-only routes


def test_sd_models_a1111_reports_hashed_titles(client: httpx.Client) -> None:
    models = client.get("/sdapi/v1/sd-models").json()
    assert [m["model_name"] for m in models] == ["diving", "anime_cute_v2", "real"]
    for model, name in zip(models, MODELS, strict=True):
        assert set(model) == {"title", "model_name", "hash", "sha256", "filename", "config"}
        assert HEX10.match(model["hash"])
        assert re.fullmatch(r"[0-9a-f]{64}", model["sha256"])
        assert model["sha256"].startswith(model["hash"])
        assert model["title"] == f"{name} [{model['hash']}]"
        assert model["filename"] == f"/models/Stable-diffusion/{name}"
        assert model["config"] is None


def test_sd_models_forge_hashes_only_once_loaded(
    forge: A1111Simulator, forge_client: httpx.Client
) -> None:
    def by_name() -> dict[str, dict[str, Any]]:
        return {
            m["filename"].rsplit("/", 1)[-1]: m
            for m in forge_client.get("/sdapi/v1/sd-models").json()
        }

    models = by_name()
    assert HEX10.match(models["diving.safetensors"]["hash"])  # loaded at start
    cute = models["cute_v2.safetensors"]
    assert cute["hash"] is None
    assert cute["sha256"] is None
    assert cute["title"] == "anime/cute_v2.safetensors"

    body = {"steps": 4, "override_settings": {"sd_model_checkpoint": "anime/cute_v2.safetensors"}}
    info = _info(forge_client.post(TXT2IMG, json=body))
    cute = by_name()["cute_v2.safetensors"]
    assert HEX10.match(cute["hash"])
    assert cute["title"] == f"anime/cute_v2.safetensors [{cute['hash']}]"
    assert info["sd_model_hash"] == cute["hash"]
    assert info["sd_model_name"] == "cute_v2"
    assert by_name()["real.ckpt"]["hash"] is None

    assert (
        forge_client.post("/sdapi/v1/options", json={"sd_model_checkpoint": "real"}).json() is None
    )
    assert HEX10.match(by_name()["real.ckpt"]["hash"])
    assert forge.loaded_checkpoint == "real.ckpt"


def test_options_get_and_post(sim: A1111Simulator, client: httpx.Client) -> None:
    options = client.get("/sdapi/v1/options").json()
    diving = client.get("/sdapi/v1/sd-models").json()[0]
    assert options["sd_model_checkpoint"] == diving["title"]
    assert options["sd_checkpoint_hash"] == diving["sha256"]
    assert options["samples_format"] == "png"
    assert options["CLIP_stop_at_last_layers"] == 1

    answer = client.post(
        "/sdapi/v1/options",
        json={"sd_model_checkpoint": "real.ckpt", "CLIP_stop_at_last_layers": 2},
    )
    assert answer.status_code == 200
    assert answer.json() is None
    assert sim.loaded_checkpoint == "real.ckpt" == sim.weights_checkpoint
    options = client.get("/sdapi/v1/options").json()
    assert options["sd_model_checkpoint"].startswith("real.ckpt [")
    assert options["CLIP_stop_at_last_layers"] == 2

    missing = client.post("/sdapi/v1/options", json={"sd_model_checkpoint": "nope"})
    assert missing.status_code == 500
    assert missing.json() == {
        "error": "RuntimeError",
        "detail": "",
        "body": "",
        "errors": "model 'nope' not found",
    }
    assert sim.loaded_checkpoint == "real.ckpt"


def test_samplers_and_schedulers(client: httpx.Client) -> None:
    samplers = client.get("/sdapi/v1/samplers").json()
    names = [s["name"] for s in samplers]
    for name in ("Euler a", "Euler", "DPM++ 2M", "DPM++ SDE", "DPM++ 2M SDE", "DDIM"):
        assert name in names
    dpm = samplers[names.index("DPM++ 2M")]
    assert dpm == {
        "name": "DPM++ 2M",
        "aliases": ["k_dpmpp_2m"],
        "options": {"scheduler": "karras"},
    }

    schedulers = client.get("/sdapi/v1/schedulers").json()
    assert schedulers[0] == {
        "name": "automatic",
        "label": "Automatic",
        "aliases": None,
        "default_rho": -1,
        "need_inner_model": False,
    }
    karras = next(s for s in schedulers if s["name"] == "karras")
    assert karras["label"] == "Karras"
    assert karras["default_rho"] == 7.0


def test_unknown_route_is_fastapi_404(client: httpx.Client) -> None:
    answer = client.get("/sdapi/v1/nope")
    assert answer.status_code == 404
    assert answer.json() == {"detail": "Not Found"}


# --------------------------------------------------------------------------- txt2img


def test_txt2img_fills_in_a1111_defaults(client: httpx.Client) -> None:
    answer = client.post(TXT2IMG, json={})
    info = _info(answer)
    params = answer.json()["parameters"]
    expected = {
        "prompt": "",
        "negative_prompt": "",
        "seed": -1,
        "subseed": -1,
        "sampler_name": None,  # echoed as sent; the sampler that ran is in info
        "sampler_index": "Euler",
        "scheduler": None,
        "batch_size": 1,
        "n_iter": 1,
        "steps": 50,
        "cfg_scale": 7.0,
        "width": 512,
        "height": 512,
        "enable_hr": False,
        "hr_scale": 2.0,
        "hr_upscaler": None,
        "hr_second_pass_steps": 0,
        "hr_resize_x": 0,
        "hr_resize_y": 0,
        "denoising_strength": None,
        "override_settings": None,
        "override_settings_restore_afterwards": True,
        "send_images": True,
        "save_images": False,
    }
    assert {key: params[key] for key in expected} == expected
    assert "hr_additional_modules" not in params  # a Forge-only field
    assert info["sampler_name"] == "Euler"
    assert info["steps"] == 50
    assert info["cfg_scale"] == 7.0
    assert (info["width"], info["height"]) == (512, 512)
    assert 0 <= info["seed"] <= 2**32 - 1
    assert info["sd_model_name"] == "diving"
    assert info["version"] == "v1.10.1"
    assert info["extra_generation_params"] == {"Schedule type": "Automatic"}
    image = _png(answer.json()["images"][0])
    assert image.size == (512, 512)


def test_unknown_fields_are_ignored(client: httpx.Client) -> None:
    answer = client.post(TXT2IMG, json={"steps": 3, "no_such_field": {"x": 1}, "guidance": 9})
    assert answer.status_code == 200
    params = answer.json()["parameters"]
    assert "no_such_field" not in params
    assert "guidance" not in params
    assert params["steps"] == 3


def test_wrong_type_is_fastapi_422(client: httpx.Client) -> None:
    answer = client.post(TXT2IMG, json={"steps": "many", "width": 512})
    assert answer.status_code == 422
    (error,) = answer.json()["detail"]
    assert error["loc"] == ["body", "steps"]
    assert error["input"] == "many"
    assert {"type", "loc", "msg", "input"} <= set(error)
    assert (
        client.post(
            TXT2IMG, content=b"{not json", headers={"content-type": "application/json"}
        ).status_code
        == 422
    )


def test_samplers_resolve_like_a1111(client: httpx.Client) -> None:
    info = _info(client.post(TXT2IMG, json={"steps": 2, "sampler_name": "DPM++ 2M Karras"}))
    assert info["sampler_name"] == "DPM++ 2M"
    assert "Schedule type: Karras" in info["infotexts"][0]
    info = _info(
        client.post(TXT2IMG, json={"steps": 2, "sampler_name": "Euler a", "scheduler": "karras"})
    )
    assert "Sampler: Euler a, Schedule type: Karras" in info["infotexts"][0]
    info = _info(client.post(TXT2IMG, json={"steps": 2, "sampler_name": "Nonsense 9000"}))
    assert info["sampler_name"] == "DPM++ 2M"  # A1111 silently falls back to samplers[0]


@pytest.mark.parametrize(
    "wanted",
    [
        "anime/cute_v2.safetensors",
        "anime_cute_v2",
        "cute_v2",
        "title",
        "hash",
        "sha256",
    ],
)
def test_checkpoint_aliases(sim: A1111Simulator, client: httpx.Client, wanted: str) -> None:
    cute = client.get("/sdapi/v1/sd-models").json()[1]
    name = {"title": cute["title"], "hash": cute["hash"], "sha256": cute["sha256"]}.get(
        wanted, wanted
    )
    body = {"steps": 2, "override_settings": {"sd_model_checkpoint": name}}
    info = _info(client.post(TXT2IMG, json=body))
    assert info["sd_model_name"] == "cute_v2"  # name_for_extra: no folder
    assert info["sd_model_hash"] == cute["hash"]
    assert sim.weights_checkpoint == "anime/cute_v2.safetensors"


def test_override_restores_afterwards_by_default(sim: A1111Simulator, client: httpx.Client) -> None:
    body = {"steps": 2, "override_settings": {"sd_model_checkpoint": "real.ckpt"}}
    assert _info(client.post(TXT2IMG, json=body))["sd_model_name"] == "real"
    assert sim.loaded_checkpoint == "diving.safetensors"
    assert (
        client.get("/sdapi/v1/options")
        .json()["sd_model_checkpoint"]
        .startswith("diving.safetensors [")
    )
    # Like A1111 the weights stay until the next generation has to reload the current model.
    assert sim.weights_checkpoint == "real.ckpt"
    loads = sim.checkpoint_loads
    assert _info(client.post(TXT2IMG, json={"steps": 2}))["sd_model_name"] == "diving"
    assert sim.checkpoint_loads == loads + 1
    assert sim.weights_checkpoint == "diving.safetensors"


def test_override_without_restore_keeps_the_model(
    sim: A1111Simulator, client: httpx.Client
) -> None:
    body = {
        "steps": 2,
        "override_settings": {"sd_model_checkpoint": "real"},
        "override_settings_restore_afterwards": False,
    }
    assert _info(client.post(TXT2IMG, json=body))["sd_model_name"] == "real"
    assert sim.loaded_checkpoint == "real.ckpt"
    assert client.get("/sdapi/v1/options").json()["sd_model_checkpoint"].startswith("real.ckpt [")
    assert _info(client.post(TXT2IMG, json={"steps": 2}))["sd_model_name"] == "real"


def test_unknown_checkpoint_silently_keeps_current(
    sim: A1111Simulator, client: httpx.Client
) -> None:
    body = {"steps": 2, "override_settings": {"sd_model_checkpoint": "ghost.safetensors", "x": 1}}
    answer = client.post(TXT2IMG, json=body)
    info = _info(answer)
    assert info["sd_model_name"] == "diving"
    # A1111 pops the unknown checkpoint out of the dict it echoes back.
    assert answer.json()["parameters"]["override_settings"] == {"x": 1}
    assert sim.checkpoint_loads == 0
    # A title with a hash that does not belong to the file is no alias either.
    body = {"steps": 2, "override_settings": {"sd_model_checkpoint": "real.ckpt [0123456789]"}}
    assert _info(client.post(TXT2IMG, json=body))["sd_model_name"] == "diving"


def test_hires_output_size_differs_from_info_size(client: httpx.Client) -> None:
    body = {
        "prompt": "knight",
        "steps": 3,
        "width": 512,
        "height": 768,
        "enable_hr": True,
        "hr_scale": 1.5,
        "hr_upscaler": "Latent",
        "denoising_strength": 0.5,
    }
    answer = client.post(TXT2IMG, json=body)
    info = _info(answer)
    assert (info["width"], info["height"]) == (512, 768)
    assert _png(answer.json()["images"][0]).size == (768, 1152)
    assert info["denoising_strength"] == 0.5
    assert info["extra_generation_params"]["Hires upscale"] == 1.5
    _, _, values = _parse_infotext(info["infotexts"][0])
    assert values["Size"] == "512x768"
    assert values["Denoising strength"] == "0.5"
    assert values["Hires upscale"] == "1.5"
    assert values["Hires upscaler"] == "Latent"

    resized = client.post(
        TXT2IMG,
        json={"steps": 2, "width": 512, "height": 768, "enable_hr": True, "hr_resize_x": 1024},
    )
    assert _png(resized.json()["images"][0]).size == (1024, 1536)
    assert _info(resized)["denoising_strength"] == 0.7


def test_forge_hires_needs_hr_additional_modules(forge_client: httpx.Client) -> None:
    body: dict[str, Any] = {"steps": 2, "enable_hr": True, "hr_scale": 1.5}
    failed = forge_client.post(TXT2IMG, json=body)
    assert failed.status_code == 500
    assert failed.json() == {
        "error": "TypeError",
        "detail": "",
        "body": "",
        "message": "argument of type 'NoneType' is not iterable",
    }
    body["hr_additional_modules"] = ["Use same choices"]
    answer = forge_client.post(TXT2IMG, json=body)
    assert _png(answer.json()["images"][0]).size == (768, 768)
    assert answer.json()["parameters"]["hr_additional_modules"] == ["Use same choices"]
    assert _info(answer)["version"].startswith("f2.0.1v1.10.1")
    # Without hires the missing field does not matter.
    assert forge_client.post(TXT2IMG, json={"steps": 2}).status_code == 200


def test_seeds_batches_and_png_parameters(client: httpx.Client) -> None:
    body = {
        "prompt": "a diver, ocean: deep",
        "negative_prompt": "blurry",
        "seed": 100,
        "batch_size": 2,
        "n_iter": 2,
        "steps": 25,
        "cfg_scale": 8,
        "sampler_name": "DPM++ 2M",
        "scheduler": "Karras",
        "width": 512,
        "height": 768,
    }
    answer = client.post(TXT2IMG, json=body)
    info = _info(answer)
    assert info["all_seeds"] == [100, 101, 102, 103]
    assert info["seed"] == 100
    assert len(answer.json()["images"]) == 4 == len(info["infotexts"])
    assert info["infotexts"][0] == (
        "a diver, ocean: deep\nNegative prompt: blurry\n"
        "Steps: 25, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 8.0, Seed: 100, "
        f"Size: 512x768, Model hash: {info['sd_model_hash']}, Model: diving, Version: v1.10.1"
    )
    for index, b64 in enumerate(answer.json()["images"]):
        image = _png(b64)
        assert image.format == "PNG"
        assert image.size == (512, 768)
        text = image.info["parameters"]
        assert text == info["infotexts"][index]
        prompt, negative, values = _parse_infotext(text)
        assert (prompt, negative) == ("a diver, ocean: deep", "blurry")
        assert values["Seed"] == str(100 + index)
        assert values["Model"] == "diving"
        assert values["Steps"] == "25"

    random_seeds = {_info(client.post(TXT2IMG, json={"steps": 1}))["seed"] for _ in range(3)}
    assert all(0 <= seed <= 2**32 - 1 for seed in random_seeds)
    assert len(random_seeds) > 1


def test_infotext_quotes_values_with_separators(sim: A1111Simulator, client: httpx.Client) -> None:
    sim.settings.upscalers = ["R-ESRGAN 4x+, Anime6B"]  # an upscaler model added to the WebUI
    try:
        body = {"steps": 2, "enable_hr": True, "hr_upscaler": "R-ESRGAN 4x+, Anime6B"}
        text = _info(client.post(TXT2IMG, json=body))["infotexts"][0]
    finally:
        sim.settings.upscalers = []
    assert 'Hires upscaler: "R-ESRGAN 4x+, Anime6B"' in text
    assert _parse_infotext(text)[2]["Hires upscaler"] == "R-ESRGAN 4x+, Anime6B"


def test_clip_skip_override_is_restored(client: httpx.Client) -> None:
    body = {"steps": 2, "override_settings": {"CLIP_stop_at_last_layers": 2}}
    info = _info(client.post(TXT2IMG, json=body))
    assert info["clip_skip"] == 2
    assert "Clip skip: 2" in info["infotexts"][0]
    assert client.get("/sdapi/v1/options").json()["CLIP_stop_at_last_layers"] == 1


def test_send_images_false(client: httpx.Client) -> None:
    answer = client.post(TXT2IMG, json={"steps": 2, "send_images": False})
    assert answer.json()["images"] == []
    assert len(_info(answer)["infotexts"]) == 1


def test_refresh_checkpoints_rereads_the_model_list() -> None:
    with A1111Simulator(SimulatorSettings(models=["a.safetensors"])) as sim:
        sim.settings.models.append("new/fresh.safetensors")
        with httpx.Client(base_url=sim.url, timeout=10) as client:
            assert len(client.get("/sdapi/v1/sd-models").json()) == 1
            assert client.post("/sdapi/v1/refresh-checkpoints").json() is None
            models = client.get("/sdapi/v1/sd-models").json()
            assert [m["model_name"] for m in models] == ["a", "new_fresh"]


def test_reset_forgets_everything(forge: A1111Simulator, forge_client: httpx.Client) -> None:
    forge.faults.delay_seconds = 0.01
    body = {"steps": 1, "override_settings": {"sd_model_checkpoint": "real"}}
    body["override_settings_restore_afterwards"] = False
    assert forge_client.post(TXT2IMG, json=body).status_code == 200
    assert forge.loaded_checkpoint == "real.ckpt"
    assert forge.generations == 1
    forge.reset()
    assert forge.faults == Faults()
    assert (forge.loaded_checkpoint, forge.weights_checkpoint) == ("diving.safetensors",) * 2
    assert forge.generations == forge.checkpoint_loads == forge.max_concurrent_generations == 0
    assert forge.requests == []
    hashes = [m["hash"] for m in forge_client.get("/sdapi/v1/sd-models").json()]
    assert HEX10.match(hashes[0])
    assert hashes[1:] == [None, None]


# --------------------------------------------------------------------------- auth


def test_auth_a1111() -> None:
    sim = _start("a1111", api_auth=("user", "pa:ss"))
    try:
        with httpx.Client(base_url=sim.url, timeout=10) as c:
            missing = c.get("/sdapi/v1/sd-models")
            assert missing.status_code == 401
            assert missing.json()["detail"] == "Not authenticated"
            wrong = c.get("/sdapi/v1/options", auth=("user", "nope"))
            assert wrong.status_code == 401
            # A1111's api_middleware renders HTTPExceptions in its own shape (and drops headers).
            assert wrong.json() == {
                "error": "HTTPException",
                "detail": "Incorrect username or password",
                "body": "",
                "errors": "401: Incorrect username or password",
            }
            assert c.post(TXT2IMG, json={}, auth=("user", "nope")).status_code == 401
            assert c.get("/sdapi/v1/progress").status_code == 401
            assert c.get("/sdapi/v1/sd-models", auth=("user", "pa:ss")).status_code == 200
            assert c.post(TXT2IMG, json={"steps": 1}, auth=("user", "pa:ss")).status_code == 200
            assert c.get("/_simulator/requests").status_code == 200  # control routes: no auth
        assert sim.generations == 1
    finally:
        sim.stop()


def test_auth_forge() -> None:
    sim = _start("forge", api_auth=("user", "secret"))
    try:
        with httpx.Client(base_url=sim.url, timeout=10) as c:
            wrong = c.get("/sdapi/v1/sd-models", auth=("user", "nope"))
            assert wrong.status_code == 401
            assert wrong.json() == {"detail": "Incorrect username or password"}
            assert wrong.headers["www-authenticate"] == "Basic"
            missing = c.get("/sdapi/v1/sd-models")
            assert missing.json() == {"detail": "Not authenticated"}
            assert missing.headers["www-authenticate"] == "Basic"
            assert c.get("/sdapi/v1/progress").status_code == 200  # Forge: no auth on progress
            assert c.get("/sdapi/v1/sd-models", auth=("user", "secret")).status_code == 200
    finally:
        sim.stop()


# --------------------------------------------------------------------------- queueing, progress


def test_one_generation_at_a_time(sim: A1111Simulator) -> None:
    sim.faults.delay_seconds = 0.3

    def generate(seed: int) -> httpx.Response:
        with httpx.Client(base_url=sim.url, timeout=10) as c:
            return c.post(TXT2IMG, json={"steps": 2, "seed": seed})

    started = time.monotonic()
    with ThreadPoolExecutor(max_workers=3) as pool:
        answers = list(pool.map(generate, [1, 2, 3]))
    took = time.monotonic() - started
    assert [_info(a)["seed"] for a in answers] == [1, 2, 3]
    assert sim.max_concurrent_generations == 1
    assert sim.max_in_flight == 3
    assert sim.generations == 3
    assert took >= 0.85


def test_progress_and_interrupt(sim: A1111Simulator, client: httpx.Client) -> None:
    idle = client.get("/sdapi/v1/progress").json()
    assert idle["progress"] == 0
    assert idle["state"]["job_count"] == 0
    assert set(idle) >= {"progress", "eta_relative", "state", "current_image", "textinfo"}

    sim.faults.delay_seconds = 5.0
    result: dict[str, httpx.Response] = {}

    def generate() -> None:
        with httpx.Client(base_url=sim.url, timeout=10) as c:
            result["answer"] = c.post(TXT2IMG, json={"steps": 20, "seed": 7})

    worker = threading.Thread(target=generate)
    started = time.monotonic()
    worker.start()
    deadline = time.monotonic() + 3
    running: dict[str, Any] = {}
    while time.monotonic() < deadline:
        running = client.get("/sdapi/v1/progress").json()
        if running["state"]["sampling_step"] > 0:
            break
        time.sleep(0.05)
    assert running["state"]["job"] == "scripts_txt2img"
    assert running["state"]["sampling_steps"] == 20
    assert 0 < running["progress"] < 1
    assert client.post("/sdapi/v1/interrupt").json() == {}
    worker.join(timeout=5)
    assert time.monotonic() - started < 4
    info = _info(result["answer"])  # A1111 answers with what it had
    assert info["seed"] == 7
    assert len(result["answer"].json()["images"]) == 1
    assert client.get("/sdapi/v1/progress").json()["state"]["interrupted"] is True


# --------------------------------------------------------------------------- faults


def test_fault_fail_status_a1111_and_forge(
    sim: A1111Simulator, client: httpx.Client, forge: A1111Simulator, forge_client: httpx.Client
) -> None:
    sim.faults.fail_status = 500
    sim.faults.fail_message = "CUDA out of memory"
    answer = client.post(TXT2IMG, json={"steps": 2})
    assert answer.status_code == 500
    assert answer.json() == {
        "error": "RuntimeError",
        "detail": "",
        "body": "",
        "errors": "CUDA out of memory",
    }
    forge.faults.fail_status = 503
    answer = forge_client.post(TXT2IMG, json={"steps": 2})
    assert answer.status_code == 503
    assert answer.json()["message"] == "simulated failure"
    assert "errors" not in answer.json()
    assert sim.generations == 0 == forge.generations


def test_fault_proxy_pages(sim: A1111Simulator, client: httpx.Client) -> None:
    sim.faults.fail_status = 524
    answer = client.post(TXT2IMG, json={"steps": 2})
    assert answer.status_code == 524
    assert answer.headers["content-type"].startswith("text/html")
    assert "A timeout occurred" in answer.text
    sim.faults.fail_status = 502
    answer = client.post(TXT2IMG, json={"steps": 2})
    assert answer.status_code == 502
    assert "Bad Gateway" in answer.text


def test_fault_delay(sim: A1111Simulator, client: httpx.Client) -> None:
    sim.faults.delay_seconds = 0.3
    started = time.monotonic()
    assert client.post(TXT2IMG, json={"steps": 2}).status_code == 200
    assert time.monotonic() - started >= 0.3
    with pytest.raises(httpx.ReadTimeout):
        client.post(TXT2IMG, json={"steps": 2}, timeout=0.1)


def test_fault_ignore_checkpoint_and_switch_delay(
    sim: A1111Simulator, client: httpx.Client
) -> None:
    sim.faults.ignore_checkpoint = True
    body = {"steps": 2, "override_settings": {"sd_model_checkpoint": "real.ckpt"}}
    answer = client.post(TXT2IMG, json=body)
    assert _info(answer)["sd_model_name"] == "diving"
    assert answer.json()["parameters"]["override_settings"] == {"sd_model_checkpoint": "real.ckpt"}

    sim.faults.ignore_checkpoint = False
    sim.faults.switch_delay_seconds = 0.3
    started = time.monotonic()
    assert _info(client.post(TXT2IMG, json=body))["sd_model_name"] == "real"
    assert time.monotonic() - started >= 0.3
    started = time.monotonic()
    body["override_settings_restore_afterwards"] = False
    assert _info(client.post(TXT2IMG, json=body))["sd_model_name"] == "real"
    assert time.monotonic() - started < 0.3  # already in memory: no switch


def test_fault_malformed_json(sim: A1111Simulator, client: httpx.Client) -> None:
    sim.faults.malformed_json = True
    answer = client.post(TXT2IMG, json={"steps": 2})
    assert answer.status_code == 200
    assert answer.headers["content-type"] == "application/json"
    with pytest.raises(json.JSONDecodeError):
        answer.json()


def test_fault_broken_image(sim: A1111Simulator, client: httpx.Client) -> None:
    sim.faults.broken_image = True
    answer = client.post(TXT2IMG, json={"steps": 2})
    assert answer.status_code == 200
    images = answer.json()["images"]
    with pytest.raises(UnidentifiedImageError):
        _png(images[0])


def test_fault_drop_connection(sim: A1111Simulator, client: httpx.Client) -> None:
    sim.faults.drop_connection = True
    with pytest.raises(httpx.RemoteProtocolError):
        client.post(TXT2IMG, json={"steps": 2})
    sim.faults.drop_connection = False
    assert client.post(TXT2IMG, json={"steps": 2}).status_code == 200
    assert sim.generations == 1
    assert [r.path for r in sim.requests] == [TXT2IMG, TXT2IMG]


# ------------------------------------------------------------------ control routes, records


def test_control_routes_over_http(sim: A1111Simulator, client: httpx.Client) -> None:
    faults = client.post(
        "/_simulator/faults", json={"fail_status": 500, "delay_seconds": 0.01}
    ).json()
    assert faults == {**Faults().as_dict(), "fail_status": 500, "delay_seconds": 0.01}
    assert sim.faults.fail_status == 500
    assert client.post(TXT2IMG, json={}).status_code == 500
    assert (
        client.post("/_simulator/faults", json={"fail_status": None}).json()["fail_status"] is None
    )
    assert client.post("/_simulator/faults", json={"fail_stauts": 1}).status_code == 422
    assert client.delete("/_simulator/faults").json() == Faults().as_dict()

    recorded = client.get("/_simulator/requests").json()
    assert [(r["method"], r["path"]) for r in recorded] == [("POST", TXT2IMG)]
    assert recorded[0]["body"] == {}
    state = client.get("/_simulator/state").json()
    assert state["loaded_checkpoint"] == "diving.safetensors"
    assert state["flavor"] == "a1111"
    client.delete("/_simulator/requests")
    assert client.get("/_simulator/requests").json() == []


def test_requests_are_recorded(sim: A1111Simulator, client: httpx.Client) -> None:
    client.get("/sdapi/v1/sd-models", headers={"X-Trace": "abc"})
    client.post(TXT2IMG, json={"prompt": "one", "steps": 1})
    client.get("/sdapi/v1/progress", params={"skip_current_image": "true"})
    client.post(TXT2IMG, json={"prompt": "two", "steps": 1})
    client.get("/_simulator/requests")
    recorded = sim.requests
    assert [(r.method, r.path) for r in recorded] == [
        ("GET", "/sdapi/v1/sd-models"),
        ("POST", TXT2IMG),
        ("GET", "/sdapi/v1/progress"),
        ("POST", TXT2IMG),
    ]
    assert recorded[0].headers["x-trace"] == "abc"
    assert recorded[0].body is None
    assert recorded[2].query == "skip_current_image=true"
    assert [b["prompt"] for b in sim.txt2img_bodies()] == ["one", "two"]
    recorded.clear()  # a copy
    assert len(sim.requests) == 4
    sim.clear_requests()
    assert sim.requests == []
    assert sim.txt2img_bodies() == []


# --------------------------------------------------------------------------- lifecycle, rendering


def test_lifecycle() -> None:
    settings = SimulatorSettings(models=["a.safetensors"], name="lifecycle")
    with A1111Simulator(settings) as sim:
        url = sim.url
        assert re.fullmatch(r"http://127\.0\.0\.1:\d+", url)
        assert sim.start() == url  # already running
        sim.faults.delay_seconds = 30  # stop() must not wait for a sleeping generation
        worker = threading.Thread(
            target=lambda: httpx.post(f"{url}{TXT2IMG}", json={}, timeout=10), daemon=True
        )
        worker.start()
        time.sleep(0.2)
        started = time.monotonic()
    assert time.monotonic() - started < 5
    sim.stop()  # idempotent
    with pytest.raises(RuntimeError):
        _ = sim.url
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{url}/sdapi/v1/sd-models", timeout=2)
    worker.join(timeout=5)
    with pytest.raises(ValueError, match="checkpoint"):
        A1111Simulator(SimulatorSettings(models=[]))


def test_create_simulator_app_serves_in_process() -> None:
    sim = A1111Simulator(SimulatorSettings(models=["a.safetensors"], flavor="forge"))
    transport = httpx.ASGITransport(app=create_simulator_app(sim))

    async def call() -> list[dict[str, Any]]:
        async with httpx.AsyncClient(transport=transport, base_url="http://sim") as c:
            models: list[dict[str, Any]] = (await c.get("/sdapi/v1/sd-models")).json()
            return models

    import asyncio

    assert asyncio.run(call())[0]["model_name"] == "a"
    assert sim.requests[0].path == "/sdapi/v1/sd-models"


def test_placeholder_is_fast_and_labelled() -> None:
    spec = Placeholder(768, 1152, 42, "anime/cute_v2.safetensors", "DPM++ 2M", 25, 7.0, "a " * 400)
    png_bytes(render_placeholder(spec), "warm-up")
    started = time.perf_counter()
    data = png_bytes(render_placeholder(spec), "Steps: 25")
    took = time.perf_counter() - started
    image = Image.open(io.BytesIO(data))
    assert image.size == (768, 1152)
    assert image.info["parameters"] == "Steps: 25"
    assert took < 0.25  # ~25 ms on a laptop; generous for slow CI machines
    other = Image.open(
        io.BytesIO(
            png_bytes(render_placeholder(Placeholder(64, 64, 43, "m", "Euler", 1, 1, "")), None)
        )
    )
    assert other.convert("RGB").getpixel((32, 60)) != image.convert("RGB").getpixel((32, 1100))


# --------------------------------------------------------------------------- tasks (progress.py)


def _wait_for(check: Any, timeout: float = 5.0, what: str = "condition") -> Any:
    """Poll ``check()`` until it returns something truthy; returns that."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.01)
    raise AssertionError(f"timed out waiting for {what}")


def _progress_of(client: httpx.Client, task: str | None, **extra: Any) -> dict[str, Any]:
    answer = client.post(INTERNAL_PROGRESS, json={"id_task": task, **extra})
    assert answer.status_code == 200, answer.text
    result: dict[str, Any] = answer.json()
    return result


def _pixels(b64: str) -> bytes:
    return _png(b64).convert("RGB").tobytes()


def test_internal_progress_one_active_one_queued_then_both_completed(
    sim: A1111Simulator, client: httpx.Client
) -> None:
    sim.faults.delay_seconds = 0.8
    with ThreadPoolExecutor(max_workers=2) as pool:
        first = pool.submit(
            client.post, TXT2IMG, json={"steps": 10, "seed": 1, "force_task_id": "task(one)"}
        )
        _wait_for(lambda: sim.current_task == "task(one)", what="task(one) to start")
        second = pool.submit(
            client.post, TXT2IMG, json={"steps": 10, "seed": 2, "force_task_id": "task(two)"}
        )
        _wait_for(lambda: sim.pending_tasks == ["task(two)"], what="task(two) to queue")

        queued = _progress_of(client, "task(two)")
        assert queued == {
            "active": False,
            "queued": True,
            "completed": False,
            "progress": None,
            "eta": None,
            "live_preview": None,
            "id_live_preview": -1,
            "textinfo": "In queue: 1/1",
        }
        active = _progress_of(client, "task(one)", id_live_preview=3)
        assert (active["active"], active["queued"], active["completed"]) == (True, False, False)
        assert 0 <= active["progress"] < 1
        assert active["id_live_preview"] == 3  # echoed: no live preview image here
        assert active["live_preview"] is None
        unknown = _progress_of(client, "task(nope)")
        assert (unknown["active"], unknown["queued"], unknown["textinfo"]) == (
            False,
            False,
            "Waiting...",
        )
        # A1111 1.10's /sdapi/v1/progress imported current_task's value (None) at start.
        assert client.get("/sdapi/v1/progress").json()["current_task"] is None
        state = client.get("/_simulator/state").json()
        assert (state["current_task"], state["pending_tasks"]) == ("task(one)", ["task(two)"])
        assert _info(first.result())["seed"] == 1
        assert _info(second.result())["seed"] == 2

    for task in ("task(one)", "task(two)"):
        done = _progress_of(client, task)
        assert (done["active"], done["queued"], done["completed"]) == (False, False, True)
        assert done["textinfo"] == "Waiting..."
    assert sim.finished_tasks == ["task(one)", "task(two)"]
    assert sim.current_task is None
    assert sim.pending_tasks == []

    assert client.post(TXT2IMG, json={"steps": 1}).status_code == 200
    assert re.fullmatch(r"task\(txt2img-[A-Z0-9]{7}\)", sim.finished_tasks[-1])


def test_sampling_steps_linger_until_the_next_sampler_starts(
    sim: A1111Simulator, client: httpx.Client
) -> None:
    assert client.post(TXT2IMG, json={"steps": 7}).status_code == 200
    idle = client.get("/sdapi/v1/progress").json()["state"]
    assert (idle["job"], idle["job_count"], idle["sampling_steps"]) == ("", 0, 7)

    sim.faults.switch_delay_seconds = 0.6  # the new job starts by loading another model
    body = {"steps": 3, "override_settings": {"sd_model_checkpoint": "real.ckpt"}}
    with ThreadPoolExecutor(max_workers=1) as pool:
        answer = pool.submit(client.post, TXT2IMG, json=body)

        def loading() -> dict[str, Any] | None:
            progress: dict[str, Any] = client.get("/sdapi/v1/progress").json()
            return progress if progress["state"]["job"] == "scripts_txt2img" else None

        started = _wait_for(loading, what="the job to begin")
        assert started["state"]["job_count"] == -1  # begin(): not counted yet
        assert started["state"]["sampling_step"] == 0
        assert started["state"]["sampling_steps"] == 7  # the previous job's
        assert started["progress"] == pytest.approx(0.01)
        assert _info(answer.result())["sd_model_name"] == "real"
    assert client.get("/sdapi/v1/progress").json()["state"]["sampling_steps"] == 3


def test_interrupt_stops_the_running_task_not_the_queued_one(
    sim: A1111Simulator, client: httpx.Client
) -> None:
    sim.faults.delay_seconds = 4.0
    body_a = {"steps": 20, "seed": 5, "n_iter": 2, "force_task_id": "task(A)"}
    body_b = {"steps": 4, "seed": 9, "force_task_id": "task(B)"}
    with ThreadPoolExecutor(max_workers=2) as pool:
        a = pool.submit(client.post, TXT2IMG, json=body_a)
        _wait_for(
            lambda: client.get("/sdapi/v1/progress").json()["state"]["sampling_step"] >= 2,
            what="task(A) to sample",
        )
        b = pool.submit(client.post, TXT2IMG, json=body_b)
        _wait_for(lambda: _progress_of(client, "task(B)")["queued"], what="task(B) to queue")
        sim.faults.delay_seconds = 0.1  # task(B) reads its faults when its turn comes
        assert client.post("/sdapi/v1/interrupt").json() == {}
        answer_a, answer_b = a.result(), b.result()

    assert answer_a.status_code == 200  # A1111 answers with what it had
    info_a = _info(answer_a)
    assert len(answer_a.json()["images"]) == 1  # the image it was on; none after it
    assert info_a["all_seeds"] == [5, 6]
    assert len(info_a["infotexts"]) == 1
    assert "Steps: 20," in info_a["infotexts"][0]
    (stopped,) = sim.interrupted_tasks
    assert stopped["task"] == "task(A)"
    assert 2 <= stopped["step"] < 20
    assert (stopped["steps"], stopped["job_no"], stopped["pass"]) == (20, 0, "first")
    runs = sim.task_runs
    assert runs["task(A)"]["outcome"] == "interrupted"
    assert runs["task(A)"]["steps_finished"] == [stopped["step"]]

    assert len(answer_b.json()["images"]) == 1
    assert runs["task(B)"]["outcome"] == "finished"
    assert runs["task(B)"]["steps_finished"] == [4]
    assert client.get("/sdapi/v1/progress").json()["state"]["interrupted"] is False
    assert sim.finished_tasks == ["task(A)", "task(B)"]
    state = client.get("/_simulator/state").json()
    assert state["interrupted_tasks"] == sim.interrupted_tasks

    # The half-made picture is not the finished one.
    sim.faults.delay_seconds = 0
    whole = client.post(TXT2IMG, json={**body_a, "force_task_id": None})
    assert _pixels(whole.json()["images"][0]) != _pixels(answer_a.json()["images"][0])


def test_interrupt_in_the_first_pass_skips_hires(sim: A1111Simulator, client: httpx.Client) -> None:
    body = {"steps": 10, "seed": 3, "width": 64, "height": 64, "enable_hr": True, "hr_scale": 2}
    full = client.post(TXT2IMG, json=body)
    assert _png(full.json()["images"][0]).size == (128, 128)

    def run_and_interrupt(job_no: int) -> httpx.Response:
        sim.faults.delay_seconds = 2.0
        with ThreadPoolExecutor(max_workers=1) as pool:
            answer = pool.submit(client.post, TXT2IMG, json=body)

            def reached() -> bool:
                state = client.get("/sdapi/v1/progress").json()["state"]
                return bool(state["job_no"] == job_no and state["sampling_step"] >= 1)

            _wait_for(reached, what=f"job {job_no}")
            client.post("/sdapi/v1/interrupt")
            return answer.result()

    first_pass = run_and_interrupt(0)
    assert _png(first_pass.json()["images"][0]).size == (64, 64)
    assert "Hires upscale: 2" in _info(first_pass)["infotexts"][0]
    assert sim.interrupted_tasks[-1]["pass"] == "first"

    hires_pass = run_and_interrupt(1)
    assert _png(hires_pass.json()["images"][0]).size == (128, 128)
    assert sim.interrupted_tasks[-1]["pass"] == "hires"
    assert sim.interrupted_tasks[-1]["steps"] == 10  # hr_second_pass_steps 0: same as steps


def test_skip_cuts_one_batch_short_and_the_next_ones_run(
    sim: A1111Simulator, client: httpx.Client
) -> None:
    body = {"steps": 10, "seed": 40, "n_iter": 3, "width": 64, "height": 64}
    reference = client.post(TXT2IMG, json=body).json()["images"]
    sim.faults.delay_seconds = 1.5
    with ThreadPoolExecutor(max_workers=1) as pool:
        answer = pool.submit(client.post, TXT2IMG, json={**body, "force_task_id": "task(skip)"})

        def sampling() -> bool:
            state = client.get("/sdapi/v1/progress").json()["state"]
            return bool(state["job_no"] == 0 and state["sampling_step"] >= 2)

        _wait_for(sampling, what="the first batch to sample")
        skipped = client.post("/sdapi/v1/skip")
        assert (skipped.status_code, skipped.json()) == (200, None)
        images = answer.result().json()["images"]

    assert len(images) == 3
    assert _pixels(images[0]) != _pixels(reference[0])  # stopped early
    assert [_pixels(b) for b in images[1:]] == [_pixels(b) for b in reference[1:]]
    (skip,) = sim.skipped_tasks
    assert (skip["task"], skip["steps"], skip["job_no"], skip["pass"]) == (
        "task(skip)",
        10,
        0,
        "first",
    )
    run = sim.task_runs["task(skip)"]
    assert run["steps_finished"] == [skip["step"], 10, 10]
    assert run["outcome"] == "finished"
    assert sim.interrupted_tasks == []
    assert client.get("/_simulator/state").json()["skipped_tasks"] == [skip]


def test_a_failed_task_stays_current_until_the_next_starts(
    sim: A1111Simulator, client: httpx.Client
) -> None:
    sim.faults.nan_prompts = ["cursed"]
    failed = client.post(TXT2IMG, json={"prompt": "cursed", "force_task_id": "task(bad)"})
    assert failed.status_code == 500
    assert sim.current_task == "task(bad)"  # finish_task never ran
    stuck = _progress_of(client, "task(bad)")
    assert (stuck["active"], stuck["queued"], stuck["completed"]) == (True, False, False)
    assert stuck["progress"] == 0  # end() set job_count to 0
    assert stuck["eta"] is None
    assert sim.task_runs["task(bad)"]["outcome"] == "error"

    assert client.post(TXT2IMG, json={"steps": 1, "force_task_id": "task(ok)"}).status_code == 200
    assert sim.current_task is None
    gone = _progress_of(client, "task(bad)")
    assert (gone["active"], gone["completed"], gone["textinfo"]) == (False, False, "Waiting...")
    assert sim.finished_tasks == ["task(ok)"]


def test_internal_progress_without_a_task_id(client: httpx.Client) -> None:
    # progress.progressapi compares None with current_task (None): "active", and with no job
    # ever started its time arithmetic fails.
    fresh = client.post(INTERNAL_PROGRESS, json={})
    assert fresh.status_code == 500
    assert fresh.json()["error"] == "TypeError"
    assert client.post(TXT2IMG, json={"steps": 1}).status_code == 200
    idle = _progress_of(client, None)
    assert (idle["active"], idle["progress"], idle["eta"]) == (True, 0, None)
    assert client.post(INTERNAL_PROGRESS).status_code == 422  # a body is required


# --------------------------------------------------------------------------- errors that fail again

NAN_ERRORS = (
    "A tensor with NaNs was produced in Unet. This could be either because there's not enough "
    "precision to represent the picture, or because your video card does not support half type. "
    'Try setting the "Upcast cross attention layer to float32" option in Settings > Stable '
    "Diffusion or using the --no-half commandline argument to fix this. Use --disable-nan-check "
    "commandline argument to disable this check."
)


def test_nan_prompt_fails_every_time(
    sim: A1111Simulator, client: httpx.Client, forge_client: httpx.Client
) -> None:
    faults = client.post("/_simulator/faults", json={"nan_prompts": ["purple"]}).json()
    assert faults["nan_prompts"] == ["purple"]
    body = {"prompt": "a purple cat", "steps": 6, "seed": 11}
    for _ in range(2):
        answer = client.post(TXT2IMG, json=body)
        assert answer.status_code == 500
        assert answer.json() == {
            "error": "NansException",
            "detail": "",
            "body": "",
            "errors": NAN_ERRORS,
        }
        # It failed after the sampler had started.
        assert client.get("/sdapi/v1/progress").json()["state"]["sampling_steps"] == 6
    assert client.post(TXT2IMG, json={**body, "prompt": "a cat"}).status_code == 200
    assert sim.generations == 1
    assert client.delete("/_simulator/faults").json()["nan_prompts"] == []
    assert client.post(TXT2IMG, json=body).status_code == 200

    forge_client.post("/_simulator/faults", json={"nan_prompts": ["purple"]})
    answer = forge_client.post(TXT2IMG, json=body)
    assert answer.status_code == 500
    assert answer.json()["message"] == NAN_ERRORS
    assert "errors" not in answer.json()


CORRUPT = {
    "error": "SafetensorError",
    "detail": "",
    "body": "",
    "errors": "Error while deserializing header: MetadataIncompleteBuffer",
}


def test_corrupt_checkpoint_fails_to_load_and_leaves_the_option_stale(
    sim: A1111Simulator, client: httpx.Client
) -> None:
    client.post("/_simulator/faults", json={"corrupt_checkpoints": ["real.ckpt"]})
    diving = client.get("/sdapi/v1/sd-models").json()[0]
    override = {"steps": 2, "override_settings": {"sd_model_checkpoint": "real.ckpt"}}
    for _ in range(2):  # fails again
        answer = client.post(TXT2IMG, json=override)
        assert (answer.status_code, answer.json()) == (500, CORRUPT)
    # override_settings_restore_afterwards (default) put the option back.
    assert client.get("/sdapi/v1/options").json()["sd_model_checkpoint"] == diving["title"]
    assert sim.weights_checkpoint == "diving.safetensors"
    assert (sim.generations, sim.checkpoint_loads) == (0, 0)
    assert [f["via"] for f in sim.failed_checkpoint_loads] == ["txt2img", "txt2img"]

    keep = {**override, "override_settings_restore_afterwards": False}
    assert client.post(TXT2IMG, json=keep).json() == CORRUPT
    options = client.get("/sdapi/v1/options").json()
    assert options["sd_model_checkpoint"] == "real.ckpt"  # set before the load that failed
    assert options["sd_checkpoint_hash"] == diving["sha256"]  # what is really in memory
    assert (sim.loaded_checkpoint, sim.weights_checkpoint) == ("real.ckpt", "diving.safetensors")
    # Every job now tries to load the option's checkpoint again.
    assert client.post(TXT2IMG, json={"steps": 2}).json() == CORRUPT
    assert client.get("/_simulator/state").json()["failed_checkpoint_loads"][-1] == {
        "checkpoint": "real.ckpt",
        "via": "txt2img",
        "error": "SafetensorError",
    }

    # POST /options: opts.set logs the failed load and puts the old value back (200, null).
    assert client.post("/sdapi/v1/options", json={"sd_model_checkpoint": "diving"}).json() is None
    assert client.get("/sdapi/v1/options").json()["sd_model_checkpoint"] == diving["title"]
    switch = client.post("/sdapi/v1/options", json={"sd_model_checkpoint": "real.ckpt"})
    assert (switch.status_code, switch.json()) == (200, None)
    assert client.get("/sdapi/v1/options").json()["sd_model_checkpoint"] == diving["title"]
    assert sim.failed_checkpoint_loads[-1]["via"] == "options"
    assert _info(client.post(TXT2IMG, json={"steps": 2}))["sd_model_name"] == "diving"
    assert sim.generations == 1

    sim.faults.corrupt_checkpoints = []  # a good file again: the next load works
    assert _info(client.post(TXT2IMG, json=override))["sd_model_name"] == "real"


def test_forge_corrupt_checkpoint_fails_at_the_next_job(
    forge: A1111Simulator, forge_client: httpx.Client
) -> None:
    forge.faults.corrupt_checkpoints = ["real.ckpt"]
    switch = forge_client.post("/sdapi/v1/options", json={"sd_model_checkpoint": "real.ckpt"})
    assert (switch.status_code, switch.json()) == (200, None)  # Forge loads lazily
    answer = forge_client.post(TXT2IMG, json={"steps": 2})
    assert answer.status_code == 500
    assert answer.json()["message"] == CORRUPT["errors"]
    assert forge.weights_checkpoint == "diving.safetensors"
    assert forge.generations == 0


# --------------------------------------------------------------------------- LoRAs


def test_loras_list_and_refresh_without_credentials() -> None:
    sim = _start("a1111", api_auth=("user", "secret"))
    try:
        with httpx.Client(base_url=sim.url, timeout=10) as c:
            listed = c.get("/sdapi/v1/loras")
            assert listed.status_code == 200
            assert listed.json() == [
                {
                    "name": "detail_tweaker",
                    "alias": "detail_tweaker",
                    "path": "/models/Lora/detail_tweaker.safetensors",
                    "metadata": {},
                },
                {
                    "name": "outline",
                    "alias": "inkline",
                    "path": "/models/Lora/styles/outline.safetensors",
                    "metadata": {"ss_output_name": "inkline"},
                },
            ]
            sim.settings.loras.append("more/sharp.pt")
            assert len(c.get("/sdapi/v1/loras").json()) == 2
            refreshed = c.post("/sdapi/v1/refresh-loras")
            assert (refreshed.status_code, refreshed.json()) == (200, None)
            assert [x["name"] for x in c.get("/sdapi/v1/loras").json()][-1] == "sharp"
            # The UI's internal routes are not behind --api-auth either; API routes are.
            assert _progress_of(c, "task(x)")["textinfo"] == "Waiting..."
            assert c.get("/internal/ping").json() == {}
            assert c.post("/sdapi/v1/skip").status_code == 401
            assert c.post("/sdapi/v1/skip", auth=("user", "secret")).status_code == 200
    finally:
        sim.stop()


def test_nowebui_has_no_internal_routes() -> None:
    sim = _start("a1111", nowebui=True)
    try:
        with httpx.Client(base_url=sim.url, timeout=10) as c:
            assert c.post(INTERNAL_PROGRESS, json={"id_task": "x"}).status_code == 404
            assert c.get("/internal/ping").status_code == 404
            assert c.get("/sdapi/v1/loras").status_code == 200
    finally:
        sim.stop()


def _lora_run(client: httpx.Client, prompt: str, **extra: Any) -> tuple[bytes, dict[str, Any]]:
    answer = client.post(
        TXT2IMG, json={"prompt": prompt, "seed": 21, "steps": 2, "width": 64, "height": 64, **extra}
    )
    return _pixels(answer.json()["images"][0]), _info(answer)


def test_lora_tags_change_the_picture_and_add_hashes(
    sim: A1111Simulator, client: httpx.Client
) -> None:
    plain, plain_info = _lora_run(client, "a knight")
    assert "Lora hashes" not in plain_info["extra_generation_params"]

    tagged, info = _lora_run(client, "a knight <lora:detail_tweaker:0.8>")
    assert tagged != plain
    assert _lora_run(client, "a knight <lora:detail_tweaker:0.8>")[0] == tagged  # deterministic
    assert _lora_run(client, "a knight <lora:detail_tweaker:0.5>")[0] not in (plain, tagged)
    hashes = info["extra_generation_params"]["Lora hashes"]
    assert re.fullmatch(r"detail_tweaker: [0-9a-f]{12}", hashes)
    prompt, _, values = _parse_infotext(info["infotexts"][0])
    assert prompt == "a knight <lora:detail_tweaker:0.8>"  # the tags stay in the infotext
    assert values["Lora hashes"] == hashes
    assert f'Lora hashes: "{hashes}"' in info["infotexts"][0]  # quoted: it has a ":"
    assert sim.task_runs[sim.finished_tasks[1]]["loras"] == [
        {"name": "detail_tweaker", "te": 0.8, "unet": 0.8}
    ]

    unknown, unknown_info = _lora_run(client, "a knight <lora:nosuch:0.8>")
    assert unknown == plain  # silently ignored ("Lora not found")
    assert "Lora hashes" not in unknown_info["extra_generation_params"]

    both = _lora_run(client, "a knight <lora:detail_tweaker> <lora:inkline:0.5>")[1]
    two = both["extra_generation_params"]["Lora hashes"]
    assert re.fullmatch(r"detail_tweaker: [0-9a-f]{12}, inkline: [0-9a-f]{12}", two)
    assert two.split(", ")[0] == hashes  # same file, same hash

    zero, zero_info = _lora_run(client, "a knight <lora:detail_tweaker:0>")
    assert zero == plain  # loaded (and hashed) but with no effect
    assert zero_info["extra_generation_params"]["Lora hashes"] == hashes

    disabled, disabled_info = _lora_run(
        client, "a knight <lora:detail_tweaker:0.8>", disable_extra_networks=True
    )
    assert disabled == plain
    assert "Lora hashes" not in disabled_info["extra_generation_params"]


def test_a_lora_added_later_is_found_without_refresh() -> None:
    sim = _start("forge")
    try:
        sim.settings.loras.append("late.safetensors")
        with httpx.Client(base_url=sim.url, timeout=10) as c:
            assert "late" not in [x["name"] for x in c.get("/sdapi/v1/loras").json()]
            body = {"prompt": "x <lora:late:1>", "steps": 1, "width": 64, "height": 64}
            info = _info(c.post(TXT2IMG, json=body))
            assert info["extra_generation_params"]["Lora hashes"].startswith("late: ")
            assert "late" in [x["name"] for x in c.get("/sdapi/v1/loras").json()]
    finally:
        sim.stop()


def test_task_runs_record_the_sampler_and_schedule_that_ran(
    sim: A1111Simulator, client: httpx.Client
) -> None:
    body = {"steps": 3, "seed": 8, "sampler_name": "DPM++ 2M Karras", "force_task_id": "task(s)"}
    info = _info(client.post(TXT2IMG, json=body))
    assert info["sampler_name"] == "DPM++ 2M"
    assert info["extra_generation_params"]["Schedule type"] == "Karras"
    assert "Sampler: DPM++ 2M, Schedule type: Karras" in info["infotexts"][0]
    run = sim.task_runs["task(s)"]
    assert {k: run[k] for k in ("checkpoint", "sampler_name", "schedule_type", "seeds")} == {
        "checkpoint": "diving.safetensors",
        "sampler_name": "DPM++ 2M",
        "schedule_type": "Karras",
        "seeds": [8],
    }
    assert run["steps_finished"] == [3]
    unknown = {"steps": 1, "sampler_name": "Nope", "scheduler": "nope", "force_task_id": "task(u)"}
    info = _info(client.post(TXT2IMG, json=unknown))
    assert (info["sampler_name"], info["extra_generation_params"]["Schedule type"]) == (
        "DPM++ 2M",
        "Karras",  # Automatic resolves to the fallback sampler's own schedule
    )
    assert sim.task_runs["task(u)"]["sampler_name"] == "DPM++ 2M"


# --------------------------------------------------------------------------- ControlNet, photos

IP_MODELS = ["ip-adapter-plus-face_sd15 [71693645]", "ip-adapter_sd15 [6a3f6166]"]
REFERENCE_ONLY_INFOTEXT = (
    "Module: reference_only, Model: None, Weight: 0.8, Resize Mode: Crop and Resize,"
    " Processor Res: 512, Threshold A: 0.5, Threshold B: 0.5, Guidance Start: 0.0,"
    " Guidance End: 1.0, Pixel Perfect: False, Control Mode: Balanced"
)


def _encoded(image: Image.Image, fmt: str = "PNG") -> bytes:
    out = io.BytesIO()
    image.save(out, format=fmt)
    return out.getvalue()


@functools.cache
def _reference_png() -> bytes:
    """120x80, not square: red left third, blue right third, a green middle (kept by a crop)."""
    image = Image.new("RGB", (120, 80), (220, 20, 20))
    image.paste((20, 200, 40), (40, 0, 80, 80))
    image.paste((20, 40, 220), (80, 0, 120, 80))
    return _encoded(image)


def _reference_b64() -> str:
    return base64.b64encode(_reference_png()).decode()


def _unit(**fields: Any) -> dict[str, Any]:
    unit = {"enabled": True, "module": "reference_only", "model": "None", "weight": 0.8}
    return {**unit, "image": _reference_b64(), **fields}


def _cn_body(*units: Any, **extra: Any) -> dict[str, Any]:
    body = {"prompt": "a portrait", "seed": 7, "steps": 2, "width": 64, "height": 64}
    return {**body, "alwayson_scripts": {"controlnet": {"args": list(units)}}, **extra}


def _pixels(b64: str) -> bytes:
    return _png(b64).convert("RGB").tobytes()


def _plain_pixels(client: httpx.Client) -> bytes:
    body = {"prompt": "a portrait", "seed": 7, "steps": 2, "width": 64, "height": 64}
    answer = client.post(TXT2IMG, json=body)
    assert answer.status_code == 200, answer.text
    return _pixels(answer.json()["images"][0])


@pytest.fixture
def cn(sim: A1111Simulator) -> Iterator[A1111Simulator]:
    """The shared simulator with sd-webui-controlnet installed (no model files yet)."""
    original = sim.settings
    sim.settings = dataclasses.replace(original, controlnet=True, controlnet_models=[])
    yield sim
    sim.settings = original


def test_without_controlnet_the_script_and_routes_are_missing(
    sim: A1111Simulator, client: httpx.Client
) -> None:
    for path in ("/controlnet/version", "/controlnet/model_list", "/controlnet/module_list"):
        answer = client.get(path)
        assert (answer.status_code, answer.json()) == (404, {"detail": "Not Found"}), path
    for key in ("controlnet", "ControlNet"):
        answer = client.post(TXT2IMG, json=_cn_body(_unit()) | {"alwayson_scripts": {key: {}}})
        assert answer.status_code == 422
        assert answer.json() == {
            "error": "HTTPException",
            "detail": f"Script '{key}' not found",
            "body": "",
            "errors": "",
        }
    assert sim.task_runs == {} and sim.generations == 0  # refused before it was queued
    # A1111's own always-on scripts are there; a selectable one is refused.
    refiner = client.post(TXT2IMG, json=_cn_body() | {"alwayson_scripts": {"Refiner": {}}})
    assert refiner.status_code == 200, refiner.text
    xyz = client.post(TXT2IMG, json=_cn_body() | {"alwayson_scripts": {"x/y/z plot": {}}})
    assert xyz.status_code == 422
    assert xyz.json()["detail"] == "Cannot have a selectable script in the always on scripts params"


def test_controlnet_routes(cn: A1111Simulator, client: httpx.Client) -> None:
    assert client.get("/controlnet/version").json() == {"version": 3}
    assert client.get("/controlnet/settings").json() == {"control_net_unit_count": 3}
    assert client.get("/controlnet/model_list").json() == {"model_list": []}  # no "None"
    assert client.post("/controlnet/version").status_code == 405
    assert client.get("/controlnet/nosuch").status_code == 404

    modules = client.get("/controlnet/module_list").json()
    names, detail = modules["module_list"], modules["module_detail"]
    assert names[0] == "none" and len(names) == len(set(names)) > 40
    for name in ("reference_only", "reference_adain", "reference_adain+attn"):
        assert detail[name]["model_free"] is True, name
    for name in (
        "none",
        "canny",
        "ip-adapter-auto",
        "ip-adapter_clip_sd15",
        "ip-adapter_face_id_plus",
    ):
        assert detail[name]["model_free"] is False, name
    assert [(s["name"], s["value"]) for s in detail["reference_only"]["sliders"]] == [
        ("Resolution", 512),
        ("Style Fidelity (only for Balanced mode)", 0.5),
    ]
    aliased = client.get("/controlnet/module_list", params={"alias_names": "true"}).json()
    assert "ip-adapter_clip_h" in aliased["module_list"]
    assert "ip-adapter_clip_sd15" not in aliased["module_list"]
    assert "reference_only" in aliased["module_list"]

    types = client.get("/controlnet/control_types").json()["control_types"]
    assert types["Reference"]["module_list"] == [
        "none",
        "reference_only",
        "reference_adain+attn",
        "reference_adain",
    ]
    assert types["Reference"]["model_list"] == ["None"]
    assert "ip-adapter-auto" in types["IP-Adapter"]["module_list"]

    cn.settings = dataclasses.replace(cn.settings, controlnet_models=list(IP_MODELS))
    assert client.get("/controlnet/model_list").json() == {"model_list": IP_MODELS}
    ip_types = client.get("/controlnet/control_types").json()["control_types"]["IP-Adapter"]
    assert ip_types["model_list"] == ["None", *IP_MODELS]

    # Registered by the extension on the app itself: --api-auth does not cover them.
    cn.settings = dataclasses.replace(cn.settings, api_auth=("u", "p"))
    assert client.get("/sdapi/v1/sd-models").status_code == 401
    assert client.get("/controlnet/version").status_code == 200


def test_reference_only_unit_is_applied_with_its_detected_map(
    cn: A1111Simulator, client: httpx.Client
) -> None:
    plain = _plain_pixels(client)
    answer = client.post(TXT2IMG, json=_cn_body(_unit()))
    images, info = answer.json()["images"], _info(answer)
    assert len(images) == 2  # the generated image, then the detected map
    assert _pixels(images[0]) != plain
    expected_map = ImageOps.fit(
        Image.open(io.BytesIO(_reference_png())).convert("RGB"), (64, 64), Image.Resampling.LANCZOS
    )
    detected = _png(images[1])
    assert detected.size == (64, 64)
    assert detected.convert("RGB").tobytes() == expected_map.tobytes()  # centre crop, resized
    assert "parameters" not in detected.info
    assert info["extra_generation_params"]["ControlNet 0"] == REFERENCE_ONLY_INFOTEXT
    assert f'ControlNet 0: "{REFERENCE_ONLY_INFOTEXT}"' in info["infotexts"][0]
    assert len(info["infotexts"]) == 1
    assert _parse_infotext(info["infotexts"][0])[2]["ControlNet 0"] == REFERENCE_ONLY_INFOTEXT
    sent = answer.json()["parameters"]["alwayson_scripts"]["controlnet"]["args"][0]
    assert sent["image"] == _reference_b64()  # parameters echo the request

    again = client.post(TXT2IMG, json=_cn_body(_unit())).json()["images"]
    assert _pixels(again[0]) == _pixels(images[0])  # deterministic

    no_map = client.post(TXT2IMG, json=_cn_body(_unit(save_detected_map=False))).json()
    assert len(no_map["images"]) == 1
    assert _pixels(no_map["images"][0]) == _pixels(images[0])

    zero = client.post(TXT2IMG, json=_cn_body(_unit(weight=0))).json()
    assert len(zero["images"]) == 2 and _pixels(zero["images"][0]) == plain
    stronger = client.post(TXT2IMG, json=_cn_body(_unit(weight=1.6))).json()["images"][0]
    assert _pixels(stronger) not in (plain, _pixels(images[0]))

    data_url = "data:image/png;base64," + _reference_b64()
    via_url = client.post(TXT2IMG, json=_cn_body(_unit(image=data_url))).json()["images"]
    alias = _unit(input_image=_reference_b64())
    del alias["image"]
    via_alias = client.post(TXT2IMG, json=_cn_body(alias)).json()["images"]
    assert _pixels(via_url[0]) == _pixels(via_alias[0]) == _pixels(images[0])

    records = cn.controlnet_units
    assert len(records) == 8 and records[0] == []  # the plain request had no unit
    first = records[1][0]
    assert first["applied"] is True and first["skipped"] is None
    assert (first["unit"], first["module"], first["weight"]) == (0, "reference_only", 0.8)
    assert first["image_sha256"] == hashlib.sha256(_reference_png()).hexdigest()
    assert first["image_size"] == [120, 80]
    assert cn.task_runs[cn.finished_tasks[1]]["controlnet"] == records[1]


def test_a_unit_must_be_enabled(cn: A1111Simulator, client: httpx.Client) -> None:
    plain = _plain_pixels(client)
    for unit in (_unit(enabled=False), {k: v for k, v in _unit().items() if k != "enabled"}):
        answer = client.post(TXT2IMG, json=_cn_body(unit))
        assert len(answer.json()["images"]) == 1
        assert _pixels(answer.json()["images"][0]) == plain
        assert "ControlNet 0" not in _info(answer)["extra_generation_params"]
    assert cn.controlnet_units == [[], [], []]  # the plain request, then the two


def test_units_that_fail_are_silently_left_out(cn: A1111Simulator, client: httpx.Client) -> None:
    plain = _plain_pixels(client)
    ip = {"module": "ip-adapter_clip_sd15", "model": "ip-adapter_sd15"}
    rgba = base64.b64encode(_encoded(Image.new("RGBA", (32, 32), (9, 9, 9, 128)))).decode()
    cases = [
        (_unit(**ip), "RuntimeError: model not found: None"),
        (_unit(module="canny"), "RuntimeError: You have not selected any ControlNet Model."),
        (_unit(image=None), "ValueError: controlnet is enabled but no input image is given"),
        ({k: v for k, v in _unit().items() if k != "image"}, "ValueError: controlnet is enabled"),
        (_unit(image="bm90IGFuIGltYWdl"), "HTTPException: Invalid encoded image"),
        (_unit(image=rgba), "AssertionError"),
    ]
    for unit, reason in cases:
        answer = client.post(TXT2IMG, json=_cn_body(unit))
        assert answer.status_code == 200, answer.text
        assert len(answer.json()["images"]) == 1, reason  # no detected map
        assert _pixels(answer.json()["images"][0]) == plain, reason
        # get_enabled_units wrote the infotext before the unit failed
        assert _info(answer)["extra_generation_params"]["ControlNet 0"].startswith("Module: ")
        record = cn.controlnet_units[-1][0]
        assert record["applied"] is False and record["skipped"].startswith(reason), record

    cn.settings = dataclasses.replace(cn.settings, controlnet_models=list(IP_MODELS))
    answer = client.post(TXT2IMG, json=_cn_body(_unit(**ip)))
    assert len(answer.json()["images"]) == 2
    assert _pixels(answer.json()["images"][0]) != plain
    assert cn.controlnet_units[-1][0]["model_resolved"] == "ip-adapter_sd15 [6a3f6166]"
    face = _unit(module="ip-adapter-auto", model="plus-face")  # shortest name containing it
    client.post(TXT2IMG, json=_cn_body(face))
    assert cn.controlnet_units[-1][0]["model_resolved"] == "ip-adapter-plus-face_sd15 [71693645]"


def test_bad_units_fail_the_request_like_the_extension(
    cn: A1111Simulator, client: httpx.Client
) -> None:
    answer = client.post(TXT2IMG, json=_cn_body(_unit(module="nosuchmodule")))
    assert answer.status_code == 500
    assert answer.json() == {
        "error": "ValidationError",
        "detail": "",
        "body": "",
        "errors": "1 validation error for ControlNetUnit\nmodule\n"
        "  module(nosuchmodule) not found in supported modules. (type=value_error)",
    }
    disabled = client.post(TXT2IMG, json=_cn_body(_unit(module="nope", enabled=False)))
    assert disabled.status_code == 500  # the module is checked even on a disabled unit
    heavy = client.post(TXT2IMG, json=_cn_body(_unit(weight=3)))
    assert heavy.status_code == 500
    assert "weight\n  ensure this value is less than or equal to 2.0" in heavy.json()["errors"]
    backwards = client.post(TXT2IMG, json=_cn_body(_unit(guidance_start=0.8, guidance_end=0.2)))
    assert "guidance_start(0.8) > guidance_end(0.2)" in backwards.json()["errors"]
    # Model names are not checked at that stage.
    assert client.post(TXT2IMG, json=_cn_body(_unit(model="whatever"))).status_code == 200


def test_only_three_units_are_read_and_n_counts_enabled_ones(
    cn: A1111Simulator, client: httpx.Client
) -> None:
    units = [_unit(enabled=False), _unit(weight=0.5), _unit(weight=1.0), _unit(weight=1.5)]
    answer = client.post(TXT2IMG, json=_cn_body(*units))
    extra = _info(answer)["extra_generation_params"]
    assert [k for k in extra if k.startswith("ControlNet")] == ["ControlNet 0", "ControlNet 1"]
    assert "Weight: 0.5," in extra["ControlNet 0"] and "Weight: 1.0," in extra["ControlNet 1"]
    assert len(answer.json()["images"]) == 3  # one image, two maps
    assert [(r["unit"], r["slot"]) for r in cn.controlnet_units[-1]] == [(0, 1), (1, 2)]


def test_photo_outputs_replace_the_placeholder_in_order(
    sim: A1111Simulator, client: httpx.Client
) -> None:
    red = _encoded(Image.new("RGB", (200, 100), (250, 0, 0)), "JPEG")
    blue = _encoded(Image.new("RGB", (90, 90), (0, 0, 250)))
    original = sim.settings
    sim.settings = dataclasses.replace(original, photo_outputs=[red, blue])
    try:

        def colours(**extra: Any) -> list[tuple[int, ...]]:
            body = {"prompt": "p", "seed": 3, "steps": 1, "width": 48, "height": 64, **extra}
            answer = client.post(TXT2IMG, json=body)
            pictures = [_png(b64) for b64 in answer.json()["images"]]
            assert all(p.size == (48, 64) for p in pictures)
            assert all("Seed: 3" in p.info["parameters"] for p in pictures[:1])
            return [p.convert("RGB").getpixel((24, 32)) for p in pictures]

        first = colours()[0]
        assert first[0] > 200 and first[2] < 40  # the first photo
        assert colours()[0] == (0, 0, 250)
        assert colours(batch_size=2) == [(0, 0, 250), (0, 0, 250)]  # the last one repeats
        sim.reset()
        both = colours(batch_size=2)
        assert both[0][0] > 200 and both[1] == (0, 0, 250)

        sim.settings = dataclasses.replace(sim.settings, photo_outputs=[b"not a picture"])
        answer = client.post(TXT2IMG, json={"steps": 1, "width": 48, "height": 48})
        assert answer.status_code == 500 and "photo_outputs[0]" in answer.json()["errors"]
    finally:
        sim.settings = original


def test_controlnet_blends_into_photo_outputs(cn: A1111Simulator, client: httpx.Client) -> None:
    grey = _encoded(Image.new("RGB", (64, 64), (128, 128, 128)))
    cn.settings = dataclasses.replace(cn.settings, photo_outputs=[grey])
    plain = client.post(TXT2IMG, json=_cn_body()).json()["images"]
    conditioned = client.post(TXT2IMG, json=_cn_body(_unit())).json()["images"]
    assert _png(plain[0]).convert("RGB").getpixel((32, 32)) == (128, 128, 128)
    assert _png(conditioned[0]).convert("RGB").getpixel((32, 32)) != (128, 128, 128)
    assert len(conditioned) == 2
