"""The face-identity scorer on real photographs (tests/photos.py): the same person through
mirroring, resizing, cropping and brightness stays >= 0.5, two different people stay < 0.5,
and it says None with a reason instead of guessing."""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest

from charforge.identity import scoring
from charforge.identity.scoring import (
    FACE_METHOD,
    INSTALL_HINT,
    NO_FACE_IN_IMAGE,
    NO_FACE_IN_REFERENCES,
    FaceScorer,
    NullScorer,
    Score,
    distance_to_score,
    load_scorer,
)
from tests.photos import astronaut_png, cat_png, kafka_png, on_canvas, transformed

PHOTOS: dict[str, Callable[[], bytes]] = {"astronaut": astronaut_png, "kafka": kafka_png}
# Each copy keeps the face whole. astronaut: 512x512, face near (179, 83)-(267, 171);
# kafka: 450x655, face near (192, 89)-(297, 193). Scales under 0.9 bring the face below the
# detector's 80 px, so they go through its second, upsampled look.
VARIANTS: dict[str, dict[str, Any]] = {
    "mirrored": {"mirror": True},
    "enlarged 1.5x": {"scale": 1.5},
    "shrunk 0.7x": {"scale": 0.7},
    "cropped to the head": {"crop": (120, 30, 360, 300)},
    "brightened 1.4x": {"brightness": 1.4},
    "darkened 0.6x": {"brightness": 0.6},
    "mirrored, shrunk 0.8x, brightened 1.2x": {"mirror": True, "scale": 0.8, "brightness": 1.2},
}


@pytest.fixture(scope="module")
def scorer() -> FaceScorer:
    return FaceScorer()


def scored(scorer: FaceScorer, label: str, references: list[bytes], image: bytes) -> Score:
    result = scorer.score(references, image)
    print(f"\n{label}: {result}")  # pytest -s shows every score
    return result


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("person", PHOTOS)
def test_same_person_scores_at_least_half(scorer: FaceScorer, person: str, variant: str) -> None:
    photo = PHOTOS[person]()
    result = scored(
        scorer, f"{person} vs {variant}", [photo], transformed(photo, **VARIANTS[variant])
    )
    assert result.method == FACE_METHOD and result.reason is None
    assert result.score is not None and result.score >= 0.5


@pytest.mark.parametrize("variant", ["as is", *VARIANTS])
@pytest.mark.parametrize(("reference", "image"), [("astronaut", "kafka"), ("kafka", "astronaut")])
def test_different_people_score_under_half(
    scorer: FaceScorer, reference: str, image: str, variant: str
) -> None:
    picture = PHOTOS[image]()
    if variant != "as is":
        picture = transformed(picture, **VARIANTS[variant])
    result = scored(scorer, f"{reference} vs {image} {variant}", [PHOTOS[reference]()], picture)
    assert result.method == FACE_METHOD
    assert result.score is not None and result.score < 0.5


def test_output_sized_jpeg_and_webp(scorer: FaceScorer) -> None:
    for fmt in ("JPEG", "WEBP"):
        same = scored(
            scorer,
            f"astronaut vs {fmt} 512x768",
            [astronaut_png()],
            on_canvas(astronaut_png(), 512, 768, fmt=fmt),
        )
        other = scored(
            scorer,
            f"kafka vs astronaut {fmt} 768x1152",
            [kafka_png()],
            on_canvas(astronaut_png(), 768, 1152, fmt=fmt),
        )
        assert same.score is not None and same.score >= 0.5
        assert other.score is not None and other.score < 0.5


def test_the_best_reference_wins(scorer: FaceScorer) -> None:
    image = transformed(astronaut_png(), mirror=True, scale=1.2)
    alone = scorer.score([astronaut_png()], image)
    wrong = scorer.score([kafka_png()], image)
    both = scorer.score([kafka_png(), astronaut_png()], image)
    reversed_order = scorer.score([astronaut_png(), kafka_png()], image)
    assert alone.score is not None and wrong.score is not None
    assert wrong.score < 0.5 <= alone.score
    assert both.score == reversed_order.score == alone.score


def test_no_face_in_the_image_is_none(scorer: FaceScorer) -> None:
    result = scorer.score([astronaut_png()], cat_png())
    assert result == Score(None, FACE_METHOD, NO_FACE_IN_IMAGE)


def test_no_face_in_any_reference_is_none(scorer: FaceScorer) -> None:
    result = scorer.score([cat_png(), cat_png()], astronaut_png())
    assert result == Score(None, FACE_METHOD, NO_FACE_IN_REFERENCES)
    assert "no face found in the reference" in NO_FACE_IN_REFERENCES


def test_a_reference_without_a_face_is_skipped_with_a_note(scorer: FaceScorer) -> None:
    result = scorer.score([cat_png(), astronaut_png()], transformed(astronaut_png(), mirror=True))
    assert result.score is not None and result.score >= 0.5
    assert result.reason == "1 of 2 references had no usable face"


@pytest.mark.parametrize(
    "garbage",
    [b"", b"not an image", astronaut_png()[:2000], b"GIF89a" + bytes(100)],
    ids=["empty", "text", "truncated png", "gif header"],
)
def test_undecodable_bytes_are_none_with_a_reason(scorer: FaceScorer, garbage: bytes) -> None:
    as_image = scorer.score([astronaut_png()], garbage)
    assert as_image.score is None and as_image.reason is not None
    assert as_image.reason.startswith("could not decode the image: ")
    as_reference = scorer.score([garbage], astronaut_png())
    assert as_reference.score is None and as_reference.reason is not None
    assert as_reference.reason.startswith("could not decode the references: ")
    # One good reference is enough; the bad one is noted.
    mixed = scorer.score([garbage, kafka_png()], transformed(kafka_png(), mirror=True))
    assert mixed.score is not None and mixed.score >= 0.5 and mixed.reason is not None


def test_images_over_the_pixel_bound_are_refused(
    scorer: FaceScorer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(scoring, "MAX_PIXELS", 512 * 512 - 1)
    result = scorer.score([kafka_png()], astronaut_png())  # kafka is 450x655 (294750 px)
    assert result.score is None and result.reason is not None
    assert "over the 262143 pixel bound" in result.reason


def test_reference_embeddings_are_cached(monkeypatch: pytest.MonkeyPatch) -> None:
    scorer = FaceScorer(cache_size=2)
    embedded: list[tuple[int, int]] = []
    real = scorer._face_embedding

    def counting(image: Any) -> Any:
        embedded.append(image.size)
        return real(image)

    monkeypatch.setattr(scorer, "_face_embedding", counting)
    references = [astronaut_png(), cat_png()]
    for scale in (1.0, 1.1, 1.2):
        scorer.score(references, transformed(astronaut_png(), scale=scale))
    # Two references embedded once (the faceless one's "no face" is cached too), three images.
    assert embedded == [(512, 512), (451, 300), (512, 512), (563, 563), (614, 614)]
    assert scorer.cache_info() == scoring.CacheInfo(hits=4, misses=2, size=2)
    # Bounded: a third reference evicts the least recently used (astronaut, then cat).
    scorer.score([kafka_png()], kafka_png())
    scorer.score([astronaut_png()], kafka_png())
    assert scorer.cache_info() == scoring.CacheInfo(hits=4, misses=4, size=2)


def test_concurrent_scoring_matches_serial(scorer: FaceScorer) -> None:
    jobs = [
        ([astronaut_png()], transformed(astronaut_png(), scale=1 + i / 10, mirror=i % 2 == 0))
        for i in range(4)
    ] + [([astronaut_png()], transformed(kafka_png(), scale=1 + i / 10)) for i in range(4)]
    fresh = FaceScorer()  # threads race on loading the models and filling the cache too
    with ThreadPoolExecutor(max_workers=4) as pool:
        parallel = list(pool.map(lambda job: fresh.score(*job), jobs))
    serial = [scorer.score(*job) for job in jobs]
    assert [r.score for r in parallel] == pytest.approx([r.score for r in serial], abs=1e-6)
    assert all(r.score is not None for r in parallel)


def test_load_scorer_gives_the_face_scorer_once() -> None:
    assert isinstance(load_scorer(), FaceScorer)
    assert load_scorer() is load_scorer()


def test_without_the_extra_every_answer_names_it(monkeypatch: pytest.MonkeyPatch) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "dlib" else real(name, *a)
    )
    fallback = load_scorer.__wrapped__()
    assert isinstance(fallback, NullScorer)
    result = fallback.score([astronaut_png()], astronaut_png())
    assert result.score is None and result.method == "none"
    assert result.reason is not None and INSTALL_HINT in result.reason and "dlib" in result.reason


def test_calibration_puts_dlibs_threshold_at_half() -> None:
    assert distance_to_score(0.6) == 0.5
    assert distance_to_score(0.0) == 1.0
    assert distance_to_score(1.5) == 0.0
    distances = [i / 20 for i in range(30)]
    scores = [distance_to_score(d) for d in distances]
    assert scores == sorted(scores, reverse=True)
