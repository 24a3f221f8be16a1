"""ComfyUI identity conditioning over real HTTP against the fake ComfyUI: references uploaded
by content hash, IPAdapter nodes wired into the samplers, a user's {{reference_image}}, and a
server without the nodes (default: without, and why; required: refused)."""

from __future__ import annotations

import copy
import hashlib
import io
import json
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from PIL import Image, ImageStat

from charforge.backends.base import BackendRequest, IdentityUse, ReferenceImage
from charforge.backends.comfyui import ComfyUIBackend
from charforge.backends.comfyui.identity import WorkflowNeedsReference
from charforge.domain.capabilities import Capability, capabilities_for
from charforge.errors import IdentityUnavailable
from tests.backends.test_comfyui import DIVING, params, spec_for
from tests.fakes.comfyui import USER_WORKFLOW, FakeComfyUI

FACE = "comfyui ipadapter (PLUS FACE (portraits))"
PLAIN = "comfyui ipadapter (PLUS (high strength))"


def picture(color: str, size: tuple[int, int] = (96, 128)) -> ReferenceImage:
    out = io.BytesIO()
    Image.new("RGB", size, color).save(out, format="PNG")
    data = out.getvalue()
    return ReferenceImage(hashlib.sha256(data).hexdigest(), data)


RED, BLUE = picture("red"), picture("blue", (128, 96))


def name_of(reference: ReferenceImage) -> str:
    return f"charforge-{reference.sha256[:16]}.png"


def ask(
    style: str = "realistic",
    references: tuple[ReferenceImage, ...] = (RED,),
    *,
    strength: float = 0.6,
    required: bool = False,
    **changes: Any,
) -> BackendRequest:
    p = replace(params(**changes), identity_strength=strength, identity_required=required)
    return BackendRequest(style, DIVING, p, 1, task_id="t-1", references=references)


@pytest.fixture
def fake() -> Iterator[FakeComfyUI]:
    server = FakeComfyUI(ipadapter=True).start()
    yield server
    server.stop()


@pytest.fixture
def bare() -> Iterator[FakeComfyUI]:
    """A ComfyUI without ComfyUI_IPAdapter_plus."""
    server = FakeComfyUI().start()
    yield server
    server.stop()


@pytest.fixture
def made() -> Iterator[list[ComfyUIBackend]]:
    backends: list[ComfyUIBackend] = []
    yield backends
    for backend in backends:
        backend.close()


def backend_for(made: list[ComfyUIBackend], fake: FakeComfyUI, **changes: Any) -> ComfyUIBackend:
    made.append(ComfyUIBackend(spec_for(fake.url, **changes), probe_timeout=2.0))
    return made[-1]


def last_graph(fake: FakeComfyUI) -> dict[str, Any]:
    graph: dict[str, Any] = fake.posted("/prompt")[-1]["prompt"]
    return graph


def nodes(graph: dict[str, Any], class_type: str) -> dict[str, dict[str, Any]]:
    return {key: node for key, node in graph.items() if node["class_type"] == class_type}


def redness(data: bytes) -> float:
    with Image.open(io.BytesIO(data)) as png:
        red, green, blue = ImageStat.Stat(png.convert("RGB")).mean
    return red - (green + blue) / 2


# -- charforge's own graph ------------------------------------------------------------------


def test_references_are_uploaded_by_content_hash_and_feed_both_sampling_passes(
    fake: FakeComfyUI, made: list[ComfyUIBackend]
) -> None:
    backend = backend_for(made, fake)

    result = backend.generate(ask(references=(RED, BLUE), hires=True))

    assert result.identity == IdentityUse(True, FACE)
    assert [u.name for u in fake.uploads] == [name_of(RED), name_of(BLUE)]
    assert all(u.overwrite and u.type == "input" and u.subfolder == "" for u in fake.uploads)
    assert fake.input_file(name_of(RED)) == RED.png and fake.input_file(name_of(BLUE)) == BLUE.png
    graph = last_graph(fake)
    [(loader_id, loader)] = nodes(graph, "IPAdapterUnifiedLoader").items()
    assert loader["inputs"] == {"model": ["4", 0], "preset": "PLUS FACE (portraits)"}
    loads = nodes(graph, "LoadImage")
    assert sorted(node["inputs"]["image"] for node in loads.values()) == sorted(
        [name_of(RED), name_of(BLUE)]
    )
    # The chain from the samplers back to the loader: one adapter per reference, weights
    # adding up to the strength, each on its own picture.
    samplers = nodes(graph, "KSampler")
    assert len(samplers) == 2  # the hires pass samples with the same conditioned model
    ends = {json.dumps(node["inputs"]["model"]) for node in samplers.values()}
    assert len(ends) == 1
    link, pictures, weights = json.loads(ends.pop()), [], []
    while graph[link[0]]["class_type"] == "IPAdapterAdvanced":
        inputs = graph[link[0]]["inputs"]
        assert inputs["ipadapter"] == [loader_id, 1]
        assert (inputs["weight_type"], inputs["start_at"], inputs["end_at"]) == ("linear", 0, 1)
        pictures.append(loads[inputs["image"][0]]["inputs"]["image"])
        weights.append(inputs["weight"])
        link = inputs["model"]
    assert link == [loader_id, 0]
    assert sorted(pictures) == sorted([name_of(RED), name_of(BLUE)])
    assert weights == pytest.approx([0.3, 0.3])


def test_a_second_job_uploads_nothing_and_a_file_comfyui_lost_is_uploaded_again(
    fake: FakeComfyUI, made: list[ComfyUIBackend]
) -> None:
    backend = backend_for(made, fake)
    backend.generate(ask(hires=False))
    backend.generate(ask(hires=False, seed=99))
    assert len(fake.uploads) == 1  # remembered, and still in LoadImage's list

    # Someone cleans ComfyUI's input folder: ComfyUI refuses the prompt ("Invalid image
    # file"), and the reference goes up again before the same graph is queued again.
    fake.folders.files.clear()
    result = backend.generate(ask(hires=False, seed=7))

    assert result.identity == IdentityUse(True, FACE)
    assert [u.name for u in fake.uploads] == [name_of(RED)] * 2
    assert fake.input_file(name_of(RED)) == RED.png
    graphs = [body["prompt"] for body in fake.posted("/prompt")]
    assert len(graphs) == 4 and graphs[2] == graphs[3]  # refused, then queued as it was


def test_drawn_styles_use_the_plus_preset_on_the_model_after_the_loras(
    fake: FakeComfyUI, made: list[ComfyUIBackend]
) -> None:
    backend = backend_for(made, fake)

    result = backend.generate(ask("anime", prompt="Sakura <lora:detail:0.7>", hires=False))

    assert result.identity == IdentityUse(True, PLAIN)
    [loader] = nodes(last_graph(fake), "IPAdapterUnifiedLoader").values()
    assert loader["inputs"] == {"model": ["lora1", 0], "preset": "PLUS (high strength)"}
    [adapter] = nodes(last_graph(fake), "IPAdapterAdvanced").values()
    assert adapter["inputs"]["weight"] == pytest.approx(0.6)


def test_the_reference_shows_in_the_picture(fake: FakeComfyUI, made: list[ComfyUIBackend]) -> None:
    backend = backend_for(made, fake)
    plain = backend.generate(ask(references=(), hires=False))
    conditioned = backend.generate(ask(hires=False))

    assert plain.identity is None
    assert redness(conditioned.images[0].data) > redness(plain.images[0].data) + 10


def test_no_conditioning_asked_sends_no_nodes_and_no_files(
    fake: FakeComfyUI, made: list[ComfyUIBackend]
) -> None:
    backend = backend_for(made, fake)

    for request in (ask(references=()), ask(strength=0.0)):
        result = backend.generate(request)
        assert result.identity is None
        graph = last_graph(fake)
        assert not nodes(graph, "LoadImage") and not nodes(graph, "IPAdapterAdvanced")
    assert fake.uploads == []


def test_probe_reports_the_ipadapter_nodes(
    fake: FakeComfyUI, bare: FakeComfyUI, made: list[ComfyUIBackend]
) -> None:
    found = backend_for(made, fake).probe()
    assert found.ok and found.lacking == frozenset() and found.identity_method == FACE

    missing = backend_for(made, bare).probe()
    assert missing.ok and missing.lacking == frozenset({Capability.REFERENCE_IMAGE})
    assert missing.identity_method is None


# -- a ComfyUI without the nodes ------------------------------------------------------------


def test_without_the_nodes_a_default_request_runs_without_and_says_why(
    bare: FakeComfyUI, made: list[ComfyUIBackend]
) -> None:
    backend = backend_for(made, bare)

    result = backend.generate(ask(hires=False))

    assert result.identity is not None and result.identity.applied is False
    assert result.identity.reason == (
        "backend 'comfy': ComfyUI has no IPAdapterUnifiedLoader, IPAdapterAdvanced node "
        "(ComfyUI_IPAdapter_plus)"
    )
    assert len(result.images) == 1 and bare.uploads == []
    assert not nodes(last_graph(bare), "LoadImage")


def test_without_the_nodes_a_required_request_is_refused_before_anything_is_sent(
    bare: FakeComfyUI, made: list[ComfyUIBackend]
) -> None:
    backend = backend_for(made, bare)

    with pytest.raises(IdentityUnavailable) as refused:
        backend.generate(ask(required=True))

    assert refused.value.backend_specific and refused.value.status == 422
    assert "Backend 'comfy' cannot condition on reference images" in refused.value.message
    assert "ComfyUI_IPAdapter_plus" in (refused.value.hint or "")
    assert refused.value.extra == {"capability": "reference_image", "backends": ["comfy"]}
    assert bare.posted("/prompt") == [] and bare.uploads == []


@pytest.mark.parametrize("required", [False, True])
def test_nodes_removed_since_they_were_listed(
    fake: FakeComfyUI, made: list[ComfyUIBackend], required: bool
) -> None:
    backend = backend_for(made, fake)
    assert backend.probe().identity_method == FACE  # listed (and cached) here
    fake.ipadapter = False  # the node pack is removed; ComfyUI restarted

    if required:
        with pytest.raises(IdentityUnavailable, match="IPAdapter"):
            backend.generate(ask(hires=False, required=True))
        assert len(fake.posted("/prompt")) == 1  # refused by ComfyUI, not sent again
        return
    result = backend.generate(ask(hires=False))
    assert result.identity is not None and not result.identity.applied
    assert "ComfyUI_IPAdapter_plus" in (result.identity.reason or "")
    first, second = (body["prompt"] for body in fake.posted("/prompt"))
    assert nodes(first, "IPAdapterUnifiedLoader") and not nodes(second, "IPAdapterUnifiedLoader")
    assert backend.probe().lacking == frozenset({Capability.REFERENCE_IMAGE})


# -- a user's own workflow ------------------------------------------------------------------


def reference_workflow() -> dict[str, Any]:
    """USER_WORKFLOW with an IPAdapter on its model, fed by {{reference_image}}."""
    graph = copy.deepcopy(USER_WORKFLOW)
    graph["ref"] = {"class_type": "LoadImage", "inputs": {"image": "{{reference_image}}"}}
    graph["ipa_loader"] = {
        "class_type": "IPAdapterUnifiedLoader",
        "inputs": {"model": ["ckpt", 0], "preset": "STANDARD (medium strength)"},
    }
    graph["ipa"] = {
        "class_type": "IPAdapterAdvanced",
        "inputs": {
            "model": ["ipa_loader", 0],
            "ipadapter": ["ipa_loader", 1],
            "image": ["ref", 0],
            "weight": 0.8,
            "weight_type": "style transfer",
            "combine_embeds": "concat",
            "start_at": 0.0,
            "end_at": 0.9,
            "embeds_scaling": "K+V",
        },
    }
    graph["sample"]["inputs"]["model"] = ["ipa", 0]
    return graph


def workflow_backend(
    made: list[ComfyUIBackend], fake: FakeComfyUI, tmp_path: Path, workflow: dict[str, Any]
) -> ComfyUIBackend:
    path = tmp_path / "workflow.json"
    path.write_text(json.dumps(workflow), encoding="utf-8")
    caps = capabilities_for("comfyui", custom_workflow=True)
    return backend_for(made, fake, workflow=path, capabilities=caps)


def test_a_workflow_placeholder_gets_the_first_reference(
    fake: FakeComfyUI, made: list[ComfyUIBackend], tmp_path: Path
) -> None:
    backend = workflow_backend(made, fake, tmp_path, reference_workflow())

    result = backend.generate(ask(references=(BLUE, RED), hires=False))

    assert result.identity == IdentityUse(True, "comfyui workflow ({{reference_image}})")
    assert [u.name for u in fake.uploads] == [name_of(BLUE)]  # the only one it uses
    graph = last_graph(fake)
    assert graph["ref"]["inputs"] == {"image": name_of(BLUE)}
    assert graph["ipa"]["inputs"]["weight"] == 0.8  # the workflow's own settings stay
    assert not nodes(graph, "IPAdapterUnifiedLoader").keys() - {"ipa_loader"}
    probe = backend.probe()
    assert probe.lacking == frozenset() and probe.identity_method == result.identity.method

    with pytest.raises(WorkflowNeedsReference) as nothing:  # nothing to put there
        backend.generate(ask(references=(), hires=False))
    assert nothing.value.backend_specific and "{{reference_image}}" in nothing.value.message


def test_a_workflow_without_the_placeholder_cannot_condition(
    fake: FakeComfyUI, made: list[ComfyUIBackend], tmp_path: Path
) -> None:
    backend = workflow_backend(made, fake, tmp_path, USER_WORKFLOW)

    result = backend.generate(ask(hires=False))
    assert result.identity == IdentityUse(
        False, reason="backend 'comfy': the workflow has no {{reference_image}} placeholder"
    )
    assert fake.uploads == [] and not nodes(last_graph(fake), "LoadImage")

    with pytest.raises(IdentityUnavailable) as refused:
        backend.generate(ask(hires=False, required=True))
    assert "{{reference_image}}" in refused.value.message
    assert "{{reference_image}}" in (refused.value.hint or "")
    assert backend.probe().lacking == frozenset({Capability.REFERENCE_IMAGE})
