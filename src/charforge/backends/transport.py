"""HTTP faults of any backend, mapped to charforge's errors in one place.

Connect failures mean the backend is not there (BackendUnavailable: retried, elsewhere when
the pool allows); a read timeout means it is there but stuck or slow (BackendTimeout). Each
adapter keeps its own mapping of HTTP statuses, whose bodies and meanings differ per backend.

A backend cannot hurt the server (guard.py): every answer is read as a stream and stopped at
``max_response_bytes`` (decompressed size), and a call's read timeout is its total deadline,
which a backend dripping one byte at a time cannot stretch.
"""

from __future__ import annotations

import base64
import binascii
from dataclasses import dataclass
from typing import Any

import httpx

from charforge.backends.guard import GuardedTransport, ResponseTooLarge, env_proxy
from charforge.domain.routes import BackendSpec
from charforge.errors import BackendBadResponse, BackendTimeout, BackendUnavailable

# Words in a backend's or worker's error text that point at the machine, not the request:
# another try, or another backend, may pass. A bad input fails the same way every time.
_TRANSIENT_MARKERS = (
    "outofmemory",
    "out of memory",
    "allocation on device",
    "cuda error",
    "connection",
    "not reachable",
    "timed out",
    "websocket",
)
_OUT_OF_MEMORY_MARKERS = _TRANSIENT_MARKERS[:3]


def capitalized(text: str) -> str:
    return text[:1].upper() + text[1:]


@dataclass(frozen=True)
class Hints:
    reach: str  # what to check when it cannot be reached
    stuck: str  # what to check when it does not answer in time


def send(
    client: httpx.Client,
    method: str,
    path: str,
    *,
    where: str,
    connect_timeout: float,
    limit: float,
    hints: Hints,
    **kwargs: Any,
) -> httpx.Response:
    """One request; ``where`` names the backend for messages (never its URL, which may be a
    credential), ``limit`` is the read timeout in force (the whole call's deadline), for the
    message."""
    try:
        return client.request(method, path, **kwargs)
    except ResponseTooLarge as exc:
        raise BackendBadResponse(
            f"{capitalized(where)} answered {path} with more than {megabytes(exc.cap)} "
            f"(CHARFORGE_BACKEND_MAX_RESPONSE_BYTES = {exc.cap}); it was stopped there and "
            "nothing of it was kept.",
            hint="A 2048x2048 PNG is about 12 MB in A1111's base64 answer. Raise "
            "CHARFORGE_BACKEND_MAX_RESPONSE_BYTES only if the backend really sends more; "
            "otherwise check what is listening on that URL.",
        ) from exc
    except httpx.DecodingError as exc:
        raise BackendBadResponse(
            f"{capitalized(where)} answered {path} with a body that could not be decoded: {exc}.",
            hint="Something other than the backend, or a broken proxy, may be on that URL.",
        ) from exc
    except httpx.ConnectTimeout as exc:
        raise BackendUnavailable(
            f"Could not connect to {where}: no answer within {connect_timeout:g}s.",
            hint=hints.reach,
        ) from exc
    except httpx.TimeoutException as exc:
        raise BackendTimeout(
            f"{capitalized(where)} did not answer {path} within {limit:g}s.", hint=hints.stuck
        ) from exc
    except httpx.ConnectError as exc:
        raise BackendUnavailable(
            f"Could not connect to {where}: {exc or 'connection refused'}.", hint=hints.reach
        ) from exc
    except httpx.TransportError as exc:
        raise BackendUnavailable(
            f"{capitalized(where)} dropped the connection on {path}: {exc or type(exc).__name__}.",
            hint=hints.reach,
        ) from exc


def read_json(response: httpx.Response, where: str, *, expected: str) -> Any:
    """The body as JSON, or BackendBadResponse (retried: a proxy page, a half-sent body)."""
    try:
        return response.json()
    except ValueError as exc:
        raise BackendBadResponse(
            f"{capitalized(where)} answered HTTP {response.status_code} with a body that is "
            "not JSON.",
            hint=f"Something other than {expected} may be listening on that URL.",
        ) from exc


def timeout_of(limit: float | None, connect: float) -> httpx.Timeout | None:
    """A per-call timeout whose connect part never exceeds the whole."""
    return None if limit is None else httpx.Timeout(limit, connect=min(limit, connect))


def looks_transient(text: str) -> bool:
    """Whether an error text blames the machine (GPU memory, a dropped link), not the request."""
    lowered = text.lower()
    return any(marker in lowered for marker in _TRANSIENT_MARKERS)


def out_of_memory(text: str) -> bool:
    lowered = text.lower().replace(" ", "")
    return any(marker.replace(" ", "") in lowered for marker in _OUT_OF_MEMORY_MARKERS)


def decode_image_base64(value: Any, where: str) -> bytes:
    """An image sent as base64 text (optionally a ``data:`` URL); BackendBadResponse if not."""
    if not isinstance(value, str) or not value:
        raise BackendBadResponse(f"{capitalized(where)} sent an image that is not base64 text.")
    if value.startswith("data:"):
        value = value.split(",", 1)[-1]
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise BackendBadResponse(
            f"{capitalized(where)} sent an image that is not valid base64."
        ) from exc


def proxy_unavailable(
    response: httpx.Response, where: str, *, server: str, hint: str
) -> BackendUnavailable | None:
    """A gateway error page (not the server's own JSON) from a proxy in front of ``where``:
    the server behind it is not reachable (still starting, crashed or stopped)."""
    status = response.status_code
    if status not in (502, 503, 504, 524) or "json" in response.headers.get("content-type", ""):
        return None
    return BackendUnavailable(
        f"The proxy in front of {where} answered HTTP {status}: {server} is not reachable "
        "behind it (still starting, crashed or stopped).",
        hint=hint,
    )


def megabytes(size: int) -> str:
    return f"{size / 2**20:g} MiB"


def guarded_transport(spec: BackendSpec) -> GuardedTransport:
    return GuardedTransport(cap=spec.max_response_bytes, proxy=env_proxy(spec.url))


def backend_http(spec: BackendSpec) -> httpx.Client:
    """The HTTP client of a WebUI backend: its URL, its Basic auth if any, its timeouts, and
    the guard on what it answers (size cap, total deadline per call)."""
    return httpx.Client(
        base_url=spec.url,
        auth=httpx.BasicAuth(*spec.auth) if spec.auth else None,
        timeout=httpx.Timeout(spec.timeout, connect=spec.connect_timeout),
        # Only what the guard can decode with a bound on the output (no br, no zstd).
        headers={"User-Agent": "charforge", "Accept-Encoding": "gzip, deflate"},
        transport=guarded_transport(spec),
    )
