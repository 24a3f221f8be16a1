"""Every sampler and scheduler spelling A1111 accepts, recorded as the canonical name."""

from __future__ import annotations

import pytest

from charforge.config import GenerationDefaults
from charforge.domain.params import GenerateBody, apply_defaults
from charforge.domain.samplers import BUILT_IN, NameBook, resolve
from charforge.errors import InvalidInput


@pytest.mark.parametrize(
    ("sampler", "scheduler", "expected"),
    [
        ("DPM++ 2M", "Karras", ("DPM++ 2M", "Karras")),
        ("k_dpmpp_2m", "karras", ("DPM++ 2M", "Karras")),
        ("euler a", None, ("Euler a", None)),
        ("K_EULER", "sgmuniform", ("Euler", "SGM Uniform")),
        ("DPM++ 2M Karras", None, ("DPM++ 2M", "Karras")),
        ("dpm++ 2m sde exponential", None, ("DPM++ 2M SDE", "Exponential")),
        ("DPM++ 2M Karras", "karras", ("DPM++ 2M", "Karras")),  # the same schedule twice
        ("Euler a SGM Uniform", None, ("Euler a", "SGM Uniform")),
    ],
)
def test_spellings_resolve_to_the_canonical_names(
    sampler: str, scheduler: str | None, expected: tuple[str, str | None]
) -> None:
    assert resolve(BUILT_IN, sampler, scheduler, strict=True) == expected


def test_a_combined_name_and_another_scheduler_is_refused() -> None:
    with pytest.raises(InvalidInput) as refused:
        resolve(BUILT_IN, "DPM++ 2M Karras", "Exponential", strict=True)
    assert refused.value.field == "scheduler"
    assert "Karras" in refused.value.message and "Exponential" in refused.value.message


def test_unknown_names_pass_through_unless_strict() -> None:
    assert resolve(BUILT_IN, "res_multistep", "bong", strict=False) == ("res_multistep", "bong")
    with pytest.raises(InvalidInput) as unknown:
        resolve(BUILT_IN, "Nope", None, strict=True, where="backend 'gpu'")
    assert unknown.value.field == "sampler" and "backend 'gpu'" in unknown.value.message
    assert "DPM++ 2M" in unknown.value.message  # the known ones are listed


def test_a_webui_without_a_scheduler_list_keeps_the_scheduler_as_sent() -> None:
    old = NameBook.of([("Euler a", ["k_euler_a"])], None)
    assert resolve(old, "k_euler_a", "Karras", strict=True) == ("Euler a", "Karras")


def test_a_request_records_the_canonical_names() -> None:
    defaults = GenerationDefaults()

    def params(**body: object) -> tuple[str, str]:
        generated = apply_defaults(
            GenerateBody(prompt="x", characterId="c", **body), defaults, "x", ""
        )
        return generated.sampler, generated.scheduler

    assert params(sampler="DPM++ 2M Karras") == ("DPM++ 2M", "Karras")
    assert params(sampler="k_euler_a", scheduler="exponential") == ("Euler a", "Exponential")
    assert params() == ("DPM++ 2M", "Karras")  # the defaults
    assert params(sampler="euler") == ("Euler", "Karras")  # the default schedule
