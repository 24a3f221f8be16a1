"""Face-identity scorer speed (charforge.identity.scoring, the `identity` extra) on real
photographs (tests/photos.py) placed on canvases of generated-image size: 512x768 and
768x1152 PNG. Per size and photo:

- cached: one output image scored against references already embedded (decode, detection
  and embedding of the output only), the steady state when one character is scored often;
- uncached: the first call, one reference of the same size embedded too (cache cleared);
- no face: a cat picture, which pays for both detection passes and embeds nothing.

Then throughput: cached calls from 1 and 4 threads (the detectors run in parallel, the
embedding network under a lock).

Run: ``.venv/bin/python -m bench.scorer [N]`` (default 20 runs per figure). Prints figures;
asserts nothing about time.
"""

from __future__ import annotations

import functools
import statistics
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

from tests.photos import astronaut_png, cat_png, kafka_png, on_canvas, transformed

from charforge.identity.scoring import FaceScorer

RUNS = 20
SIZES = [(512, 768), (768, 1152)]
THREAD_CALLS = 40


def timed(call: Callable[[], object], n: int) -> list[float]:
    samples = []
    for _ in range(n):
        started = time.perf_counter()
        call()
        samples.append((time.perf_counter() - started) * 1000)
    return samples


def report(name: str, samples: list[float]) -> None:
    median = statistics.median(samples)
    p90 = statistics.quantiles(samples, n=10)[-1]
    print(f"{name:<34} median {median:6.1f} ms   p90 {p90:6.1f} ms   n={len(samples)}")


def uncached(scorer: FaceScorer, references: list[bytes], image: bytes) -> None:
    scorer.clear_cache()
    scorer.score(references, image)


def main(n: int) -> None:
    scorer = FaceScorer()
    started = time.perf_counter()
    scorer.score([astronaut_png()], astronaut_png())  # loads the models, makes one detector
    print(
        f"first call in the process (model load + 2 images): "
        f"{(time.perf_counter() - started) * 1000:.0f} ms"
    )
    for width, height in SIZES:
        for name, photo in (("astronaut", astronaut_png()), ("kafka", kafka_png())):
            image = on_canvas(photo, width, height)
            references = [on_canvas(transformed(photo, mirror=True), width, height)]
            result = scorer.score(references, image)
            assert result.score is not None, result  # a figure for a face not found is no figure
            label = f"{width}x{height} {name}"
            cached = functools.partial(scorer.score, references, image)
            report(f"{label} cached", timed(cached, n))
            first = functools.partial(uncached, scorer, references, image)
            report(f"{label} uncached", timed(first, n))
        no_face = functools.partial(scorer.score, references, on_canvas(cat_png(), width, height))
        report(f"{width}x{height} no face (cat)", timed(no_face, n))
    width, height = SIZES[0]
    image = on_canvas(kafka_png(), width, height)
    references = [kafka_png()]
    for threads in (1, 4):
        with ThreadPoolExecutor(max_workers=threads) as pool:
            list(pool.map(lambda _: scorer.score(references, image), range(threads)))  # warm
            started = time.perf_counter()
            list(pool.map(lambda _: scorer.score(references, image), range(THREAD_CALLS)))
            elapsed = time.perf_counter() - started
        print(
            f"{width}x{height} cached, {threads} thread(s): {THREAD_CALLS / elapsed:5.1f} images/s"
        )


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else RUNS)
