"""Logging set-up: text for people, JSON lines for log pipelines; every record carries the
request id and the job id of the work it belongs to."""

from __future__ import annotations

import contextvars
import json
import logging
import re
import sys
import threading
from collections.abc import Callable
from contextvars import ContextVar
from datetime import UTC, datetime
from typing import ParamSpec, TypeVar

request_id: ContextVar[str | None] = ContextVar("request_id", default=None)
job_id: ContextVar[str | None] = ContextVar("job_id", default=None)

P = ParamSpec("P")
R = TypeVar("R")


class CarriedContext:
    """The context (request and job ids) of the thread that made it, for code run later in
    another thread: ContextVars do not flow into a ``threading.Thread``, so that code's log
    lines would lose the ids of the work they are about."""

    def __init__(self) -> None:
        self._context = contextvars.copy_context()

    def run(self, target: Callable[P, R], *args: P.args, **kwargs: P.kwargs) -> R:
        # A copy per call: one Context cannot be entered by two threads at once.
        return self._context.copy().run(target, *args, **kwargs)


def start_thread(target: Callable[..., object], *args: object, name: str) -> threading.Thread:
    """A daemon thread running ``target(*args)`` with this thread's request and job ids."""
    thread = threading.Thread(
        target=contextvars.copy_context().run, args=(target, *args), name=name, daemon=True
    )
    thread.start()
    return thread


class ContextFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        record.request_id = request_id.get()
        record.job_id = job_id.get()
        return True


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, object] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key in ("request_id", "job_id"):
            value = getattr(record, key, None)
            if value:
                entry[key] = value
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False)


# C0 (tab kept), DEL, C1 and the Unicode line separators: each could end a line or move the
# cursor, so a model name or prompt with one could forge a log line or hide one.
_CONTROL = re.compile("[\x00-\x08\x0a-\x1f\x7f-\x9f\u2028\u2029]")
_NAMED = {"\n": "\\n", "\r": "\\r"}


def escape_controls(text: str) -> str:
    return _CONTROL.sub(lambda m: _NAMED.get(m[0]) or ascii(m[0])[1:-1], text)


class TextFormatter(logging.Formatter):
    """One record, one line: the message and its arguments have their controls escaped (a
    traceback after it keeps its own lines)."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def formatMessage(self, record: logging.LogRecord) -> str:
        record.message = escape_controls(record.message)
        return super().formatMessage(record)

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        tags = [
            f"{key}={value}"
            for key in ("request_id", "job_id")
            if (value := getattr(record, key, None))
        ]
        return f"{text} [{' '.join(tags)}]" if tags else text


_CREDENTIAL_LEAKING_LOGGERS = ("httpx", "httpcore", "websockets")


def configure_logging(fmt: str = "text", level: str = "INFO") -> None:
    # The real stderr, even where a framework (Celery) redirected sys.stderr into logging.
    handler: logging.Handler = logging.StreamHandler(sys.__stderr__ or sys.stderr)
    handler.addFilter(ContextFilter())
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    root = logging.getLogger()
    for old in list(root.handlers):
        if getattr(old, "_charforge", False):
            root.removeHandler(old)
    handler._charforge = True  # type: ignore[attr-defined]
    root.addHandler(handler)
    root.setLevel(level.upper())
    # Their INFO/DEBUG lines carry full URLs and headers: a RunPod result's pre-signed S3 link,
    # the Basic auth sent to a ComfyUI behind a proxy. Their warnings still come through.
    for noisy in _CREDENTIAL_LEAKING_LOGGERS:
        logging.getLogger(noisy).setLevel(max(logging.WARNING, root.level))
