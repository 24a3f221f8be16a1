"""Progress of a local generation: the engine's steps of each pass as progress over all
images of a call, reported at most every ``_PROGRESS_INTERVAL`` seconds."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from charforge.backends.base import Progress

log = logging.getLogger(__name__)

_PROGRESS_INTERVAL = 0.2  # seconds between progress reports (each one is a database write)


class _StepReport:
    """Turns the engine's steps into progress over all images of a call, at most every
    ``_PROGRESS_INTERVAL`` seconds (and always at the end of an image)."""

    def __init__(
        self,
        on_progress: Callable[[Progress], None] | None,
        steps: int,
        second_steps: int,
        images: int,
    ) -> None:
        self.on_progress = on_progress
        self.steps, self.second_steps, self.images = steps, second_steps, images
        self.per_image = steps + second_steps
        self.last = 0.0

    def __call__(self, index: int, pass_index: int, step: int, steps: int) -> None:
        if self.on_progress is None:
            return
        # Each pass counts for its planned steps; within a pass, the share of its own
        # timesteps done (Heun and DPM2 take two per step).
        planned = self.second_steps if pass_index else self.steps
        share = min(1.0, step / (steps or planned))
        in_image = (self.steps + share * self.second_steps) if pass_index else share * self.steps
        final = share >= 1.0 and pass_index == (1 if self.second_steps else 0)
        now = time.monotonic()
        if now - self.last < _PROGRESS_INTERVAL and not final:
            return
        self.last = now
        done = min(1.0, (index * self.per_image + in_image) / (self.images * self.per_image))
        try:
            self.on_progress(Progress(done, round(in_image), self.per_image))
        except Exception:  # progress is informational; never fail the image
            log.exception("progress report failed")
