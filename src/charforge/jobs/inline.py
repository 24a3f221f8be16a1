"""Embedded mode's queue: worker threads inside the server process.

The job row is the truth; this queue only says "job X is ready". On start, jobs a crashed
process left running go back to queued, and every queued job is picked up again.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections.abc import Callable

from charforge.db import repositories as repo
from charforge.db.engine import Database

log = logging.getLogger(__name__)
_STOP = object()


class InlineJobQueue:
    def __init__(self, run: Callable[[str], str], *, workers: int) -> None:
        self._run = run
        self._workers = workers
        self._queue: queue.Queue[object] = queue.Queue()
        self._done: dict[str, threading.Event] = {}
        self._callbacks: dict[str, list[Callable[[], None]]] = {}
        self._lock = threading.Lock()
        self._threads: list[threading.Thread] = []
        self._stopping = threading.Event()

    def start(self) -> None:
        for index in range(self._workers):
            thread = threading.Thread(
                target=self._loop, name=f"charforge-worker-{index}", daemon=True
            )
            thread.start()
            self._threads.append(thread)

    def recover(self, db: Database) -> int:
        """Re-queue what an earlier process left behind; returns how many jobs were sent."""
        with db.session() as session:
            requeued = repo.requeue_running(session)
            pending = list(repo.job_ids_in_state(session, "queued"))
        if requeued:
            log.warning("re-queued %d job(s) left running by an earlier process", requeued)
        for job_id in pending:
            self.submit(job_id)
        return len(pending)

    def submit(self, job_id: str) -> None:
        """Call only after the job's row is committed."""
        with self._lock:
            self._done.setdefault(job_id, threading.Event())
        self._queue.put(job_id)

    def wait(self, job_id: str, timeout: float) -> bool:
        """True once the job was run here (or is not this queue's); False on timeout."""
        with self._lock:
            event = self._done.get(job_id)
        return True if event is None else event.wait(timeout)

    async def wait_async(self, job_id: str, timeout: float) -> bool:
        """Like ``wait`` without holding a thread: the worker wakes this coroutine."""
        loop = asyncio.get_running_loop()
        finished: asyncio.Future[None] = loop.create_future()

        def resolve() -> None:
            if not finished.done():
                finished.set_result(None)

        def wake() -> None:
            loop.call_soon_threadsafe(resolve)

        with self._lock:
            if job_id not in self._done:
                return True
            self._callbacks.setdefault(job_id, []).append(wake)
        try:
            await asyncio.wait_for(finished, timeout)
        except TimeoutError:
            return False
        return True

    def _loop(self) -> None:
        while True:
            item = self._queue.get()
            if item is _STOP or self._stopping.is_set():
                return  # a job not started stays queued in the database for the next start
            job_id = str(item)
            try:
                self._run(job_id)
            except Exception:  # the runner records failures itself; this is a last guard
                log.exception("worker crashed on job %s", job_id)
            finally:
                with self._lock:
                    event = self._done.pop(job_id, None)
                    callbacks = self._callbacks.pop(job_id, [])
                if event is not None:
                    event.set()
                for wake in callbacks:
                    try:
                        wake()
                    except RuntimeError:  # the waiting request's event loop is gone
                        log.debug("no one is waiting for job %s any more", job_id)

    def stop(self, timeout: float = 30.0) -> bool:
        """Start no more jobs and let running ones finish; True when every worker ended.

        A job still running after ``timeout`` stays ``running`` in the database and is
        re-queued at the next start, instead of being failed here.
        """
        self._stopping.set()
        for _ in self._threads:
            self._queue.put(_STOP)
        deadline = time.monotonic() + timeout
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        finished = not any(thread.is_alive() for thread in self._threads)
        self._threads.clear()
        return finished
