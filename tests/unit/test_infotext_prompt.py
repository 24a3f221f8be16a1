"""A1111 infotext out and back in; prompt composition; checkpoint names."""

from __future__ import annotations

import pytest

from charforge.domain.checkpoints import file_stem, model_name, same_checkpoint, strip_hash
from charforge.domain.infotext import build_infotext, parse_infotext
from charforge.domain.prompt import compose_negative, compose_prompt


def _infotext(**overrides: object) -> str:
    values: dict[str, object] = {
        "prompt": "Sakura in a red evening dress, ballroom",
        "negative_prompt": "blurry, lowres",
        "steps": 25,
        "sampler": "DPM++ 2M",
        "scheduler": "Karras",
        "cfg_scale": 8.0,
        "seed": 4242,
        "width": 512,
        "height": 768,
        "model": "diving",
        "model_hash": "a1b2c3d4e5",
        "hires": True,
        "hires_scale": 1.5,
        "hires_upscaler": "Latent",
        "denoising_strength": 0.5,
    }
    values.update(overrides)
    return build_infotext(**values)  # type: ignore[arg-type]


def test_infotext_has_a1111_layout() -> None:
    text = _infotext()
    lines = text.split("\n")
    assert lines[0] == "Sakura in a red evening dress, ballroom"
    assert lines[1] == "Negative prompt: blurry, lowres"
    assert lines[2].startswith(
        "Steps: 25, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 8, Seed: 4242, Size: 512x768, Model hash: a1b2c3d4e5, Model: diving"
    )
    assert "Hires upscale: 1.5" in lines[2]


def test_infotext_round_trips_including_quoted_values() -> None:
    text = _infotext(prompt="a\nb", extra={"Character": "Eldara, the wise: elf"})
    parsed = parse_infotext(text)
    assert parsed["Prompt"] == "a\nb"
    assert parsed["Negative prompt"] == "blurry, lowres"
    assert parsed["Seed"] == "4242"
    assert parsed["Size"] == "512x768"
    assert parsed["Model"] == "diving"
    assert parsed["Character"] == "Eldara, the wise: elf"


def test_infotext_without_negative_or_hires() -> None:
    parsed = parse_infotext(_infotext(negative_prompt="", hires=False, model_hash=None))
    assert parsed["Negative prompt"] == ""
    assert "Hires upscale" not in parsed and "Model hash" not in parsed


def test_compose_prompt_carries_the_look() -> None:
    assert compose_prompt("Sakura at a ballroom", "pink hair, green eyes") == (
        "Sakura at a ballroom, pink hair, green eyes"
    )
    assert compose_prompt("Sakura, pink hair, green eyes", "pink hair, green eyes") == (
        "Sakura, pink hair, green eyes"
    )
    assert compose_prompt("x", "") == "x"


def test_negative_prompt_is_sfw_unless_nsfw() -> None:
    assert compose_negative("blurry", nsfw=False) == "blurry, nsfw, nude, explicit"
    assert compose_negative("", nsfw=False) == "nsfw, nude, explicit"
    assert compose_negative("blurry", nsfw=True) == "blurry"


@pytest.mark.parametrize(
    ("title", "stripped", "name"),
    [
        ("diving.safetensors [a1b2c3d4e5]", "diving.safetensors", "diving"),
        ("anime/diving.safetensors [a1b2c3d4]", "anime/diving.safetensors", "anime_diving"),
        ("v1-5-pruned.ckpt", "v1-5-pruned.ckpt", "v1-5-pruned"),
    ],
)
def test_checkpoint_names(title: str, stripped: str, name: str) -> None:
    assert strip_hash(title) == stripped
    assert model_name(title) == name
    assert same_checkpoint(title, stripped)


def test_file_stem_is_what_a1111_reports() -> None:
    assert file_stem("anime/diving.safetensors [a1b2c3d4e5]") == "diving"
    assert file_stem("sub\\dir\\x.ckpt") == "x"


def test_different_checkpoints_differ() -> None:
    assert not same_checkpoint("diving.safetensors", "cyberrealistic.safetensors")


def test_output_size_is_capped_with_a_clear_error() -> None:
    from charforge.config import GenerationDefaults
    from charforge.domain.params import GenerateBody, apply_defaults
    from charforge.errors import InvalidInput

    defaults = GenerationDefaults()
    big = GenerateBody(prompt="x", character_id="c", width=2048, height=2048)
    with pytest.raises(InvalidInput) as caught:
        apply_defaults(big, defaults, "x", "")
    assert caught.value.field == "hires" and "3072x3072" in caught.value.message
    flat = GenerateBody(prompt="x", character_id="c", width=2048, height=2048, hires=False)
    assert apply_defaults(flat, defaults, "x", "").width == 2048
    assert apply_defaults(GenerateBody(prompt="x", character_id="c"), defaults, "x", "").hires
