"""HTTP to one A1111/Forge WebUI: one client, its faults mapped to charforge's errors."""

from __future__ import annotations

from typing import Any

import httpx

from charforge.backends.a1111.wire import error_parts, error_text, failure_meaning
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
from charforge.errors import BackendAuthFailed, BackendRejected, BackendTimeout


def auth_setting(spec: BackendSpec) -> str:
    """Where a user sets this backend's credentials."""
    if spec.source.endswith("_URL"):
        return spec.source[: -len("_URL")] + "_AUTH"
    return f"auth of {spec.source}"


class A1111Client:
    def __init__(self, spec: BackendSpec, *, probe_timeout: float) -> None:
        self.spec = spec
        self.probe_timeout = probe_timeout
        self.http = backend_http(spec)

    def close(self) -> None:
        self.http.close()

    def where(self, style: str | None) -> str:
        # No URL: messages reach every user, and a pod URL is access to the GPU.
        what = f"the {style} style's backend" if style else "backend"
        return f"{what} '{self.spec.name}'"

    def reach_hint(self) -> str:
        return (
            f"Check that the A1111/Forge WebUI is running with --api and that {self.spec.source} "
            "points at it; GET /api/styles shows which backends answer."
        )

    def call(
        self,
        method: str,
        path: str,
        *,
        style: str | None,
        json_body: Any = None,
        timeout: float | None = None,
        checkpoint: str | None = None,
    ) -> httpx.Response:
        """One request; an error answer raises. ``checkpoint`` names the model the request
        loads, so that a load failure can say which file is damaged."""
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
                stuck=(
                    f"Check that the WebUI behind {self.spec.source} is not stuck; for slow GPUs "
                    "raise CHARFORGE_BACKEND_TIMEOUT (or timeout_seconds of the backend)."
                ),
            ),
            json=json_body,
            timeout=timeout_of(timeout, self.spec.connect_timeout) or httpx.USE_CLIENT_DEFAULT,
        )
        self._raise_for_status(response, where, path, checkpoint)
        return response

    def json(self, response: httpx.Response, style: str | None) -> Any:
        return read_json(response, self.where(style), expected="the A1111 API")

    def _raise_for_status(
        self, response: httpx.Response, where: str, path: str, checkpoint: str | None
    ) -> None:
        status = response.status_code
        if status < 400:
            return
        if status == 401:
            raise BackendAuthFailed(
                f"{capitalized(where)} refused charforge's credentials (HTTP 401).",
                hint=f"Set {auth_setting(self.spec)} to the user:password given to --api-auth.",
            )
        if status == 524:
            raise BackendTimeout(
                f"The proxy in front of {where} gave up waiting (HTTP 524, RunPod's proxy "
                "stops at 100 s); the WebUI may still be working.",
                hint="Lower steps or size, or reach the pod directly instead of through the proxy.",
            )
        down = proxy_unavailable(response, where, server="the WebUI", hint=self.reach_hint())
        if down is not None:
            raise down
        if status == 404 and path.startswith("/sdapi"):
            raise BackendRejected(
                f"{capitalized(where)} has no API route {path} (HTTP 404).",
                hint="Start the WebUI with the --api flag.",
            )
        kind, message = error_parts(response)
        if status >= 500:
            meaning = failure_meaning(
                kind, message, where=where, checkpoint=checkpoint, source=self.spec.source
            )
            if meaning is not None:
                raise meaning
        raise BackendRejected(
            f"{capitalized(where)} failed (HTTP {status}): {message}",
            hint="This is the WebUI's own error message; its console shows the details.",
            retriable=status >= 500,  # a server fault may pass, or another backend may do it
        )


__all__ = ["A1111Client", "auth_setting", "error_text"]
