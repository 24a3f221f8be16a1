"""The HTTP transport of every backend client: a backend cannot hurt the server.

- Size: an answer is read chunk by chunk and stopped once it passes the cap (counted after
  gzip/deflate are undone, with a bound on each decompression step, so a zip bomb is stopped
  too); a Content-Length over the cap is refused before any of the body is read.
- Time: a call's read timeout is its total deadline. httpx applies it per socket read, so a
  backend dripping one byte every few seconds would hold a call for ever; here every socket
  read, write and TLS step gets only what is left of the deadline (headers included), and
  the body's chunks are checked against it as they come.

The deadline lives in a thread-local set around each step: sync httpx does all of a call's
I/O in the caller's thread.
"""

from __future__ import annotations

import threading
import time
import urllib.request
import zlib
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any
from urllib.parse import urlsplit

import httpcore
import httpx

_STEP = 2**20  # the most one decompression step makes (a larger one doubles its buffer)


class ResponseTooLarge(httpx.DecodingError):
    """The answer passed the cap; what was read of it is dropped."""

    def __init__(self, cap: int) -> None:
        super().__init__(f"the answer is larger than {cap} bytes")
        self.cap = cap


class _Deadline(threading.local):
    at: float | None = None


_deadline = _Deadline()


@contextmanager
def _until(at: float | None) -> Iterator[None]:
    previous = _deadline.at
    _deadline.at = at
    try:
        yield
    finally:
        _deadline.at = previous


def _left(timeout: float | None, error: type[Exception]) -> float | None:
    """The timeout for one socket step: what the step allows, at most what the call has left."""
    at = _deadline.at
    if at is None:
        return timeout
    left = at - time.monotonic()
    if left <= 0:
        raise error("the call's total deadline passed")
    return left if timeout is None else min(timeout, left)


class _DeadlineStream(httpcore.NetworkStream):
    def __init__(self, inner: httpcore.NetworkStream) -> None:
        self._inner = inner

    def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        return self._inner.read(max_bytes, _left(timeout, httpcore.ReadTimeout))

    def write(self, buffer: bytes, timeout: float | None = None) -> None:
        self._inner.write(buffer, _left(timeout, httpcore.WriteTimeout))

    def close(self) -> None:
        self._inner.close()

    def start_tls(
        self,
        ssl_context: Any,
        server_hostname: str | None = None,
        timeout: float | None = None,
    ) -> httpcore.NetworkStream:
        wait = _left(timeout, httpcore.ConnectTimeout)
        return _DeadlineStream(self._inner.start_tls(ssl_context, server_hostname, wait))

    def get_extra_info(self, info: str) -> Any:
        return self._inner.get_extra_info(info)


class _DeadlineBackend(httpcore.NetworkBackend):
    def __init__(self) -> None:
        self._inner = httpcore.SyncBackend()

    def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Iterable[Any] | None = None,
    ) -> httpcore.NetworkStream:
        wait = _left(timeout, httpcore.ConnectTimeout)
        return _DeadlineStream(
            self._inner.connect_tcp(host, port, wait, local_address, socket_options)
        )

    def connect_unix_socket(
        self, path: str, timeout: float | None = None, socket_options: Iterable[Any] | None = None
    ) -> httpcore.NetworkStream:
        wait = _left(timeout, httpcore.ConnectTimeout)
        return _DeadlineStream(self._inner.connect_unix_socket(path, wait, socket_options))

    def sleep(self, seconds: float) -> None:
        self._inner.sleep(seconds)


def env_proxy(url: str) -> str | None:
    """The proxy the environment sets for ``url`` (HTTP(S)_PROXY, ALL_PROXY, NO_PROXY), as
    httpx would pick it without a transport of its own."""
    parts = urlsplit(url)
    if not parts.hostname or urllib.request.proxy_bypass(parts.hostname):
        return None
    proxies = urllib.request.getproxies()
    return proxies.get(parts.scheme) or proxies.get("all")


class GuardedTransport(httpx.BaseTransport):
    def __init__(self, *, cap: int, proxy: str | None = None) -> None:
        self.cap = cap
        self._inner = httpx.HTTPTransport(proxy=proxy)
        pool = getattr(self._inner, "_pool", None)
        # Every pool kind (direct, HTTP or SOCKS proxy) is a ConnectionPool.
        if isinstance(pool, httpcore.ConnectionPool):
            pool._network_backend = _DeadlineBackend()

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        total = request.extensions.get("timeout", {}).get("read")
        at = None if total is None else time.monotonic() + total
        with _until(at):
            response = self._inner.handle_request(request)
        declared = response.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > self.cap:
            response.close()
            raise ResponseTooLarge(self.cap)
        encoding = response.headers.get("content-encoding", "identity").strip().lower()
        if encoding not in ("identity", "", "gzip", "deflate"):
            response.close()
            raise httpx.DecodingError(f"the answer uses Content-Encoding {encoding!r}")
        # Decoded here, with a bound: httpx must not decode it again, without one.
        headers = [
            (key, value)
            for key, value in response.headers.multi_items()
            if key.lower() not in ("content-encoding", "content-length")
            or encoding in ("identity", "")
        ]
        stream = response.stream
        assert isinstance(stream, httpx.SyncByteStream)
        return httpx.Response(
            status_code=response.status_code,
            headers=headers,
            stream=_CappedStream(stream, self.cap, at, encoding in ("gzip", "deflate")),
            extensions=response.extensions,
        )

    def close(self) -> None:
        self._inner.close()


class _CappedStream(httpx.SyncByteStream):
    def __init__(
        self, inner: httpx.SyncByteStream, cap: int, at: float | None, compressed: bool
    ) -> None:
        self._inner = inner
        self._cap = cap
        self._at = at
        # 32 + MAX_WBITS takes a gzip or a zlib header, as httpx's decoders do.
        self._decoder = zlib.decompressobj(32 + zlib.MAX_WBITS) if compressed else None
        self._seen = 0

    def __iter__(self) -> Iterator[bytes]:
        self._seen = 0
        chunks = iter(self._inner)
        while True:
            with _until(self._at):
                chunk = next(chunks, None)
            if chunk is None:
                break
            if self._at is not None and time.monotonic() > self._at:
                raise httpx.ReadTimeout("the call's total deadline passed")
            for piece in self._decode(chunk):
                self._seen += len(piece)
                if self._seen > self._cap:
                    raise ResponseTooLarge(self._cap)
                if piece:
                    yield piece
        if self._decoder is not None:
            tail = self._decoder.flush()
            if self._seen + len(tail) > self._cap:
                raise ResponseTooLarge(self._cap)
            yield tail

    def _decode(self, chunk: bytes) -> Iterator[bytes]:
        if self._decoder is None:
            yield chunk
            return
        data = chunk
        try:
            while data:
                # Small steps, never past the cap by more than a byte: a bomb stops there.
                room = min(self._cap - self._seen + 1, _STEP)
                yield self._decoder.decompress(data, max(room, 1))
                data = self._decoder.unconsumed_tail
        except zlib.error as exc:
            raise httpx.DecodingError(f"the compressed answer is damaged: {exc}") from exc

    def close(self) -> None:
        self._inner.close()
