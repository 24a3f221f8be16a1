"""The ComfyUI and RunPod fakes' identity conditioning, driven over real HTTP on 127.0.0.1:
uploads, LoadImage, the IPAdapter nodes, and the RunPod workers' ``images`` /
``alwayson_scripts``."""

from __future__ import annotations

import base64
import copy
import io
import json
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from PIL import Image

from tests.fakes.comfy_identity import IPADAPTER_PRESETS, WEIGHT_TYPES
from tests.fakes.comfyui import USER_WORKFLOW, FakeComfyUI
from tests.fakes.runpod import RunPodFake

KEY = "rp-test-key"


def _png(colour: tuple[int, int, int], size: tuple[int, int] = (90, 60)) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", size, colour).save(out, format="PNG")
    return out.getvalue()


RED, GREEN = _png((230, 20, 20)), _png((20, 200, 40))


def _graph(checkpoint: str, seed: int = 5) -> dict[str, Any]:
    """charforge's one-pass txt2img graph, 64x64, two steps."""
    graph = copy.deepcopy(USER_WORKFLOW)
    graph["ckpt"]["inputs"]["ckpt_name"] = checkpoint
    graph["pos"]["inputs"]["text"] = "a portrait"
    graph["neg"]["inputs"]["text"] = "blurry"
    graph["latent"]["inputs"].update(width=64, height=64)
    sampler = graph["sample"]["inputs"]
    sampler.update(seed=seed, steps=2, cfg=7.0, sampler_name="euler", scheduler="normal")
    return graph


def _with_ipadapter(
    graph: dict[str, Any], image: str = "ref.png", weight: float = 1.0, **advanced: Any
) -> dict[str, Any]:
    graph = copy.deepcopy(graph)
    graph["load"] = {"class_type": "LoadImage", "inputs": {"image": image}}
    graph["ipl"] = {
        "class_type": "IPAdapterUnifiedLoader",
        "inputs": {"model": ["ckpt", 0], "preset": "PLUS FACE (portraits)"},
    }
    graph["ipa"] = {
        "class_type": "IPAdapterAdvanced",
        "inputs": {
            "model": ["ipl", 0],
            "ipadapter": ["ipl", 1],
            "image": ["load", 0],
            "weight": weight,
            "weight_type": "linear",
            "combine_embeds": "concat",
            "start_at": 0.0,
            "end_at": 1.0,
            "embeds_scaling": "V only",
            **advanced,
        },
    }
    graph["sample"]["inputs"]["model"] = ["ipa", 0]
    return graph


def _run(client: httpx.Client, graph: dict[str, Any]) -> dict[str, Any]:
    """POST /prompt (which must be accepted) and wait for the history entry."""
    answer = client.post("/prompt", json={"prompt": graph})
    assert answer.status_code == 200, answer.text
    prompt_id = answer.json()["prompt_id"]
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        history = client.get(f"/history/{prompt_id}").json()
        if history:
            entry: dict[str, Any] = history[prompt_id]
            return entry
        time.sleep(0.02)
    raise AssertionError("the prompt never finished")


def _saved_pixels(client: httpx.Client, entry: dict[str, Any]) -> bytes:
    assert entry["status"]["status_str"] == "success", entry["status"]
    image = entry["outputs"]["save"]["images"][0]
    data = client.get("/view", params=image).content
    return Image.open(io.BytesIO(data)).convert("RGB").tobytes()


def _upload(client: httpx.Client, name: str, data: bytes, **form: str) -> httpx.Response:
    return client.post("/upload/image", files={"image": (name, data, "image/png")}, data=form)


@pytest.fixture(scope="module")
def comfy_server() -> Iterator[FakeComfyUI]:
    with FakeComfyUI(ipadapter=True) as server:
        yield server


@pytest.fixture
def comfy(comfy_server: FakeComfyUI) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=comfy_server.url, timeout=10) as client:
        yield client


# --------------------------------------------------------------------------- ComfyUI


def test_upload_stores_and_renames_like_comfyui() -> None:
    with FakeComfyUI() as fake, httpx.Client(base_url=fake.url, timeout=10) as client:
        first = _upload(client, "face.png", RED)
        assert first.json() == {"name": "face.png", "subfolder": "", "type": "input"}
        same = _upload(client, "face.png", RED)  # identical bytes: the existing name
        assert same.json()["name"] == "face.png"
        assert _upload(client, "face.png", GREEN).json()["name"] == "face (1).png"
        assert _upload(client, "face.png", _png((1, 2, 3))).json()["name"] == "face (2).png"
        replaced = _upload(client, "face.png", GREEN, overwrite="true")
        assert replaced.json()["name"] == "face.png"
        assert fake.input_file("face.png") == GREEN
        assert fake.input_file("face (1).png") == GREEN

        nested = _upload(client, "face.png", RED, subfolder="chars", type="input")
        assert nested.json() == {"name": "face.png", "subfolder": "chars", "type": "input"}
        assert fake.input_file("face.png", "chars") == RED
        temp = _upload(client, "t.png", RED, type="temp")
        assert temp.json()["type"] == "temp"
        view = client.get("/view", params={"filename": "face.png", "type": "input"})
        assert (view.status_code, view.content) == (200, GREEN)

        assert client.post("/upload/image", data={"type": "input"}).status_code == 400
        assert _upload(client, "x.png", RED, subfolder="../..").status_code == 400
        assert _upload(client, "x.png", RED, type="models").status_code == 500

        uploads = fake.uploads
        assert [u.name for u in uploads] == [
            "face.png",
            "face.png",
            "face (1).png",
            "face (2).png",
            "face.png",
            "face.png",
            "t.png",
        ]
        assert uploads[1].duplicate and not uploads[0].duplicate
        assert uploads[4].overwrite and not uploads[3].overwrite
        assert len(fake.posted("/upload/image")) == 10  # the refused ones are recorded too


def test_load_image_validation_and_execution(
    comfy_server: FakeComfyUI, comfy: httpx.Client
) -> None:
    graph = {
        "load": {"class_type": "LoadImage", "inputs": {"image": "portrait.png"}},
        "save": {
            "class_type": "SaveImage",
            "inputs": {"images": ["load", 0], "filename_prefix": "x"},
        },
    }
    missing = comfy.post("/prompt", json={"prompt": graph})
    assert missing.status_code == 400
    body = missing.json()
    assert body["error"]["type"] == "prompt_outputs_failed_validation"
    assert body["node_errors"]["load"] == {
        "errors": [
            {
                "type": "custom_validation_failed",
                "message": "Custom validation failed for node",
                "details": "image - Invalid image file: portrait.png",
                "extra_info": {"input_name": "image"},
            }
        ],
        "dependent_outputs": ["save"],
        "class_type": "LoadImage",
    }

    _upload(comfy, "portrait.png", RED, overwrite="true")
    _upload(comfy, "deep.png", GREEN, subfolder="chars", overwrite="true")
    info = comfy.get("/object_info/LoadImage").json()["LoadImage"]
    assert info["output"] == ["IMAGE", "MASK"]
    files, options = info["input"]["required"]["image"]
    assert "portrait.png" in files and "deep.png" not in files  # the top of input/ only
    assert options == {"image_upload": True}

    entry = _run(comfy, graph)
    saved = _saved_pixels(comfy, entry)
    assert saved == Image.open(io.BytesIO(RED)).convert("RGB").tobytes()
    nested = copy.deepcopy(graph)
    nested["load"]["inputs"]["image"] = "chars/deep.png"  # valid although not in the combo
    assert _saved_pixels(comfy, _run(comfy, nested)) == Image.open(io.BytesIO(GREEN)).tobytes()

    _upload(comfy, "broken.png", b"not a picture", overwrite="true")
    broken = copy.deepcopy(graph)
    broken["load"]["inputs"]["image"] = "broken.png"
    failed = _run(comfy, broken)
    assert failed["status"]["status_str"] == "error"
    event, data = failed["status"]["messages"][-1]
    assert event == "execution_error"
    assert (data["node_type"], data["exception_type"]) == (
        "LoadImage",
        "PIL.UnidentifiedImageError",
    )
    assert "cannot identify image file" in data["exception_message"]


def test_ipadapter_nodes_are_unknown_without_the_pack() -> None:
    with FakeComfyUI() as fake, httpx.Client(base_url=fake.url, timeout=10) as client:
        listed = client.get("/object_info").json()
        assert "LoadImage" in listed
        assert "IPAdapterAdvanced" not in listed and "IPAdapterUnifiedLoader" not in listed
        assert client.get("/object_info/IPAdapterAdvanced").json() == {}
        _upload(client, "ref.png", RED)
        answer = client.post(
            "/prompt", json={"prompt": _with_ipadapter(_graph("diving.safetensors"))}
        )
        assert answer.status_code == 400
        assert answer.json() == {
            "error": {
                "type": "invalid_prompt",
                "message": "Cannot execute because node IPAdapterUnifiedLoader does not exist.",
                "details": "Node ID '#ipl'",
                "extra_info": {},
            },
            "node_errors": {},
        }


def test_ipadapter_node_specs_and_validation(comfy: httpx.Client) -> None:
    loader = comfy.get("/object_info/IPAdapterUnifiedLoader").json()["IPAdapterUnifiedLoader"]
    assert loader["input"] == {
        "required": {"model": ["MODEL"], "preset": [IPADAPTER_PRESETS]},
        "optional": {"ipadapter": ["IPADAPTER"]},
    }
    assert (loader["output"], loader["output_name"]) == (
        ["MODEL", "IPADAPTER"],
        ["model", "ipadapter"],
    )
    advanced = comfy.get("/object_info/IPAdapterAdvanced").json()["IPAdapterAdvanced"]
    required = advanced["input"]["required"]
    assert list(required) == [
        "model",
        "ipadapter",
        "image",
        "weight",
        "weight_type",
        "combine_embeds",
        "start_at",
        "end_at",
        "embeds_scaling",
    ]
    assert required["weight"] == ["FLOAT", {"default": 1.0, "min": -1, "max": 5, "step": 0.05}]
    assert required["weight_type"] == [WEIGHT_TYPES]
    assert required["end_at"] == ["FLOAT", {"default": 1.0, "min": 0.0, "max": 1.0, "step": 0.001}]
    assert advanced["input"]["optional"] == {
        "image_negative": ["IMAGE"],
        "attn_mask": ["MASK"],
        "clip_vision": ["CLIP_VISION"],
    }
    assert advanced["output"] == ["MODEL"]

    _upload(comfy, "ref.png", RED, overwrite="true")
    base = _graph("diving.safetensors")

    def node_error(graph: dict[str, Any], node: str) -> dict[str, Any]:
        answer = comfy.post("/prompt", json={"prompt": graph})
        assert answer.status_code == 400, answer.text
        error: dict[str, Any] = answer.json()["node_errors"][node]["errors"][0]
        return error

    bad_preset = _with_ipadapter(base)
    bad_preset["ipl"]["inputs"]["preset"] = "ULTRA"
    assert node_error(bad_preset, "ipl")["type"] == "value_not_in_list"
    assert node_error(_with_ipadapter(base, weight=6), "ipa")["type"] == "value_bigger_than_max"
    incomplete = _with_ipadapter(base)
    del incomplete["ipa"]["inputs"]["embeds_scaling"]
    assert node_error(incomplete, "ipa")["details"] == "embeds_scaling"
    wrong_link = _with_ipadapter(base)
    wrong_link["ipa"]["inputs"]["image"] = ["ckpt", 0]
    assert node_error(wrong_link, "ipa")["type"] == "return_type_mismatch"
    bad_mask = _with_ipadapter(base, attn_mask=["ckpt", 2])  # optional inputs are checked too
    assert node_error(bad_mask, "ipa")["details"] == "attn_mask, VAE != MASK"


def test_ipadapter_changes_the_picture_by_weight_and_image(comfy: httpx.Client) -> None:
    _upload(comfy, "ref.png", RED, overwrite="true")
    base = _graph("diving.safetensors", seed=11)
    plain = _saved_pixels(comfy, _run(comfy, base))
    assert _saved_pixels(comfy, _run(comfy, _with_ipadapter(base, weight=0.0))) == plain
    red = _saved_pixels(comfy, _run(comfy, _with_ipadapter(base, weight=1.0)))
    assert red != plain
    stronger = _saved_pixels(comfy, _run(comfy, _with_ipadapter(base, weight=1.8)))
    assert stronger not in (plain, red)
    late = _with_ipadapter(base, weight=1.0, start_at=0.5)
    assert _saved_pixels(comfy, _run(comfy, late)) not in (plain, red)

    # The same graph after ref.png changed on disk runs again (LoadImage.IS_CHANGED).
    _upload(comfy, "ref.png", GREEN, overwrite="true")
    green = _saved_pixels(comfy, _run(comfy, _with_ipadapter(base, weight=1.0)))
    assert green not in (plain, red)
    _upload(comfy, "ref.png", RED, overwrite="true")
    assert _saved_pixels(comfy, _run(comfy, _with_ipadapter(base, weight=1.0))) == red


# --------------------------------------------------------------------------- RunPod


def _runsync(fake: RunPodFake, job_input: Any) -> dict[str, Any]:
    answer = httpx.post(
        f"{fake.url_for_endpoint}/runsync",
        json={"input": job_input},
        headers={"Authorization": f"Bearer {KEY}"},
        timeout=30,
    )
    assert answer.status_code == 200, answer.text
    body: dict[str, Any] = answer.json()
    return body


def _first_image(answer: dict[str, Any]) -> bytes:
    assert answer["status"] == "COMPLETED", answer
    data = base64.b64decode(answer["output"]["images"][0]["data"])
    return Image.open(io.BytesIO(data)).convert("RGB").tobytes()


def test_runpod_comfyui_worker_uploads_input_images() -> None:
    with RunPodFake(worker="comfyui", api_key=KEY, ipadapter=True) as fake:
        base = _graph("cyberrealistic.safetensors")
        data_url = "data:image/png;base64," + base64.b64encode(RED).decode()
        images = [{"name": "ref.png", "image": data_url}]
        plain = _first_image(_runsync(fake, {"workflow": base}))
        conditioned = _first_image(
            _runsync(fake, {"workflow": _with_ipadapter(base), "images": images})
        )
        assert conditioned != plain
        zero = {"workflow": _with_ipadapter(base, weight=0.0), "images": images}
        assert _first_image(_runsync(fake, zero)) == plain
        uploads = fake.comfy_uploads
        assert [(u.name, u.overwrite, u.type) for u in uploads] == [("ref.png", True, "input")] * 2
        assert uploads[0].sha256 == uploads[1].sha256

        green = [{"name": "ref.png", "image": base64.b64encode(GREEN).decode()}]  # plain base64
        other = _first_image(_runsync(fake, {"workflow": _with_ipadapter(base), "images": green}))
        assert other not in (plain, conditioned)


def test_runpod_comfyui_worker_failures() -> None:
    with RunPodFake(worker="comfyui", api_key=KEY, ipadapter=True) as fake:
        graph = _with_ipadapter(_graph("cyberrealistic.safetensors"), image="face.png")

        not_uploaded = _runsync(fake, {"workflow": graph})
        assert not_uploaded["status"] == "FAILED"
        assert not_uploaded["error"].startswith(
            "Workflow validation failed:\n• Node load (errors): "
        )
        assert "image - Invalid image file: face.png" in not_uploaded["error"]
        assert "Available checkpoint models" not in not_uploaded["error"]

        bad = _runsync(fake, {"workflow": graph, "images": [{"name": "face.png", "image": "abc"}]})
        assert (bad["status"], bad["error"]) == (
            "FAILED",
            "Failed to upload one or more input images",
        )
        assert bad["output"] == {
            "details": ["Error decoding base64 for face.png: Incorrect padding"]
        }

        shapeless = _runsync(fake, {"workflow": graph, "images": [{"name": "face.png"}]})
        assert (
            shapeless["error"] == "'images' must be a list of objects with 'name' and 'image' keys"
        )

        text = base64.b64encode(b"hello, not a picture").decode()
        not_a_picture = _runsync(
            fake, {"workflow": graph, "images": [{"name": "face.png", "image": text}]}
        )
        assert (not_a_picture["status"], not_a_picture["error"]) == (
            "FAILED",
            "Job processing failed",
        )
        [detail] = not_a_picture["output"]["details"]
        assert detail.startswith("Workflow execution error: Node Type: LoadImage, Node ID: load, ")
        assert "cannot identify image file '/comfyui/input/face.png'" in detail
        assert len(fake.comfy_uploads) == 1  # only the decodable one reached ComfyUI

    with RunPodFake(worker="comfyui", api_key=KEY) as fake:
        images = [{"name": "face.png", "image": base64.b64encode(RED).decode()}]
        no_pack = _runsync(fake, {"workflow": graph, "images": images})
        assert no_pack["status"] == "FAILED"
        message = "Cannot execute because node IPAdapterUnifiedLoader does not exist."
        assert no_pack["error"].startswith(f"{message}. Raw response: ")
        raw = json.loads(no_pack["error"].split("Raw response: ", 1)[1])
        assert raw["error"]["type"] == "invalid_prompt" and raw["node_errors"] == {}


def test_runpod_a1111_worker_passes_alwayson_scripts_through() -> None:
    reference = base64.b64encode(RED).decode()
    unit = {"enabled": True, "module": "reference_only", "model": "None", "image": reference}
    job = {
        "prompt": "a portrait",
        "steps": 2,
        "width": 64,
        "height": 64,
        "alwayson_scripts": {"controlnet": {"args": [unit]}},
    }
    with RunPodFake(worker="a1111", api_key=KEY) as fake:
        refused = _runsync(fake, job)
        assert (refused["status"], refused["error"]) == ("FAILED", "HTTPException")
        assert refused["output"] == {
            "detail": "Script 'controlnet' not found",
            "body": "",
            "errors": "",
        }
        assert [r.body["input"] for r in fake.requests if r.path == "/runsync"] == [job]

    with RunPodFake(worker="a1111", api_key=KEY, controlnet=True) as fake:
        answer = _runsync(fake, job)
        assert answer["status"] == "COMPLETED", answer
        output = answer["output"]
        assert len(output["images"]) == 2  # the picture and the detected map
        info = json.loads(output["info"])
        assert info["extra_generation_params"]["ControlNet 0"].startswith(
            "Module: reference_only, Model: None, Weight: 1.0,"
        )
        assert output["parameters"]["alwayson_scripts"] == job["alwayson_scripts"]
        [[record]] = fake.a1111.controlnet_units
        assert record["applied"] is True
