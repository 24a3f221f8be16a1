"""Identity in the job process: load the job's reference images, score each image against
them, and generate again below ``identity.minScore`` (next seed, up to ``maxTries``), keeping
the best image of each position. All tries are one attempt: one job, one result."""

from __future__ import annotations

import logging
import multiprocessing
import threading
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

from charforge.backends.base import BackendRequest, BackendResult, GeneratedImage, ReferenceImage
from charforge.db import references as refs
from charforge.domain.params import SEED_MAX

if TYPE_CHECKING:
    from charforge.identity.scoring import Score
    from charforge.jobs.context import RunnerContext

log = logging.getLogger(__name__)
# Far beyond the ~0.2-0.3 s a scoring takes (the first call also loads the models, ~1 s).
_SCORE_TIMEOUT = 60.0

_scorer_lock = threading.Lock()
_scorer: ScorerProcess | None = None


def _score_here(references: list[bytes], image: bytes) -> Score:
    """In the scoring process: its own scorer, loaded once, keeps its reference cache."""
    from charforge.identity.scoring import load_scorer

    return load_scorer().score(references, image)


class ScorerProcess:
    """Scores in a child process of the job process: dlib holds Python's global lock for the
    ~100 ms of an embedding, which would stall the server's other threads (an embedded
    server answers HTTP from the same process). One worker keeps the models and the
    reference cache warm; a crashed one is replaced."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._pool: ProcessPoolExecutor | None = None

    def score(self, references: list[bytes], image: bytes) -> Score:
        for attempt in (1, 2):
            with self._lock:
                if self._pool is None:
                    self._pool = ProcessPoolExecutor(
                        max_workers=1, mp_context=multiprocessing.get_context("spawn")
                    )
                pool = self._pool
            try:
                return pool.submit(_score_here, references, image).result(timeout=_SCORE_TIMEOUT)
            except (BrokenProcessPool, TimeoutError) as exc:
                log.warning("the scoring process failed (%s); starting a new one", exc)
                with self._lock:
                    if self._pool is pool:
                        self._pool = None
                pool.shutdown(wait=False, cancel_futures=True)
                if attempt == 2:
                    from charforge.identity.scoring import Score

                    return Score(None, "none", f"the scorer failed: {type(exc).__name__}")
        raise AssertionError("unreachable")


def scorer() -> ScorerProcess:
    global _scorer
    with _scorer_lock:
        if _scorer is None:
            _scorer = ScorerProcess()
        return _scorer


@dataclass
class Scored:
    """The images to store with their scores, and every try (seed, score) on the way."""

    result: BackendResult
    scores: list[Score] = field(default_factory=list)
    tries: list[dict[str, Any]] = field(default_factory=list)


def load_references(ctx: RunnerContext, plan: dict[str, Any] | None) -> tuple[ReferenceImage, ...]:
    """The plan's references still there (one may have been deleted since the job was
    queued), in the plan's order."""
    if not plan or not plan.get("references"):
        return ()
    ids: list[str] = list(plan["references"])
    with ctx.db.session() as session:
        rows = {r.id: (r.sha256, r.file_path) for r in refs.references_by_id(session, ids)}
    loaded = []
    for ref_id in ids:
        if ref_id not in rows:
            continue
        sha256, path = rows[ref_id]
        try:
            loaded.append(ReferenceImage(sha256, ctx.store.path(path).read_bytes()))
        except OSError:
            log.warning("reference %s has no file on disk; left out", ref_id)
    return tuple(loaded)


def score_images(
    references: tuple[ReferenceImage, ...], images: list[GeneratedImage]
) -> list[Score]:
    from charforge.identity.scoring import Score

    if not references:
        reason = "the character's reference images were deleted before the image was made"
        return [Score(None, "none", reason) for _ in images]
    judge = scorer()
    pictures = [r.png for r in references]
    return [judge.score(pictures, image.data) for image in images]


def _tries(number: int, images: list[GeneratedImage], scores: list[Score]) -> list[dict[str, Any]]:
    return [
        {"try": number, "seed": image.seed, "score": _shown(score.score)}
        for image, score in zip(images, scores, strict=True)
    ]


def _shown(score: float | None) -> float | None:
    """Four decimals: the embedding's precision is far coarser than a float's."""
    return None if score is None else round(score, 4)


def score_result(
    references: tuple[ReferenceImage, ...], result: BackendResult, count: int
) -> Scored:
    """One try's images scored (no threshold to retry for)."""
    images = result.images[:count]
    scores = score_images(references, images)
    return Scored(result, scores, _tries(1, images, scores))


def _better(new: Score, old: Score | None) -> bool:
    if old is None:
        return True
    if new.score is None:
        return False
    return old.score is None or new.score > old.score


def generate_scored(
    generate: Callable[[BackendRequest], BackendResult],
    request: BackendRequest,
    plan: dict[str, Any],
    references: tuple[ReferenceImage, ...],
) -> Scored:
    """Generate, score, and while an image is below ``minScore`` generate again with the
    next seeds, up to ``maxTries``; keep the best-scoring image of each position."""
    min_score = plan.get("minScore")
    tries_left = int(plan.get("maxTries") or 1) if min_score is not None else 1
    count = request.count
    best: list[tuple[Score | None, GeneratedImage | None]] = [(None, None)] * count
    tries: list[dict[str, Any]] = []
    current, last = request, None
    for number in range(1, tries_left + 1):
        last = generate(current)
        images = last.images[:count]
        scores = score_images(references, images)
        tries += _tries(number, images, scores)
        for position, (image, score) in enumerate(zip(images, scores, strict=True)):
            if _better(score, best[position][0]):
                best[position] = (score, image)
        reached = min_score is None or all(
            s is not None and s.score is not None and s.score >= min_score for s, _ in best
        )
        # No face in the references: another seed cannot help.
        hopeless = any(s.reason and "reference" in s.reason for s in scores)
        cancelled = request.cancelled is not None and request.cancelled.is_set()
        if reached or hopeless or cancelled or len(images) < count:
            break
        # The next seeds, as a user pressing "generate" again with seed + 1 would get.
        next_seed = (max(i.seed for i in images) + 1) % (SEED_MAX + 1)
        current = replace(request, params=replace(request.params, seed=next_seed))
        log.info(
            "identity score below %.2f after try %d; generating again with seed %d",
            min_score,
            number,
            next_seed,
        )
    assert last is not None
    if any(image is None for _, image in best):  # the backend sent fewer: the caller refuses
        return Scored(last, [], tries)
    kept = [image for _, image in best if image is not None]
    return Scored(replace(last, images=kept), [s for s, _ in best if s is not None], tries)


def image_consistency(score: Score, plan: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {"score": _shown(score.score), "method": score.method}
    if score.reason:
        out["reason"] = score.reason
    if plan.get("minScore") is not None:
        out["reachedMinScore"] = score.score is not None and score.score >= plan["minScore"]
    return out
