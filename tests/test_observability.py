"""/healthz, /readyz, /metrics, request ids and structured logs."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from typing import Any

import pytest

from charforge.observability import logs
from charforge.observability.logs import ContextFilter, JsonFormatter
from charforge.simulator import A1111Simulator
from tests.conftest import Live
from tests.helpers import free_port


def test_healthz_and_readyz_when_all_is_well(live: Live) -> None:
    client = live.anonymous()
    assert client.get("/healthz").json()["status"] == "ok"
    ready = client.get("/readyz")
    assert ready.status_code == 200, ready.text
    checks = ready.json()["checks"]
    assert checks["database"]["ok"] and checks["route:realistic"]["healthy"] == ["realistic"]
    assert "broker" not in checks  # embedded mode has none


def test_readyz_says_which_route_has_no_backend(
    live_factory: Any, sims: tuple[A1111Simulator, A1111Simulator]
) -> None:
    live = live_factory(f"http://127.0.0.1:{free_port()}", sims[1].url)
    ready = live.anonymous().get("/readyz")
    assert ready.status_code == 503
    body = ready.json()
    assert body["status"] == "not_ready"
    assert not body["checks"]["route:realistic"]["ok"]
    assert "charforge backends" in body["checks"]["route:realistic"]["hint"]
    assert body["checks"]["route:anime"]["ok"]


def test_metrics_count_jobs_latency_and_retries(
    live_factory: Any, sims: tuple[A1111Simulator, A1111Simulator]
) -> None:
    live = live_factory(sims[0].url, sims[1].url)
    client = live.user("alice")
    character = client.post(
        "/api/characters", json={"name": "Sakura", "artStyle": {"primaryStyle": "anime"}}
    ).json()["id"]
    sims[1].faults.fail_status = 500
    failed = client.post(
        "/api/image-generation/generate", json={"prompt": "x", "characterId": character}
    )
    assert failed.status_code == 502
    sims[1].faults.fail_status = None
    ok = client.post(
        "/api/image-generation/generate", json={"prompt": "y", "characterId": character}
    )
    assert ok.status_code == 200
    text = live.anonymous().get("/metrics").text
    assert 'charforge_jobs{state="succeeded"} 1.0' in text
    assert 'charforge_jobs{state="failed"} 1.0' in text
    assert 'charforge_job_retries_total{code="backend_error"} 2.0' in text  # 3 attempts
    assert (
        'charforge_backend_request_seconds_count{backend="anime-cartoon-fantasy",outcome="succeeded"} 1.0'
        in text
    )
    assert "charforge_queue_depth" in text


def test_request_ids_are_echoed_or_made(live: Live) -> None:
    client = live.anonymous()
    assert (
        client.get("/healthz", headers={"X-Request-ID": "abc-123"}).headers["x-request-id"]
        == "abc-123"
    )
    made = client.get("/healthz", headers={"X-Request-ID": "bad id\twith spaces"}).headers[
        "x-request-id"
    ]
    assert made != "bad id\twith spaces" and len(made) == 32


def test_json_logs_carry_the_job_and_request_ids(caplog: pytest.LogCaptureFixture) -> None:
    record = logging.LogRecord(
        "charforge.jobs", logging.WARNING, __file__, 1, "job %s failed", ("j1",), None
    )
    job_token, request_token = logs.job_id.set("j1"), logs.request_id.set("r1")
    try:
        ContextFilter().filter(record)
    finally:
        logs.job_id.reset(job_token)
        logs.request_id.reset(request_token)
    entry = json.loads(JsonFormatter().format(record))
    assert entry["message"] == "job j1 failed" and entry["level"] == "warning"
    assert entry["job_id"] == "j1" and entry["request_id"] == "r1"


def test_client_libraries_never_log_urls_or_headers_even_at_debug() -> None:
    """httpx logs every URL at INFO (a RunPod result's pre-signed S3 link is a credential) and
    websockets logs request headers at DEBUG (the Basic auth sent to a ComfyUI proxy)."""
    script = """
import http.server, threading, httpx, logging
from charforge.observability.logs import configure_logging
configure_logging("text", "DEBUG")
class Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):  # the test server's own access log is not under test
        pass
server = http.server.HTTPServer(("127.0.0.1", 0), Quiet)
threading.Thread(target=server.serve_forever, daemon=True).start()
url = f"http://127.0.0.1:{server.server_port}/missing?X-Amz-Signature=SECRET1"
httpx.get(url, headers={"Authorization": "Basic SECRET2"})
logging.getLogger("charforge.test").debug("still logged")
"""
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=True
    )
    assert "still logged" in result.stderr
    assert "SECRET" not in result.stderr
