"""Does a generated image show the same person as a character's reference images?

The face scorer embeds the largest face of each image with dlib's 128-d face recognition
network (the `identity` extra: dlib-bin + face-recognition-models, weights shipped in the
wheel, nothing downloaded) and turns the euclidean distance between embeddings into a score
in [0, 1] where 0.5 is dlib's own same-person threshold. Without the extra, ``load_scorer``
returns a scorer that always answers "cannot say" and names the extra to install.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import io
import queue
import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple, Protocol

from PIL import Image, ImageOps

if TYPE_CHECKING:
    import numpy as np
    import numpy.typing as npt

    Embedding = npt.NDArray[np.float64]

INSTALL_HINT = "pip install 'charforge[identity]'"
FACE_METHOD = "face-embedding-dlib-128"
# dlib's documented same-person threshold on the distance between two 128-d embeddings
# (99.38% on LFW at this cut); the score maps it to exactly 0.5.
SAME_PERSON_DISTANCE = 0.6
# Refuse to decode more than this (about 7000 x 5700): bigger is not a generated image or a
# reference photo but a decompression bomb or a mistake, and costs hundreds of MB as RGB.
MAX_PIXELS = 40_000_000
# Faces are embedded from a 150x150 chip, so a working copy bounded to this side loses nothing
# and keeps memory and the landmark search small.
WORK_MAX_SIDE = 2048
# HOG detection time grows with pixels (measured, grey: 21 ms at 512x768, 50 ms at 768x1152,
# 84 ms at 1024x1536): detect on a copy bounded to this side and map the box back.
DETECT_MAX_SIDE = 1024
REFERENCE_CACHE_SIZE = 256
# Detections scoring under this (HOG's SVM margin), or under half the best one, are ignored.
MIN_CONFIDENCE = 0.3

NO_FACE_IN_REFERENCES = (
    "no face found in the reference images "
    "(drawn and anime faces are often not found by this detector)"
)
NO_FACE_IN_IMAGE = "no face found in the image"


@dataclass(frozen=True)
class Score:
    score: float | None  # 0..1, 0.5 is the method's same-person threshold; None: cannot say
    method: str  # e.g. "face-embedding-dlib-128"
    reason: str | None = None  # why score is None, or a note


class IdentityScorer(Protocol):
    method: str

    def score(self, references: Sequence[bytes], image: bytes) -> Score:
        """references and image are encoded image files (PNG/JPEG/WebP bytes)."""
        ...


class NullScorer:
    """Stands in when the identity extra is not installed: never guesses."""

    method = "none"

    def __init__(self, reason: str) -> None:
        self.reason = reason

    def score(self, references: Sequence[bytes], image: bytes) -> Score:
        return Score(None, self.method, self.reason)


def distance_to_score(distance: float) -> float:
    """Linear in the distance, clamped: 1 - d/1.2 puts d = 0.6 (dlib's threshold) at exactly
    0.5, keeps the order of distances, and reads plainly (same photo transformed scores about
    0.8-1, different people about 0.3). Distances past 1.2 are rare and all mean "not them"."""
    return min(1.0, max(0.0, 1.0 - distance / (2 * SAME_PERSON_DISTANCE)))


class UnreadableImage(Exception):
    """The bytes are not a PNG/JPEG/WebP image this scorer will decode."""


def decode_rgb(data: bytes) -> Image.Image:
    """Decode to an RGB image no larger than WORK_MAX_SIDE, upright per its EXIF orientation."""
    try:
        opened = Image.open(io.BytesIO(data), formats=["PNG", "JPEG", "WEBP"])
        # Checked on the header, before any pixel is decoded.
        if opened.width * opened.height > MAX_PIXELS:
            raise UnreadableImage(
                f"image is {opened.width}x{opened.height}, over the {MAX_PIXELS} pixel bound"
            )
        # A large JPEG decodes at 1/2..1/8 scale straight away (DCT scaling): cheaper.
        opened.draft("RGB", (WORK_MAX_SIDE, WORK_MAX_SIDE))
        image = ImageOps.exif_transpose(opened).convert("RGB")
    except UnreadableImage:
        raise
    except Exception as exc:  # Pillow raises many types on bad input (truncated, unknown, bomb)
        raise UnreadableImage(f"{type(exc).__name__}: {exc}") from exc
    if max(image.size) > WORK_MAX_SIDE:
        image.thumbnail((WORK_MAX_SIDE, WORK_MAX_SIDE), Image.Resampling.LANCZOS)
    return image


class CacheInfo(NamedTuple):
    hits: int
    misses: int
    size: int


class _Models(NamedTuple):
    shape_predictor: Any  # dlib.shape_predictor, 5-point (what the resnet's chips are aligned by)
    recognizer: Any  # dlib.face_recognition_model_v1


def _model_dir() -> Path:
    # Located without importing face_recognition_models: its __init__ imports pkg_resources,
    # which current setuptools no longer ships.
    spec = importlib.util.find_spec("face_recognition_models")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("face_recognition_models is not installed")
    return Path(next(iter(spec.submodule_search_locations))) / "models"


def _confident(faces: list[tuple[Any, float]]) -> list[tuple[Any, float]]:
    """Drop weak detections: the astronaut photo has a false positive on her suit (confidence
    0.01-0.22, and larger than her face), so "largest face" alone embedded a patch of suit and
    called her someone else. Her face and Kafka's measured 0.67-2.25 through all the tests'
    resizes, crops, mirrors and brightness changes."""
    if not faces:
        return []
    floor = max(MIN_CONFIDENCE, max(confidence for _, confidence in faces) / 2)
    return [face for face in faces if face[1] >= floor]


class FaceScorer:
    """Scores with dlib's HOG face detector and 128-d resnet face embedding.

    Thread-safe. Models load once, lazily, under a lock. dlib's object detector keeps its
    feature pyramid in the object while it runs, so each concurrent caller takes its own
    detector from a pool (detection releases the GIL: callers detect in parallel). The
    embedding network keeps its layer outputs in the object too, so landmarks and embedding
    run under one lock; that lock costs no parallelism, as the embedding holds the GIL for
    its whole ~80 ms anyway (measured: other Python threads stall that long). Reference
    embeddings are cached by the sha256 of their bytes.
    """

    method = FACE_METHOD

    def __init__(self, cache_size: int = REFERENCE_CACHE_SIZE) -> None:
        self._load_lock = threading.Lock()
        self._models: _Models | None = None
        self._embed_lock = threading.Lock()
        # Creating a frontal face detector costs about 250 ms: reuse them.
        self._detectors: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._cache_lock = threading.Lock()
        # sha256 -> embedding, or None for "no face in this reference" (also worth not redoing).
        self._cache: OrderedDict[str, Embedding | None] = OrderedDict()
        self._cache_size = cache_size
        self._hits = 0
        self._misses = 0

    def _load(self) -> _Models:
        with self._load_lock:
            if self._models is None:
                import dlib  # the optional identity extra

                models = _model_dir()
                self._models = _Models(
                    dlib.shape_predictor(str(models / "shape_predictor_5_face_landmarks.dat")),
                    dlib.face_recognition_model_v1(
                        str(models / "dlib_face_recognition_resnet_model_v1.dat")
                    ),
                )
            return self._models

    def _detect(self, grey: Any, upsample: int) -> list[tuple[Any, float]]:
        try:
            detector = self._detectors.get_nowait()
        except queue.Empty:
            import dlib

            detector = dlib.get_frontal_face_detector()
        try:
            boxes, confidences, _ = detector.run(grey, upsample, 0.0)
        finally:
            self._detectors.put(detector)
        return list(zip(boxes, confidences, strict=True))

    def _face_embedding(self, image: Image.Image) -> Embedding | None:
        """The embedding of the largest face in the image, or None when no face is found."""
        import dlib
        import numpy as np

        models = self._load()
        scale = min(1.0, DETECT_MAX_SIDE / max(image.size))
        small = (
            image
            if scale == 1.0
            else image.resize(
                (round(image.width * scale), round(image.height * scale)), Image.Resampling.BILINEAR
            )
        )
        # HOG works on gradients; grey is a quarter faster than RGB and found the same faces in
        # the test photos.
        grey = np.asarray(small.convert("L"))
        # The detector's window is 80 px. Only when no face is found, look again at double size
        # (faces of 40-80 px, e.g. a full-body shot): 4x the detection time, paid only then.
        faces = _confident(self._detect(grey, 0)) or _confident(self._detect(grey, 1))
        if not faces:
            return None
        # Several faces: the largest is the subject (a character portrait, not the crowd
        # behind); equal sizes (one pyramid level) go to the more confident.
        box, _ = max(faces, key=lambda face: (face[0].width() * face[0].height(), face[1]))
        full = dlib.rectangle(
            round(box.left() / scale),
            round(box.top() / scale),
            round(box.right() / scale),
            round(box.bottom() / scale),
        )
        rgb = np.asarray(image)
        with self._embed_lock:
            shape = models.shape_predictor(rgb, full)
            descriptor = models.recognizer.compute_face_descriptor(rgb, shape, 0)
        return np.asarray(descriptor, dtype=np.float64)

    def _reference_embedding(self, data: bytes) -> Embedding | None:
        key = hashlib.sha256(data).hexdigest()
        with self._cache_lock:
            if key in self._cache:
                self._hits += 1
                self._cache.move_to_end(key)
                return self._cache[key]
            self._misses += 1
        # Raises UnreadableImage, which is not cached: it costs no model time to find again.
        embedding = self._face_embedding(decode_rgb(data))
        with self._cache_lock:
            self._cache[key] = embedding
            self._cache.move_to_end(key)
            while len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
        return embedding

    def cache_info(self) -> CacheInfo:
        with self._cache_lock:
            return CacheInfo(self._hits, self._misses, len(self._cache))

    def clear_cache(self) -> None:
        with self._cache_lock:
            self._cache.clear()

    def score(self, references: Sequence[bytes], image: bytes) -> Score:
        import numpy as np

        if not references:
            return Score(None, self.method, "no reference images")
        try:
            self._load()
        except Exception as exc:  # a broken install must not fail the generation it scores
            return Score(None, self.method, f"face models could not be loaded: {exc}")
        embeddings: list[Embedding] = []
        unreadable: list[str] = []
        for data in references:
            try:
                embedding = self._reference_embedding(data)
            except UnreadableImage as exc:
                unreadable.append(str(exc))
                continue
            if embedding is not None:
                embeddings.append(embedding)
        if not embeddings:
            if len(unreadable) == len(references):
                return Score(None, self.method, f"could not decode the references: {unreadable[0]}")
            return Score(None, self.method, NO_FACE_IN_REFERENCES)
        try:
            target = self._face_embedding(decode_rgb(image))
        except UnreadableImage as exc:
            return Score(None, self.method, f"could not decode the image: {exc}")
        if target is None:
            return Score(None, self.method, NO_FACE_IN_IMAGE)
        # Several references: the closest one decides (a character seen from several sides).
        distance = min(float(np.linalg.norm(target - ref)) for ref in embeddings)
        unused = len(references) - len(embeddings)
        note = f"{unused} of {len(references)} references had no usable face" if unused else None
        return Score(distance_to_score(distance), self.method, note)


@functools.cache
def load_scorer() -> IdentityScorer:
    """The process's one scorer (so its reference cache is shared): the face scorer when the
    identity extra is installed, else one that names the extra in every answer."""
    missing = [
        name
        for name in ("dlib", "numpy", "face_recognition_models")
        if importlib.util.find_spec(name) is None
    ]
    if missing:
        return NullScorer(
            f"face scorer not installed ({', '.join(missing)} missing): {INSTALL_HINT}"
        )
    return FaceScorer()
