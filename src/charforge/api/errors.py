"""One JSON envelope for every error; never a stack trace to the client."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic.alias_generators import to_camel
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from charforge.errors import CharforgeError, InvalidInput, NotFound, TooManyRequests

log = logging.getLogger(__name__)

_HTTP_CODES = {
    400: "bad_request",
    401: "unauthorized",
    404: "not_found",
    405: "method_not_allowed",
    413: "payload_too_large",
    415: "unsupported_media_type",
}


def envelope(
    status: int,
    code: str,
    message: str,
    *,
    field: str | None = None,
    hint: str | None = None,
    headers: dict[str, str] | None = None,
    **extra: Any,
) -> JSONResponse:
    body: dict[str, Any] = {"code": code, "message": message, "field": field, "hint": hint}
    body.update(extra)
    return JSONResponse({"error": body}, status_code=status, headers=headers)


def error_response(exc: CharforgeError) -> JSONResponse:
    headers = {"WWW-Authenticate": "Bearer"} if exc.status == 401 else None
    if isinstance(exc, TooManyRequests):
        headers = {"Retry-After": str(exc.retry_after)}
    return JSONResponse(exc.to_envelope(), status_code=exc.status, headers=headers)


def _field_name(loc: tuple[Any, ...]) -> str | None:
    parts = [str(p) for p in loc if p not in ("body", "query", "path", "header")]
    # Pydantic adds the union member's type name for `str | Model` fields; it means nothing here.
    parts = [p for p in parts if not p[:1].isupper() and p not in ("str", "int", "float", "bool")]
    # items[3].sampler: a list index reads as one, as in the JSON the client wrote.
    name = ""
    for part in parts:
        if part.isdigit():
            name += f"[{part}]"
        else:
            name += ("." if name else "") + to_camel(part)
    return name or None


def _lower_first(text: str) -> str:
    # "Input should be ..." -> "input should be ...", but "JSON ..." stays "JSON ...".
    return text[:1].lower() + text[1:] if text[1:2].islower() else text


def _describe(error: dict[str, Any]) -> str:
    message = str(error.get("msg", "invalid value"))
    message = message.removeprefix("Value error, ")
    if error.get("type") == "json_invalid":
        position = error.get("loc", ("body", "?"))[-1]
        reason = (error.get("ctx") or {}).get("error", "invalid syntax")
        return f"the request body is not valid JSON ({reason} at character {position})"
    if error.get("type") == "missing":
        return "is required"
    if error.get("type") == "extra_forbidden":
        return "is not a known field"
    if "input" in error and "(got " not in message:
        shown = repr(error["input"])
        if len(shown) <= 60:
            return f"{_lower_first(message)} (got {shown})"
    return _lower_first(message)


def _unstorable_text(exc: BaseException) -> str | None:
    """Why the failure was text no database or encoder takes (a lone surrogate, a NUL)."""
    seen: BaseException | None = exc
    for _ in range(8):  # the driver's error is a cause or context a few levels down
        if seen is None:
            return None
        if isinstance(seen, UnicodeEncodeError) and "surrogate" in str(seen):
            return "contains a lone UTF-16 surrogate, which is not valid text"
        if isinstance(seen, ValueError) and "NUL" in str(seen):  # psycopg's own message
            return "contains a NUL character, which text cannot hold"
        seen = seen.__cause__ or seen.__context__
    return None


def install_error_handlers(
    app: FastAPI,
    html: tuple[Callable[[Request], bool], Callable[[Request, CharforgeError], Response]]
    | None = None,
) -> None:
    """``html``: (does this request want a page?, render the error as a page)."""

    async def as_page(request: Request, error: CharforgeError) -> Response | None:
        """The error as an HTML page for a browser on a page route; None for API clients."""
        if html is None or not html[0](request):
            return None
        return await run_in_threadpool(html[1], request, error)

    @app.exception_handler(CharforgeError)
    async def _charforge(request: Request, exc: CharforgeError) -> Response:
        rendered = await as_page(request, exc)
        return rendered if rendered is not None else error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> Response:
        details = []
        for error in exc.errors():
            syntax = error.get("type") == "json_invalid"
            field = None if syntax else _field_name(tuple(error.get("loc", ())))
            details.append({"field": field, "message": _describe(error)})
        first = details[0] if details else {"field": None, "message": "invalid request"}
        if first["field"]:
            message = f"Invalid value for '{first['field']}': {first['message']}."
        else:
            message = f"Invalid request body: {first['message']}."
        page_error = InvalidInput(message, field=first["field"], hint="Go back and try again.")
        if (rendered := await as_page(request, page_error)) is not None:
            return rendered
        return envelope(
            422,
            "validation_error",
            message,
            field=first["field"],
            hint="Fix the fields listed in details and send the request again.",
            details=details,
        )

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> Response:
        if exc.status_code == 404:
            rendered = await as_page(request, NotFound("There is no page at this address."))
            if rendered is not None:
                return rendered
        code = _HTTP_CODES.get(exc.status_code, "http_error")
        message = exc.detail if isinstance(exc.detail, str) else "HTTP error"
        return envelope(exc.status_code, code, message, headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        if why := _unstorable_text(exc):
            # What the body check cannot see (a form field, a header) reaches the database.
            log.warning("refused text on %s %s: %s", request.method, request.url.path, why)
            return envelope(
                422,
                "validation_error",
                f"Invalid request: a text field {why}.",
                hint="Send text as valid UTF-8 without NUL characters.",
            )
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return envelope(
            500,
            "internal_error",
            "charforge hit an internal error; nothing about it was shown to protect the server.",
            hint="The server log has the details; please report it.",
        )
