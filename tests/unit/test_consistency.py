"""The consistency contract's rules, on the default route table."""

from __future__ import annotations

import pytest

from charforge.config import Settings
from charforge.domain.consistency import StoredLook, resolve, verify_checkpoint_ran
from charforge.domain.routes import RouteTable, build_route_table
from charforge.errors import CheckpointDrift, StyleMismatch, WrongCheckpoint


@pytest.fixture
def table() -> RouteTable:
    return build_route_table(Settings())


def look(style: str | None, model: str | None, model_hash: str | None = None) -> StoredLook:
    return StoredLook("Sakura", style, model, model_hash)


@pytest.mark.parametrize(
    ("style", "checkpoint", "backend"),
    [
        ("anime", "diving.safetensors", "anime-cartoon-fantasy"),
        ("cartoon", "diving.safetensors", "anime-cartoon-fantasy"),
        ("fantasy", "diving.safetensors", "anime-cartoon-fantasy"),
        ("realistic", "cyberrealistic.safetensors", "realistic"),
    ],
)
def test_default_routes_follow_the_original_system(
    table: RouteTable, style: str, checkpoint: str, backend: str
) -> None:
    result = resolve(look(style, None), None, None, table)
    assert (result.style, result.checkpoint, result.route.backends) == (
        style,
        checkpoint,
        (backend,),
    )


def test_stored_model_wins_over_the_route(table: RouteTable) -> None:
    result = resolve(look("anime", "my-finetune.safetensors"), None, None, table)
    assert result.checkpoint == "my-finetune.safetensors"
    assert result.route.style == "anime"
    assert not result.write_back_model and not result.write_back_style


def test_older_character_without_style_falls_back_to_anime_and_is_written_back(
    table: RouteTable,
) -> None:
    result = resolve(look(None, None), None, None, table)
    assert (result.style, result.checkpoint) == ("anime", "diving.safetensors")
    assert result.write_back_style and result.write_back_model


def test_older_character_takes_the_request_style(table: RouteTable) -> None:
    result = resolve(look(None, None), "realistic", None, table)
    assert (result.style, result.checkpoint) == ("realistic", "cyberrealistic.safetensors")


def test_older_character_with_only_a_request_model_uses_that_models_route(
    table: RouteTable,
) -> None:
    result = resolve(look(None, None), None, "cyberrealistic.safetensors", table)
    assert (result.style, result.checkpoint) == ("realistic", "cyberrealistic.safetensors")


def test_request_repeating_the_character_is_fine(table: RouteTable) -> None:
    result = resolve(look("anime", "diving.safetensors"), "anime", "diving.safetensors", table)
    assert result.checkpoint == "diving.safetensors"
    # A title with the hash suffix names the same file.
    resolve(look("anime", "diving.safetensors"), None, "diving.safetensors [a1b2c3d4e5]", table)


@pytest.mark.parametrize(
    ("requested_style", "requested_model", "field"),
    [("realistic", None, "artStyle"), (None, "cyberrealistic.safetensors", "model")],
)
def test_contradicting_request_is_a_style_mismatch(
    table: RouteTable, requested_style: str | None, requested_model: str | None, field: str
) -> None:
    with pytest.raises(StyleMismatch) as caught:
        resolve(look("anime", "diving.safetensors"), requested_style, requested_model, table)
    assert caught.value.field == field
    assert "anime" in caught.value.message and "diving.safetensors" in caught.value.message
    assert "styleTransfer" in (caught.value.hint or "")


def test_model_contradicting_the_style_route_is_a_mismatch(table: RouteTable) -> None:
    with pytest.raises(StyleMismatch):
        resolve(look("realistic", None), None, "diving.safetensors", table)


@pytest.mark.parametrize("reported", ["diving", "anime_diving"])
def test_verify_accepts_the_model_that_was_asked_for(reported: str) -> None:
    # A1111 reports the base name without folder; some report the model_name with it.
    verify_checkpoint_ran(
        expected="anime/diving.safetensors",
        expected_hash="a1b2c3d4e5",
        reported=reported,
        reported_hash="a1b2c3d4e5",
        backend="b",
    )


def test_verify_refuses_another_model() -> None:
    with pytest.raises(WrongCheckpoint, match="ran checkpoint 'other' instead of 'diving"):
        verify_checkpoint_ran(
            expected="diving.safetensors",
            expected_hash=None,
            reported="other",
            reported_hash=None,
            backend="b",
        )


def test_verify_refuses_an_unreported_model() -> None:
    with pytest.raises(WrongCheckpoint):
        verify_checkpoint_ran(
            expected="diving.safetensors",
            expected_hash=None,
            reported=None,
            reported_hash=None,
            backend="b",
        )


def test_verify_catches_drift_of_the_same_file_name() -> None:
    with pytest.raises(CheckpointDrift):
        verify_checkpoint_ran(
            expected="diving.safetensors",
            expected_hash="a1b2c3d4e5",
            reported="diving",
            reported_hash="ffffffffff",
            backend="b",
        )
    # a short hash matches the full sha256 it was cut from
    verify_checkpoint_ran(
        expected="diving.safetensors",
        expected_hash="a1b2c3d4e5" + "0" * 54,
        reported="diving",
        reported_hash="A1B2C3D4E5",
        backend="b",
    )
