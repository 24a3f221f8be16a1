"""One ComfyUI server over HTTP and its websocket: each call, and its faults as charforge's
errors (``transport`` maps what every backend shares; the HTTP statuses are ComfyUI's own)."""

from __future__ import annotations

import base64
import contextlib
import logging
from typing import Any

import httpx
from websockets.exceptions import InvalidHandshake, InvalidURI
from websockets.sync.client import ClientConnection, connect

from charforge.backends.transport import (
    Hints,
    backend_http,
    capitalized,
    proxy_unavailable,
    read_json,
    send,
    timeout_of,
)
from charforge.domain.routes import BackendSpec
from charforge.errors import BackendAuthFailed, BackendRejected, CharforgeError

log = logging.getLogger(__name__)

STOP_SECONDS = 5.0  # each call that stops a prompt (/queue, /interrupt)
_WS_MAX_BYTES = 32 * 2**20  # previews are small; a larger frame ends the socket, polling goes on


def short(text: object, limit: int = 300) -> str:
    flat = " ".join(str(text).split())
    return flat if len(flat) <= limit else flat[: limit - 1] + "…"


def websocket_url(base: str, client_id: str) -> str:
    scheme, rest = base.rstrip("/").split("://", 1)
    return f"{'wss' if scheme == 'https' else 'ws'}://{rest}/ws?clientId={client_id}"


class ComfyClient:
    def __init__(self, spec: BackendSpec) -> None:
        self.spec = spec
        self.http = backend_http(spec)

    def close(self) -> None:
        self.http.close()

    def where(self, style: str | None) -> str:
        # No URL: messages reach every user, and a pod URL is access to the GPU.
        what = f"the {style} style's ComfyUI backend" if style else "ComfyUI backend"
        return f"{what} '{self.spec.name}'"

    def reach_hint(self) -> str:
        return (
            f"Check that ComfyUI is running and that the url of {self.spec.source} points at "
            "it; GET /api/styles shows which backends answer."
        )

    def call(
        self,
        method: str,
        path: str,
        *,
        style: str | None,
        json_body: Any = None,
        params: dict[str, str] | None = None,
        timeout: float | None = None,
        accept: tuple[int, ...] = (),
        **extra: Any,
    ) -> httpx.Response:
        """One request; an HTTP status in ``accept`` is returned instead of raised. ``extra``
        goes to httpx as is (``files`` and ``data`` of a multipart upload)."""
        where = self.where(style)
        response = send(
            self.http,
            method,
            path,
            where=where,
            connect_timeout=self.spec.connect_timeout,
            limit=timeout or self.spec.timeout,
            hints=Hints(
                reach=self.reach_hint(),
                stuck=f"Check that the ComfyUI behind {self.spec.source} is not stuck.",
            ),
            json=json_body,
            params=params,
            timeout=timeout_of(timeout, self.spec.connect_timeout) or httpx.USE_CLIENT_DEFAULT,
            **extra,
        )
        if response.status_code >= 400 and response.status_code not in accept:
            self._raise_for_status(response, where, path)
        return response

    def _raise_for_status(self, response: httpx.Response, where: str, path: str) -> None:
        status = response.status_code
        if status in (401, 403):
            raise BackendAuthFailed(
                f"{capitalized(where)} refused charforge's credentials (HTTP {status}).",
                hint=(
                    f"Set auth of {self.spec.source} to the user:password of the proxy in "
                    "front of ComfyUI."
                ),
            )
        down = proxy_unavailable(response, where, server="ComfyUI", hint=self.reach_hint())
        if down is not None:
            raise down
        if status == 404:
            raise BackendRejected(
                f"{capitalized(where)} has no route {path} (HTTP 404); is it a ComfyUI server?",
                hint=self.reach_hint(),
            )
        raise BackendRejected(
            f"{capitalized(where)} failed on {path} (HTTP {status}): {short(response.text) or '-'}",
            hint="This is ComfyUI's own answer; its console shows the details.",
            retriable=status >= 500,  # a server fault may pass, or another backend may do it
        )

    @staticmethod
    def json(response: httpx.Response, where: str) -> Any:
        return read_json(response, where, expected="ComfyUI")

    def upload_image(self, data: bytes, name: str, *, style: str | None) -> str:
        """``POST /upload/image`` into the input folder, replacing a file of that name; the
        name ComfyUI stored it under (what ``LoadImage`` takes)."""
        where = self.where(style)
        response = self.call(
            "POST",
            "/upload/image",
            style=style,
            files={"image": (name, data, "image/png")},
            data={"type": "input", "subfolder": "", "overwrite": "true"},
        )
        body = self.json(response, where)
        stored = body.get("name") if isinstance(body, dict) else None
        if not isinstance(stored, str) or not stored:
            raise BackendRejected(
                f"{capitalized(where)} took the upload of {name} but named no file.",
                hint="Something other than ComfyUI may be listening on that URL.",
            )
        subfolder = body.get("subfolder") or ""
        return f"{subfolder}/{stored}" if subfolder else stored

    def control(self, method: str, path: str, body: Any = None) -> httpx.Response | None:
        """One short call that stops a prompt; None (logged) when it failed or was refused."""
        try:
            response = send(
                self.http,
                method,
                path,
                where=self.where(None),
                connect_timeout=self.spec.connect_timeout,
                limit=STOP_SECONDS,
                hints=Hints(reach=self.reach_hint(), stuck=""),
                json=body,
                timeout=timeout_of(STOP_SECONDS, self.spec.connect_timeout),
            )
        except CharforgeError as exc:
            log.warning("backend %s: %s %s failed: %s", self.spec.name, method, path, exc.message)
            return None
        if response.status_code >= 400:
            log.warning(
                "backend %s: %s %s answered HTTP %d: %s",
                self.spec.name,
                method,
                path,
                response.status_code,
                short(response.text, 200),
            )
            return None
        return response

    def open_socket(self, client_id: str, stack: contextlib.ExitStack) -> ClientConnection | None:
        headers = {}
        if self.spec.auth:
            token = base64.b64encode(":".join(self.spec.auth).encode()).decode()
            headers["Authorization"] = f"Basic {token}"
        try:
            # As a context manager: websockets 17.1 deprecates a bare connect().
            return stack.enter_context(
                connect(
                    websocket_url(self.spec.url, client_id),
                    additional_headers=headers,
                    user_agent_header="charforge",
                    open_timeout=self.spec.connect_timeout,
                    close_timeout=1.0,
                    max_size=_WS_MAX_BYTES,
                )
            )
        except (OSError, TimeoutError, InvalidHandshake, InvalidURI) as exc:
            # A proxy without websocket support: the history still tells when it is done.
            log.info("backend %s: no websocket (%s); polling instead", self.spec.name, exc)
            return None
