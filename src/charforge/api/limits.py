"""Request bodies bounded before they are read in full, and text a database cannot hold refused.

A pure ASGI middleware (a BaseHTTPMiddleware could not wrap ``receive`` for the app, and wraps
what it raises in task-group errors); it also marks every answer ``nosniff``. A body larger
than its limit is answered 413 from its Content-Length alone; a chunked one is counted as it
streams and stopped one chunk past the limit. A JSON body (at most ``max_json_bytes``) is read
here, checked for lone UTF-16 surrogates and NUL characters (UTF-8 and PostgreSQL cannot store
them: they were a 500) and replayed.
"""

from __future__ import annotations

import contextlib
import json
import re
from collections.abc import Callable
from typing import Any
from urllib.parse import parse_qsl

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from charforge.errors import CharforgeError, InvalidInput, PayloadTooLarge
from charforge.identity.intake import MAX_BYTES as REFERENCE_MAX_BYTES
from charforge.services.cards import CARD_MAX_BYTES

# A multipart form carries its boundaries and a few text fields around the file.
UPLOAD_MARGIN = 64 * 1024
UPLOAD_MAX_BYTES = max(REFERENCE_MAX_BYTES, CARD_MAX_BYTES) + UPLOAD_MARGIN
_UPLOAD_TYPES = ("multipart/form-data", "image/png", "application/octet-stream")
# A card may come as a JSON body of its own; it has the upload limit and its own reader.
_UPLOAD_PATHS = re.compile(r"^/api/characters/import/?$")
# Only an escape can put a surrogate or NUL in valid JSON (raw ones are invalid UTF-8 or JSON).
_SUSPECT_ESCAPE = re.compile(rb"\\u(?:[dD][89a-fA-F]|0000)")
_NOSNIFF = (b"x-content-type-options", b"nosniff")


class _BodyTooLarge(PayloadTooLarge):
    """Raised from ``receive`` into the app: its own handler renders the 413."""


def _media_type(scope: Scope) -> str:
    for key, value in scope["headers"]:
        if key == b"content-type":
            return str(value.decode("latin-1")).split(";")[0].strip().lower()
    return ""


def _content_length(scope: Scope) -> int | None:
    for key, value in scope["headers"]:
        if key == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None


def bad_text(value: str) -> str | None:
    """Why ``value`` cannot be stored as text, or None when it can."""
    if "\x00" in value:
        return "contains a NUL character (\\u0000), which text cannot hold"
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return "contains a lone UTF-16 surrogate (such as \\ud800), which is not valid text"
    return None


def find_bad_text(value: Any, path: tuple[str, ...] = ()) -> tuple[str, str] | None:
    """(field path, why) of the first string, key or value, that is not storable text."""
    if isinstance(value, str):
        why = bad_text(value)
        return (".".join(path), why) if why else None
    if isinstance(value, dict):
        for key, item in value.items():
            if why := bad_text(key):
                return (".".join((*path, "<key>")), why)
            if found := find_bad_text(item, (*path, key)):
                return found
    if isinstance(value, list):
        for index, item in enumerate(value):
            if found := find_bad_text(item, (*path, str(index))):
                return found
    return None


def _invalid_text(field: str | None, why: str) -> InvalidInput:
    name = field or "body"
    return InvalidInput(
        f"Invalid value for '{name}': {why}.",
        field=field or None,
        hint="Send text as valid UTF-8 without NUL characters.",
        extra={"details": [{"field": field or None, "message": why}]},
    )


# (whether a request is a page's, how to render an error as a page): a browser that posted a
# form gets a page it can read, not JSON.
HtmlErrors = tuple[Callable[[Request], bool], Callable[[Request, CharforgeError], Response]]


class BodyLimits:
    def __init__(
        self, app: ASGIApp, *, max_json_bytes: int, html: HtmlErrors | None = None
    ) -> None:
        self.app = app
        self.max_json_bytes = max_json_bytes
        self.html = html

    def _limit(self, scope: Scope, media: str) -> tuple[int, str | None]:
        """(limit in bytes, the setting that raises it, None when it is fixed)."""
        if media in _UPLOAD_TYPES or _UPLOAD_PATHS.match(scope["path"]):
            return UPLOAD_MAX_BYTES, None
        return self.max_json_bytes, "CHARFORGE_MAX_JSON_BYTES"

    @staticmethod
    def _too_large(limit: int, setting: str | None, media: str) -> PayloadTooLarge:
        kind = "an upload" if setting is None else "a request body"
        hint = (
            f"Send a smaller body; the server's operator can raise the limit with {setting}."
            if setting
            else "Send a smaller file."
        )
        return _BodyTooLarge(
            f"The body is larger than {limit} bytes, the limit for {kind}"
            f"{f' ({media})' if media else ''}; it was not read.",
            field="body",
            hint=hint,
            extra={"limit": limit, **({"setting": setting} if setting else {})},
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_nosniff(message: Message) -> None:
            # No answer (an API's JSON, an image) is to be sniffed into HTML by a browser.
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                if not any(k.lower() == _NOSNIFF[0] for k, _ in headers):
                    headers.append(_NOSNIFF)
                message = {**message, "headers": headers}
            await send(message)

        if b"%00" in scope.get("query_string", b""):
            for key, value in parse_qsl(scope["query_string"].decode("latin-1")):
                if "\x00" in key or "\x00" in value:
                    invalid = _invalid_text(key.replace("\x00", ""), bad_text("\x00") or "")
                    await self._answer(invalid, scope, receive, send_nosniff)
                    return

        media = _media_type(scope)
        limit, setting = self._limit(scope, media)
        declared = _content_length(scope)
        if declared is not None and declared > limit:
            await self._refuse(self._too_large(limit, setting, media), scope, receive, send_nosniff)
            return

        # What FastAPI parses as JSON: no type, application/json, application/*+json.
        json_like = media in ("", "application/json") or (
            media.startswith("application/") and media.endswith("+json")
        )
        checked = setting is not None and json_like
        if checked or media == "application/x-www-form-urlencoded":
            # Small by the limit above: read here, looked at, and handed on whole.
            chunks: list[bytes] = []
            size, more = 0, True
            while more:
                message = await receive()
                if message["type"] == "http.disconnect":
                    return
                chunks.append(message.get("body", b""))
                size += len(chunks[-1])
                more = message.get("more_body", False)
                if size > limit:
                    error = self._too_large(limit, setting, media)
                    await self._refuse(error, scope, receive, send_nosniff)
                    return
            body = b"".join(chunks)
            del chunks
            if found := self._text_problem(body, media):
                await self._answer(_invalid_text(*found), scope, receive, send_nosniff)
                return
            await self.app(scope, _replay(body, receive), send_nosniff)
            return

        seen = 0

        async def counted() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    raise self._too_large(limit, setting, media)
            return message

        try:
            await self.app(scope, counted, send_nosniff)
        except Exception as exc:
            # A BaseHTTPMiddleware reads in a task group: the error comes back in a group.
            too_large = _only_too_large(exc)
            if too_large is None:
                raise
            await self._refuse(too_large, scope, receive, send_nosniff)

    @staticmethod
    def _text_problem(body: bytes, media: str) -> tuple[str | None, str] | None:
        if media == "application/x-www-form-urlencoded":
            if b"%00" not in body:
                return None
            for key, value in parse_qsl(body.decode("latin-1"), keep_blank_values=True):
                if "\x00" in value or "\x00" in key:
                    return key.replace("\x00", ""), bad_text("\x00") or ""
            return None
        if not _SUSPECT_ESCAPE.search(body):
            return None
        try:
            parsed = json.loads(body)
        except ValueError:
            return None  # the app answers with its own "not valid JSON"
        found = find_bad_text(parsed)
        return (found[0] or None, found[1]) if found else None

    async def _refuse(
        self, exc: PayloadTooLarge, scope: Scope, receive: Receive, send: Send
    ) -> None:
        # The rest of the body is never read, so the connection cannot carry another request.
        # Where the app had already started its answer, the connection is just dropped.
        with contextlib.suppress(RuntimeError):
            await self._answer(exc, scope, receive, send, close=True)

    async def _answer(
        self,
        exc: CharforgeError,
        scope: Scope,
        receive: Receive,
        send: Send,
        *,
        close: bool = False,
    ) -> None:
        response: Response | None = None
        if self.html is not None:
            request = Request(scope)
            wants_html, render = self.html
            if wants_html(request):
                response = render(request, exc)
        if response is None:
            response = JSONResponse(exc.to_envelope(), exc.status)
        if close:
            response.headers["Connection"] = "close"
        await response(scope, receive, send)


def _only_too_large(exc: BaseException) -> _BodyTooLarge | None:
    """The 413 when it is all that went wrong (alone or as every member of a group)."""
    if isinstance(exc, BaseExceptionGroup):
        matched, rest = exc.split(_BodyTooLarge)
        if rest is not None or matched is None:
            return None
        leaf: BaseException = matched
        while isinstance(leaf, BaseExceptionGroup):
            leaf = leaf.exceptions[0]
        exc = leaf
    return exc if isinstance(exc, _BodyTooLarge) else None


def _replay(body: bytes, receive: Receive) -> Receive:
    sent = False

    async def replay() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()  # after the body: wait for the disconnect, as uvicorn does

    return replay
