"""Backend kinds, their capabilities, and how a request is fitted to its route's backends."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from charforge.config import BackendConfig, GenerationDefaults, RouteConfig, Settings
from charforge.domain.capabilities import (
    Capability,
    capabilities_for,
    lora_tags,
    needed,
    strip_lora_tags,
)
from charforge.domain.params import GenerationParams
from charforge.domain.requirements import capable_backends, fit_to_route
from charforge.domain.routes import RouteTable, build_route_table
from charforge.errors import UnsupportedCapability

C = Capability


def test_each_kind_declares_what_it_can_do() -> None:
    a1111 = capabilities_for("a1111")
    assert {C.HIRES, C.LORA, C.PROGRESS, C.CANCEL, C.CHECKPOINT_LIST, C.CHECKPOINT_HASH} <= a1111
    assert C.CHECKPOINT_HASH not in capabilities_for("comfyui")
    assert C.HIRES in capabilities_for("comfyui")
    custom = capabilities_for("comfyui", custom_workflow=True)
    assert C.HIRES not in custom and C.LORA not in custom and C.PROGRESS in custom
    runpod_comfy = capabilities_for("runpod", worker="comfyui")
    assert C.CHECKPOINT_LIST not in runpod_comfy and C.CHECKPOINT_HASH not in runpod_comfy
    assert C.CHECKPOINT_HASH in capabilities_for("runpod", worker="a1111")
    assert C.LORA not in capabilities_for("local")
    # Reference images need an extension that a probe confirms; the local engine has none.
    assert C.REFERENCE_IMAGE in capabilities_for("a1111")
    assert C.REFERENCE_IMAGE in capabilities_for("runpod", worker="comfyui")
    assert C.REFERENCE_IMAGE not in capabilities_for("local")


def test_lora_tags_are_read_and_stripped() -> None:
    prompt = "Sakura, <lora:sakura_v2:0.7> red dress, <LORA:glow>"
    assert lora_tags(prompt) == [("sakura_v2", 0.7), ("glow", 1.0)]
    assert strip_lora_tags(prompt) == "Sakura, red dress"
    assert needed(hires=False, prompt=prompt) == {C.LORA}
    assert needed(hires=True, prompt="plain") == {C.HIRES}


def _params(*, hires: bool, prompt: str = "Sakura at a ballroom") -> GenerationParams:
    d = GenerationDefaults()
    return GenerationParams(
        prompt, "", 512, 768, 25, 8.0, -1, d.sampler, d.scheduler, hires, 1.5, "Latent", 0.5
    )


@pytest.fixture
def workflow(tmp_path: Path) -> Path:
    path = tmp_path / "workflow.json"
    path.write_text("{}")  # only its existence is checked when routes are built
    return path


def _table(workflow: Path, anime: list[str]) -> RouteTable:
    settings = Settings(
        backends={
            "comfy": BackendConfig(kind="comfyui", url="http://127.0.0.1:8188", workflow=workflow),
            "loc": BackendConfig(kind="local", models_dir=workflow.parent),
        },
        routes={"anime": RouteConfig(backends=anime)},
    )
    return build_route_table(settings)


def test_a_default_hires_pass_is_dropped_where_no_backend_has_one(workflow: Path) -> None:
    table = _table(workflow, ["comfy"])
    route = table.route("anime")
    fitted = fit_to_route(_params(hires=True), hires_asked=False, route=route, table=table)
    assert fitted.hires is False


def test_an_asked_for_capability_no_backend_has_is_a_422_naming_them(workflow: Path) -> None:
    table = _table(workflow, ["comfy"])
    route = table.route("anime")
    with pytest.raises(UnsupportedCapability) as caught:
        fit_to_route(_params(hires=True), hires_asked=True, route=route, table=table)
    error = caught.value
    assert error.status == 422 and error.code == "unsupported_capability"
    assert error.field == "hires"
    assert "'comfy' (comfyui (custom workflow))" in error.message
    assert "high-resolution" in error.message
    assert "hires=false" in (error.hint or "")

    table = _table(workflow, ["loc"])
    route = table.route("anime")
    with pytest.raises(UnsupportedCapability) as caught:
        fit_to_route(
            _params(hires=True, prompt="Sakura <lora:sakura:0.8>"),
            hires_asked=False,
            route=route,
            table=table,
        )
    assert caught.value.field == "prompt"
    assert "'loc' (local)" in caught.value.message and "LoRA" in caught.value.message


def test_a_mixed_pool_keeps_the_request_and_narrows_the_backends(workflow: Path) -> None:
    table = _table(workflow, ["comfy", "anime-cartoon-fantasy"])
    route = table.route("anime")
    fitted = fit_to_route(_params(hires=True), hires_asked=True, route=route, table=table)
    assert fitted.hires is True
    assert capable_backends(route, table, frozenset({C.HIRES})) == ("anime-cartoon-fantasy",)
    assert capable_backends(route, table, frozenset()) == ("comfy", "anime-cartoon-fantasy")


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"kind": "local", "url": "http://x"}, "url cannot be set for a backend of kind 'local'"),
        ({"kind": "runpod"}, "needs a url"),
        ({"kind": "a1111", "url": "http://x", "workflow": "w.json"}, "workflow cannot be set"),
        ({"kind": "runpod", "url": "https://x", "workflow": "w.json"}, 'worker = "comfyui"'),
        ({"kind": "comfyui", "url": "http://x", "api_key_env": "K"}, "api_key_env cannot be set"),
        ({"kind": "local", "timeout_seconds": 5}, "timeout_seconds cannot be set"),
    ],
)
def test_backend_keys_must_fit_their_kind(values: dict[str, str], message: str) -> None:
    with pytest.raises(ValidationError, match=message.replace("(", r"\(").replace(")", r"\)")):
        BackendConfig(**values)


def test_a_missing_workflow_file_is_named_when_routes_are_built(tmp_path: Path) -> None:
    settings = Settings(
        backends={"comfy": BackendConfig(kind="comfyui", url="http://h", workflow=tmp_path / "x")},
    )
    with pytest.raises(ValueError, match=r"\[backends.comfy\].*workflow file .*x does not exist"):
        build_route_table(settings)
