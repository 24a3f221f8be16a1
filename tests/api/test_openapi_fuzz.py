"""schemathesis over the server's own /openapi.json: no input it can generate from the
document makes a server error, and every status answered is documented with its model."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from tests.api.test_generate import create
from tests.conftest import Live

CHECKS = ",".join(
    (
        "not_a_server_error",
        "status_code_conformance",
        "content_type_conformance",
        "response_schema_conformance",
    )
)


def test_no_server_error_and_no_undocumented_status(live: Live, tmp_path: Path) -> None:
    client = live.user("fuzz")
    create(client, "Sakura")  # so that listing routes answer with data too
    token = live.tokens["fuzz"]
    result = subprocess.run(
        [
            str(Path(sys.executable).with_name("st")),
            "run",
            f"{live.url}/openapi.json",
            "--header",
            f"Authorization: Bearer {token}",
            "--checks",
            CHECKS,
            "--max-examples",
            "20",  # bounded: ~1,500 requests over every operation in about 10 s
            "--generation-deterministic",
            "--workers",
            "1",
            "--no-color",
        ],
        capture_output=True,
        text=True,
        cwd=tmp_path,  # schemathesis keeps a cache folder where it runs
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-2000:]
    assert " passed" in result.stdout
