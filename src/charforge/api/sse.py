"""Server-Sent Events read from the database: a job's or a batch's stream polls its row, so any
server can stream what any worker runs. One loop for every stream: what differs is how the
current state is read, which events a new state makes, and when the stream is done."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable, Iterable
from typing import Any, TypeVar

from fastapi import Request
from fastapi.responses import StreamingResponse
from starlette.concurrency import run_in_threadpool

T = TypeVar("T")

KEEP_ALIVE_SECONDS = 15.0  # proxies close connections that stay silent longer


def sse(event: str, data: Any) -> str:
    return f"event: {event}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n"


def polled_stream(
    first: T,
    read: Callable[[], T],
    changes: Callable[[T], Iterable[tuple[str, Any]]],
    done: Callable[[T], Any | None],
    request: Request,
    *,
    poll_seconds: float,
) -> StreamingResponse:
    """Send ``changes(state)`` for ``first``, then for each state ``read`` (a blocking
    database read, run in the thread pool) every ``poll_seconds``, until ``done(state)``
    gives the body of the last ``done`` event or the client goes away. ``changes`` keeps its
    own memory of what it sent."""

    async def events() -> AsyncIterator[str]:
        current, idle = first, 0.0
        while True:
            for name, data in changes(current):
                yield sse(name, data)
                idle = 0.0
            body = done(current)
            if body is not None:
                yield sse("done", body)
                return
            if idle >= KEEP_ALIVE_SECONDS:
                yield ": keep-alive\n\n"
                idle = 0.0
            await asyncio.sleep(poll_seconds)
            idle += poll_seconds
            if await request.is_disconnected():
                return
            current = await run_in_threadpool(read)

    return StreamingResponse(
        events(),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"},
    )
