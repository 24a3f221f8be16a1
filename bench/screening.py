"""Output screening speed (charforge.safety.screening, Yahoo's open_nsfw on ONNX Runtime) on
real photographs (tests/photos.py) placed on canvases of generated-image size, as the job
process pays for it:

- preview: making the classifier's 256x256 preview from pixels already decoded (the job
  decodes every image anyway to check it);
- classify 1: one preview through the classifier (a job of one image);
- classify 8: one batch of 8 previews, per image (a job of count 8);
- decode + preview + classify: all of it from PNG bytes, for comparison.

Then throughput from 1 and 2 threads (ONNX Runtime releases the GIL while it runs).

Run: ``.venv/bin/python -m bench.screening [N]`` (default 30 runs per figure). Prints
figures; asserts nothing about time.
"""

from __future__ import annotations

import io
import statistics
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

from PIL import Image
from tests.photos import astronaut_png, kafka_png, on_canvas

from charforge.safety.screening import OpenNsfw, preview_of

RUNS = 30
SIZES = [(512, 768), (1024, 1536)]
THREAD_CALLS = 60


def timed(call: Callable[[], object], n: int, per: int = 1) -> list[float]:
    samples = []
    for _ in range(n):
        started = time.perf_counter()
        call()
        samples.append((time.perf_counter() - started) * 1000 / per)
    return samples


def report(name: str, samples: list[float]) -> None:
    median = statistics.median(samples)
    p90 = statistics.quantiles(samples, n=10)[-1]
    print(f"{name:<44} median {median:6.1f} ms   p90 {p90:6.1f} ms   n={len(samples)}")


def decoded(png: bytes) -> Image.Image:
    with Image.open(io.BytesIO(png)) as img:
        img.load()
        return img.copy()


def one_size(classifier: OpenNsfw, width: int, height: int, n: int) -> None:
    png = on_canvas(kafka_png(), width, height)
    pixels = decoded(png)
    preview = preview_of(pixels)
    label = f"{width}x{height}"
    report(f"{label} preview from decoded pixels", timed(lambda: preview_of(pixels), n))
    report(f"{label} classify 1", timed(lambda: classifier.scores([preview]), n))
    eight = timed(lambda: classifier.scores([preview] * 8), n, per=8)
    report(f"{label} classify 8 (per image)", eight)
    whole = timed(lambda: classifier.scores([preview_of(decoded(png))]), n)
    report(f"{label} decode + preview + classify", whole)


def main(n: int) -> None:
    classifier = OpenNsfw()
    started = time.perf_counter()
    classifier.scores([preview_of(decoded(astronaut_png()))])
    load_ms = (time.perf_counter() - started) * 1000
    print(f"first call in the process (load + 1 image): {load_ms:.0f} ms")
    for width, height in SIZES:
        one_size(classifier, width, height, n)
    preview = preview_of(decoded(on_canvas(astronaut_png(), *SIZES[0])))
    for threads in (1, 2):
        with ThreadPoolExecutor(max_workers=threads) as pool:
            list(pool.map(lambda _: classifier.scores([preview]), range(threads)))
            started = time.perf_counter()
            list(pool.map(lambda _: classifier.scores([preview]), range(THREAD_CALLS)))
            elapsed = time.perf_counter() - started
        print(f"classify 1, {threads} thread(s): {THREAD_CALLS / elapsed:5.1f} images/s")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else RUNS)
