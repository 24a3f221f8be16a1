"""Ask several backends the same question at once, and keep the answers that come in time."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor, wait
from typing import TypeVar

from charforge.observability import logs

log = logging.getLogger(__name__)
T = TypeVar("T")


def ask_each(
    names: Iterable[str], question: Callable[[str], T], *, timeout: float, what: str
) -> dict[str, T]:
    """``question(name)`` for every name at once; the answers that came within ``timeout``.
    A slower one goes on in the background; a failing one is logged, never raised: a
    backend's failure is not the request's."""
    asked = list(dict.fromkeys(names))
    if not asked:
        return {}
    executor = ThreadPoolExecutor(max_workers=len(asked), thread_name_prefix=what)
    try:
        # The asker's request id goes with each question: its backend's log lines name it.
        carried = logs.CarriedContext()
        futures = {executor.submit(carried.run, question, name): name for name in asked}
        done, _ = wait(futures, timeout=timeout)
    finally:
        executor.shutdown(wait=False, cancel_futures=True)
    answers: dict[str, T] = {}
    for future in done:
        try:
            answers[futures[future]] = future.result()
        except Exception as exc:
            message = getattr(exc, "message", None) or str(exc) or type(exc).__name__
            log.warning("%s: backend %s: %s", what, futures[future], message)
    return answers
