"""Pure parts of prompt templates and the advanced settings: slots and braces, what A1111 and
ComfyUI are sent, the infotext, clip skip fitted to a route, and jobs stored before."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from charforge.backends.a1111.wire import txt2img_payload
from charforge.backends.base import BackendRequest, CheckpointInfo
from charforge.backends.comfyui.graph import build_graph
from charforge.config import BackendConfig, GenerationDefaults, RouteConfig, Settings
from charforge.domain.infotext import build_infotext, parse_infotext
from charforge.domain.params import GenerateBody, GenerationParams, apply_defaults
from charforge.domain.requirements import fit_to_route
from charforge.domain.routes import build_route_table
from charforge.domain.samplers import canonical_upscaler
from charforge.domain.templates import BUILTINS, Piece, parse, render, slots_of
from charforge.errors import InvalidInput, UnsupportedCapability


def test_slots_and_literal_braces() -> None:
    pieces = parse("{character} in {outfit}, {{glow}} and {{ {mood} }}")
    assert slots_of(pieces) == ["character", "outfit", "mood"]
    assert pieces[0] == Piece(slot="character")
    text = render(pieces, {"character": "Sakura", "outfit": "a dress", "mood": "calm"})
    assert text == "Sakura in a dress, {glow} and { calm }"
    # A blank value leaves no empty comma behind.
    assert render(parse("{character}, {appearance}, at sea"), {"character": "A"}) == "A, at sea"


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ("{outfit", "opens no slot"),
        ("outfit}", "closes no slot"),
        ("{{outfit}", "closes no slot"),
        ("{Outfit}", "not a slot name"),
        ("{9lives}", "not a slot name"),
        ("{" + "a" * 33 + "}", "not a slot name"),
        ("{a{b}", "opens no slot"),
        ("{}", "not a slot name"),
    ],
)
def test_stray_braces_are_refused_naming_where(text: str, words: str) -> None:
    with pytest.raises(InvalidInput) as caught:
        parse(text, field="prompt")
    assert caught.value.field == "prompt"
    assert words in caught.value.message
    assert "{{" in (caught.value.hint or "")


def test_the_builtin_templates_are_the_originals_three_examples() -> None:
    assert [t.id for t in BUILTINS] == [
        "builtin-outfit-change",
        "builtin-new-environment",
        "builtin-action-scene",
    ]
    for template in BUILTINS:
        assert template.builtin and "character" in template.slots
        GenerateBody.model_validate({"characterId": "c", "prompt": "x", **template.params})


def _params(**changes: object) -> GenerationParams:
    body = GenerateBody(prompt="x", character_id="c", **changes)  # type: ignore[arg-type]
    return apply_defaults(body, GenerationDefaults(), "Sakura", "blurry")


def test_the_advanced_fields_take_their_defaults_and_the_upscalers_spelling() -> None:
    default = _params()
    assert (default.hires_scale, default.hires_steps, default.clip_skip) == (1.5, 0, 1)
    assert (default.denoising_strength, default.hires_upscaler) == (0.5, "Latent")
    asked = _params(hires_scale=2, hires_steps=9, clip_skip=2, hires_upscaler="latent (BICUBIC)")
    assert (asked.hires_scale, asked.hires_steps, asked.clip_skip) == (2, 9, 2)
    assert asked.hires_upscaler == "Latent (bicubic)"
    assert canonical_upscaler("4x-UltraSharp") == "4x-UltraSharp"  # a WebUI's own model


def test_jobs_stored_before_these_fields_still_load() -> None:
    stored = _params().to_json()
    del stored["hires_steps"], stored["clip_skip"]
    old = GenerationParams.from_json(stored)
    assert (old.hires_steps, old.clip_skip) == (0, 1)


def _request(params: GenerationParams) -> BackendRequest:
    checkpoint = CheckpointInfo("diving.safetensors", "diving.safetensors [0123456789]", None)
    return BackendRequest("anime", checkpoint, params)


def test_a1111_gets_its_own_field_names() -> None:
    params = _params(hires=True, hires_scale=2, hires_steps=7, denoising_strength=0.3, clip_skip=2)
    payload = txt2img_payload(_request(params))
    assert (payload["hr_scale"], payload["hr_second_pass_steps"]) == (2, 7)
    assert (payload["denoising_strength"], payload["hr_upscaler"]) == (0.3, "Latent")
    assert payload["override_settings"] == {
        "sd_model_checkpoint": "diving.safetensors [0123456789]",
        "CLIP_stop_at_last_layers": 2,
    }


def test_comfyui_gets_a_clip_set_last_layer_and_the_second_pass_steps() -> None:
    plain = build_graph(_params(hires=False), "diving.safetensors", 1)
    assert not any(n["class_type"] == "CLIPSetLastLayer" for n in plain.values())
    graph = build_graph(_params(hires=True, clip_skip=2, hires_steps=6), "diving.safetensors", 1)
    skip = next(n for n in graph.values() if n["class_type"] == "CLIPSetLastLayer")
    assert skip["inputs"]["stop_at_clip_layer"] == -2
    assert graph["6"]["inputs"]["clip"] == ["14", 0] and graph["7"]["inputs"]["clip"] == ["14", 0]
    assert (graph["3"]["inputs"]["steps"], graph["11"]["inputs"]["steps"]) == (25, 6)
    same = build_graph(_params(hires=True), "diving.safetensors", 1)
    assert same["11"]["inputs"]["steps"] == 25  # 0: as many as the first pass


def _infotext(**changes: object) -> dict[str, str]:
    values: dict[str, object] = {
        "prompt": "p",
        "negative_prompt": "",
        "steps": 20,
        "sampler": "Euler",
        "scheduler": "Karras",
        "cfg_scale": 7,
        "seed": 1,
        "width": 512,
        "height": 512,
        "model": "diving",
        "model_hash": None,
        "hires": True,
        "hires_scale": 2.0,
        "hires_upscaler": "Latent",
        "denoising_strength": 0.45,
        **changes,
    }
    return parse_infotext(build_infotext(**values))  # type: ignore[arg-type]


def test_the_infotext_writes_them_as_a1111_does() -> None:
    fields = _infotext(hires_steps=15, clip_skip=2)
    assert fields["Hires steps"] == "15" and fields["Clip skip"] == "2"
    assert fields["Hires upscale"] == "2" and fields["Denoising strength"] == "0.45"
    keys = list(fields)
    assert keys.index("Denoising strength") < keys.index("Clip skip") < keys.index("Hires upscale")
    assert keys.index("Hires upscale") < keys.index("Hires steps") < keys.index("Hires upscaler")
    plain = _infotext(hires_steps=0, clip_skip=1)
    assert "Hires steps" not in plain and "Clip skip" not in plain  # A1111 leaves them out
    assert "Clip skip" in _infotext(hires=False, clip_skip=3)


def test_clip_skip_on_a_route_that_cannot(tmp_path: Path) -> None:
    workflow = tmp_path / "workflow.json"
    workflow.write_text("{}")
    table = build_route_table(
        Settings(
            backends={"comfy": BackendConfig(kind="comfyui", url="http://h:1", workflow=workflow)},
            routes={"anime": RouteConfig(backends=["comfy"])},
        )
    )
    route = table.route("anime")
    params = replace(_params(hires=False), clip_skip=2)
    # A default is dropped; asked for, it is a 422 naming clipSkip and the backend.
    assert fit_to_route(params, hires_asked=False, route=route, table=table).clip_skip == 1
    with pytest.raises(UnsupportedCapability) as caught:
        fit_to_route(params, hires_asked=False, route=route, table=table, clip_skip_asked=True)
    assert caught.value.field == "clipSkip" and "'comfy'" in caught.value.message
    assert "clipSkip=1" in (caught.value.hint or "")
