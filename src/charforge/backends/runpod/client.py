"""RunPod's serverless API for one endpoint: each call with its key and its faults, and the
pacing of polls and rate-limit waits.

Facts (docs.runpod.io "Send API requests"): the key goes in ``Authorization: Bearer``; HTTP
429 (queue full, rate limit) is to be backed off, with ``Retry-After`` when it is given.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from email.utils import parsedate_to_datetime
from typing import Any

import httpx

from charforge.backends.a1111 import error_text
from charforge.backends.transport import Hints, guarded_transport, read_json, send, timeout_of
from charforge.domain.routes import BackendSpec
from charforge.errors import BackendAuthFailed, BackendRejected, BackendTimeout

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Pacing:
    """How often and how long to wait; tests shrink it."""

    first_poll: float = 0.5  # seconds from /run to the first /status
    growth: float = 1.5  # each pause is this much longer than the one before ...
    longest_poll: float = 4.0  # ... up to this
    rate_limited: float = 1.0  # first pause after a 429 without Retry-After; doubles
    longest_rate_limited: float = 30.0
    call_timeout: float = 30.0  # one HTTP call; the whole job is bounded by spec.timeout
    poll_failures: int = 5  # failed polls in a row (5xx, dropped connection) before giving up


DEFAULT_PACING = Pacing()


class RunPodClient:
    def __init__(self, spec: BackendSpec, pacing: Pacing) -> None:
        self.spec = spec
        self.pacing = pacing
        # No credentials on the client: the key is read from the environment per call, and
        # an absolute URL (a worker's S3 link) must never receive it.
        self.http = httpx.Client(
            base_url=spec.url,
            timeout=httpx.Timeout(pacing.call_timeout, connect=spec.connect_timeout),
            headers={"User-Agent": "charforge", "Accept-Encoding": "gzip, deflate"},
            transport=guarded_transport(spec),  # size cap, total deadline per call
        )

    @property
    def key_var(self) -> str:
        return self.spec.api_key_env or "RUNPOD_API_KEY"

    def close(self) -> None:
        self.http.close()

    def where(self, style: str | None) -> str:
        # No URL: messages reach every user.
        what = f"the {style} style's backend" if style else "backend"
        return f"{what} '{self.spec.name}'"

    def auth(self) -> dict[str, str]:
        """The bearer header, from the environment at call time (never from a file)."""
        key = os.environ.get(self.key_var, "").strip()
        if not key:
            raise BackendAuthFailed(
                f"Backend '{self.spec.name}' has no RunPod API key: the environment variable "
                f"{self.key_var} is not set.",
                hint=(
                    f"Set {self.key_var} in the environment of the charforge server and workers "
                    "(the key is read only from the environment), or name another variable "
                    f"with api_key_env in {self.spec.source}."
                ),
            )
        return {"Authorization": f"Bearer {key}"}

    def call(
        self, method: str, path: str, *, style: str, deadline: float, body: Any = None
    ) -> httpx.Response:
        """One API call. A 429 is waited out (Retry-After when given, else a doubling pause)
        and tried again as long as the deadline allows."""
        pause = self.pacing.rate_limited
        while True:
            response = self._send(method, path, style=style, deadline=deadline, body=body)
            if response.status_code != 429:
                self.raise_for_status(response, path, style)
                return response
            wait = _retry_after(response)
            if wait is None:
                wait = pause
            pause = min(pause * 2, self.pacing.longest_rate_limited)
            if time.monotonic() + wait >= deadline:
                raise BackendTimeout(
                    f"RunPod kept answering HTTP 429 (too many requests) for {self.where(style)} "
                    f"until its {self.spec.timeout:g}s were up.",
                    hint="The endpoint's queue is full or its rate limit reached: add workers, "
                    "or send fewer jobs at once.",
                )
            log.info("backend %s: HTTP 429 on %s, waiting %.1fs", self.spec.name, path, wait)
            time.sleep(wait)

    def _send(
        self, method: str, path: str, *, style: str, deadline: float, body: Any
    ) -> httpx.Response:
        where = self.where(style)
        limit = max(min(self.pacing.call_timeout, deadline - time.monotonic()), 0.1)
        return send(
            self.http,
            method,
            path,
            where=where,
            connect_timeout=self.spec.connect_timeout,
            limit=limit,
            hints=Hints(reach=self.reach_hint(), stuck=self.reach_hint()),
            json=body,
            headers=self.auth(),
            timeout=timeout_of(limit, self.spec.connect_timeout),
        )

    def reach_hint(self) -> str:
        return (
            f"Check network access to RunPod and that {self.spec.source} has the endpoint's "
            "URL (https://api.runpod.ai/v2/ENDPOINT_ID); GET /api/styles shows which backends "
            "answer."
        )

    def raise_for_status(self, response: httpx.Response, path: str, style: str | None) -> None:
        status = response.status_code
        if status < 400:
            return
        where = self.where(style)
        if status in (401, 403):
            raise BackendAuthFailed(
                f"RunPod refused the API key in {self.key_var} for {where} (HTTP {status}).",
                hint=f"Put a current RunPod API key with access to this endpoint into "
                f"{self.key_var} (RunPod console: Settings, API Keys).",
            )
        if status == 404 and path.startswith("/status/"):
            raise BackendRejected(
                f"RunPod no longer knows the job of {where} (HTTP 404); its result may have "
                "expired.",
                retriable=True,  # submitting it again may work
            )
        if status == 404:
            raise BackendRejected(
                f"RunPod has no endpoint behind {where} (HTTP 404 on {path}).",
                hint=f"Check the endpoint ID in the url of {self.spec.source} "
                "(https://api.runpod.ai/v2/ENDPOINT_ID).",
            )
        raise BackendRejected(
            f"RunPod answered HTTP {status} on {path} for {where}: {error_text(response)}",
            hint="RunPod's status page and the endpoint's logs in the console show more.",
            retriable=status >= 500,  # RunPod's own fault may pass
        )

    @staticmethod
    def json(response: httpx.Response, where: str) -> Any:
        return read_json(response, where, expected="the RunPod API")


def _retry_after(response: httpx.Response) -> float | None:
    """Retry-After in seconds (a number or an HTTP date), when the answer has one."""
    value = response.headers.get("retry-after", "").strip()
    if not value:
        return None
    try:
        return max(float(value), 0.0)
    except ValueError:
        pass
    try:
        return max(parsedate_to_datetime(value).timestamp() - time.time(), 0.0)
    except (TypeError, ValueError):
        return None
