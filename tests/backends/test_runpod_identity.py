"""RunPod identity conditioning over real HTTP against the fake RunPod endpoint: the comfyui
worker's ``input.images`` and IPAdapter graph, the a1111 worker's ControlNet units, and a
worker without them (default: again without, and why; required: refused)."""

from __future__ import annotations

import base64
import copy
import json
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from charforge.backends.base import BackendRequest, IdentityUse, ReferenceImage
from charforge.backends.comfyui.identity import WorkflowNeedsReference
from charforge.backends.runpod import RunPodBackend
from charforge.domain.capabilities import Capability, capabilities_for
from charforge.domain.routes import BackendSpec
from charforge.errors import IdentityUnavailable
from tests.backends.test_comfyui_identity import (
    BLUE,
    FACE,
    PLAIN,
    RED,
    name_of,
    nodes,
    redness,
    reference_workflow,
)
from tests.backends.test_runpod import FAST, KEY, KEY_VAR, SOURCE, params
from tests.fakes.comfyui import USER_WORKFLOW
from tests.fakes.runpod import RunPodFake

Fakes = Callable[..., RunPodFake]
Backends = Callable[..., RunPodBackend]
NO_NODES = (
    "backend 'rp': its ComfyUI worker has no IPAdapterUnifiedLoader node (ComfyUI_IPAdapter_plus)"
)
NO_CONTROLNET = "backend 'rp': its A1111 worker has no ControlNet extension"


@pytest.fixture
def key(monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setenv(KEY_VAR, KEY)
    return KEY


@pytest.fixture
def fakes() -> Iterator[Fakes]:
    started: list[RunPodFake] = []

    def start(**settings: Any) -> RunPodFake:
        started.append(RunPodFake(api_key=KEY, **settings).start())
        return started[-1]

    yield start
    for fake in started:
        fake.stop()


@pytest.fixture
def backends() -> Iterator[Backends]:
    made: list[RunPodBackend] = []

    def make(fake: RunPodFake, *, workflow: Path | None = None) -> RunPodBackend:
        spec = BackendSpec(
            name="rp",
            kind="runpod",
            url=fake.url_for_endpoint,
            auth=None,
            timeout=10.0,
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


def ask(
    backend: RunPodBackend,
    style: str = "realistic",
    references: tuple[ReferenceImage, ...] = (RED,),
    *,
    strength: float = 0.6,
    required: bool = False,
    count: int = 1,
    **changes: Any,
) -> BackendRequest:
    p = replace(params(**changes), identity_strength=strength, identity_required=required)
    info = backend.find_checkpoint("cyberrealistic.safetensors", style=style)
    return BackendRequest(style, info, p, count, task_id="t-1", references=references)


def workflow_file(tmp_path: Path, graph: dict[str, Any]) -> Path:
    path = tmp_path / "workflow.json"
    path.write_text(json.dumps(graph), encoding="utf-8")
    return path


# -- the comfyui worker ---------------------------------------------------------------------


def test_comfyui_worker_gets_the_references_and_the_ipadapter_graph_in_every_job(
    key: str, fakes: Fakes, backends: Backends
) -> None:
    fake = fakes(worker="comfyui", ipadapter=True)
    backend = backends(fake)

    result = backend.generate(ask(backend, references=(RED, BLUE), count=2))

    assert result.identity == IdentityUse(True, FACE)
    jobs = fake.inputs()
    assert len(jobs) == 2  # one job per image, each with the pictures: workers keep nothing
    for job in jobs:
        assert job["images"] == [
            {"name": name_of(RED), "image": base64.b64encode(RED.png).decode()},
            {"name": name_of(BLUE), "image": base64.b64encode(BLUE.png).decode()},
        ]
        graph = job["workflow"]
        [loader] = nodes(graph, "IPAdapterUnifiedLoader").values()
        assert loader["inputs"]["preset"] == "PLUS FACE (portraits)"
        loads = sorted(node["inputs"]["image"] for node in nodes(graph, "LoadImage").values())
        assert loads == sorted([name_of(RED), name_of(BLUE)])
        adapters = nodes(graph, "IPAdapterAdvanced")
        assert [a["inputs"]["weight"] for a in adapters.values()] == pytest.approx([0.3, 0.3])
        [sampler] = nodes(graph, "KSampler").values()
        assert sampler["inputs"]["model"][0] in adapters
    # The worker put them into its ComfyUI's input folder, by the names the graph uses.
    assert [u.name for u in fake.comfy_uploads] == [name_of(RED), name_of(BLUE)] * 2
    assert redness(result.images[0].data) > 10  # the red reference blended into the picture
    probe = backend.probe()
    assert probe.lacking == frozenset() and probe.identity_method == FACE


def test_comfyui_worker_drawn_styles_use_the_plus_preset(
    key: str, fakes: Fakes, backends: Backends
) -> None:
    fake = fakes(worker="comfyui", ipadapter=True)
    backend = backends(fake)

    assert backend.generate(ask(backend, "anime")).identity == IdentityUse(True, PLAIN)
    [loader] = nodes(fake.inputs()[0]["workflow"], "IPAdapterUnifiedLoader").values()
    assert loader["inputs"]["preset"] == "PLUS (high strength)"


def test_comfyui_worker_without_the_nodes_goes_without_and_remembers_it(
    key: str, fakes: Fakes, backends: Backends
) -> None:
    fake = fakes(worker="comfyui")
    backend = backends(fake)

    result = backend.generate(ask(backend))

    assert result.identity == IdentityUse(False, reason=NO_NODES)
    first, second = fake.inputs()
    assert "images" in first and nodes(first["workflow"], "IPAdapterUnifiedLoader")
    assert "images" not in second and not nodes(second["workflow"], "LoadImage")
    assert len(result.images) == 1
    assert backend.probe().lacking == frozenset({Capability.REFERENCE_IMAGE})

    again = backend.generate(ask(backend, seed=5))  # known now: one job, without
    assert again.identity == IdentityUse(False, reason=NO_NODES)
    assert len(fake.inputs()) == 3 and "images" not in fake.inputs()[-1]
    with pytest.raises(IdentityUnavailable) as refused:
        backend.generate(ask(backend, required=True))
    assert len(fake.inputs()) == 3  # refused before anything was sent
    assert refused.value.extra == {"capability": "reference_image", "backends": ["rp"]}


def test_comfyui_worker_without_the_nodes_refuses_a_required_request(
    key: str, fakes: Fakes, backends: Backends
) -> None:
    fake = fakes(worker="comfyui")
    backend = backends(fake)

    with pytest.raises(IdentityUnavailable) as refused:
        backend.generate(ask(backend, required=True))

    assert refused.value.backend_specific
    assert "IPAdapterUnifiedLoader" in refused.value.message
    assert "ComfyUI_IPAdapter_plus" in (refused.value.hint or "")
    assert len(fake.inputs()) == 1  # the job that found out; not sent again without


def test_comfyui_worker_no_conditioning_asked_sends_no_images(
    key: str, fakes: Fakes, backends: Backends
) -> None:
    fake = fakes(worker="comfyui", ipadapter=True)
    backend = backends(fake)

    for request in (ask(backend, references=()), ask(backend, strength=0.0)):
        assert backend.generate(request).identity is None
        job = fake.inputs()[-1]
        assert "images" not in job and not nodes(job["workflow"], "LoadImage")
    assert fake.comfy_uploads == []


def test_comfyui_worker_workflow_placeholder_gets_the_first_reference(
    key: str, fakes: Fakes, backends: Backends, tmp_path: Path
) -> None:
    fake = fakes(worker="comfyui", ipadapter=True)
    backend = backends(fake, workflow=workflow_file(tmp_path, reference_workflow()))

    result = backend.generate(ask(backend, references=(BLUE, RED)))

    assert result.identity == IdentityUse(True, "comfyui workflow ({{reference_image}})")
    [job] = fake.inputs()
    assert [image["name"] for image in job["images"]] == [name_of(BLUE)]
    assert job["workflow"]["ref"]["inputs"] == {"image": name_of(BLUE)}
    assert job["workflow"]["ipa"]["inputs"]["weight"] == 0.8  # the workflow's own
    with pytest.raises(WorkflowNeedsReference):
        backend.generate(ask(backend, references=()))
    assert len(fake.inputs()) == 1


def test_comfyui_worker_workflow_without_the_placeholder_cannot_condition(
    key: str, fakes: Fakes, backends: Backends, tmp_path: Path
) -> None:
    fake = fakes(worker="comfyui", ipadapter=True)
    backend = backends(fake, workflow=workflow_file(tmp_path, copy.deepcopy(USER_WORKFLOW)))

    result = backend.generate(ask(backend))
    assert result.identity == IdentityUse(
        False, reason="backend 'rp': the workflow has no {{reference_image}} placeholder"
    )
    assert "images" not in fake.inputs()[-1]
    with pytest.raises(IdentityUnavailable, match="reference_image"):
        backend.generate(ask(backend, required=True))
    assert backend.probe().lacking == frozenset({Capability.REFERENCE_IMAGE})


# -- the a1111 worker -----------------------------------------------------------------------


def test_a1111_worker_gets_reference_only_controlnet_units(
    key: str, fakes: Fakes, backends: Backends
) -> None:
    fake = fakes(worker="a1111", controlnet=True)
    backend = backends(fake)

    result = backend.generate(ask(backend, references=(RED, BLUE)))

    assert result.identity == IdentityUse(True, "controlnet reference_only")
    [job] = fake.inputs()
    units = job["alwayson_scripts"]["controlnet"]["args"]
    assert [base64.b64decode(unit["image"]) for unit in units] == [RED.png, BLUE.png]
    for unit in units:
        assert unit["enabled"] is True and unit["module"] == "reference_only"
        assert unit["model"] == "None" and unit["weight"] == 0.6
        assert unit["save_detected_map"] is False
    assert len(fake.a1111.controlnet_units[-1]) == 2  # the worker's WebUI applied both
    assert len(result.images) == 1  # no detected maps among the images
    probe = backend.probe()  # known from the job now
    assert probe.lacking == frozenset() and probe.identity_method == "controlnet reference_only"


def test_a1111_worker_without_controlnet_goes_without_or_refuses(
    key: str, fakes: Fakes, backends: Backends
) -> None:
    fake = fakes(worker="a1111")
    backend = backends(fake)

    with pytest.raises(IdentityUnavailable) as refused:
        backend.generate(ask(backend, required=True))
    assert "ControlNet" in refused.value.message and "sd-webui-controlnet" in (
        refused.value.hint or ""
    )
    assert len(fake.inputs()) == 1

    fresh = backends(fake)
    result = fresh.generate(ask(fresh))
    assert result.identity == IdentityUse(False, reason=NO_CONTROLNET)
    first, second = fake.inputs()[1:]
    assert "controlnet" in first["alwayson_scripts"] and "alwayson_scripts" not in second
    assert len(result.images) == 1
    assert fresh.probe().lacking == frozenset({Capability.REFERENCE_IMAGE})


def test_a1111_worker_no_conditioning_asked_sends_no_units(
    key: str, fakes: Fakes, backends: Backends
) -> None:
    fake = fakes(worker="a1111", controlnet=True)
    backend = backends(fake)

    assert backend.generate(ask(backend, strength=0.0)).identity is None
    assert "alwayson_scripts" not in fake.inputs()[-1]
    probe = backend.probe()
    assert probe.lacking is None and probe.identity_method is None  # not known yet
