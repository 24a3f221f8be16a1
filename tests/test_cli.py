"""The command line, run as a user runs it: real processes, real HTTP."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from PIL import Image

from charforge.simulator import A1111Simulator
from tests.fakes.comfyui import FakeComfyUI
from tests.fakes.runpod import RunPodFake
from tests.helpers import free_port

CHARFORGE = [sys.executable, "-m", "charforge"]


def run(
    args: list[str], env: dict[str, str], stdin: str | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*CHARFORGE, *args],
        input=stdin,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


@pytest.fixture
def cli_env(
    tmp_path: Path, database_url: str, sims: tuple[A1111Simulator, A1111Simulator]
) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CHARFORGE_", "RUNPOD_"))}
    env.update(
        CHARFORGE_DATA_DIR=str(tmp_path / "data"),
        CHARFORGE_DATABASE_URL=database_url,
        RUNPOD_REALISTIC_URL=sims[0].url,
        RUNPOD_ANIME_CARTOON_FANTASY_URL=sims[1].url,
    )
    return env


def test_users_tokens_characters_and_generate(
    cli_env: dict[str, str], tmp_path: Path, sims: tuple[A1111Simulator, A1111Simulator]
) -> None:
    added = run(
        ["users", "add", "alice", "--admin", "--password-stdin"], cli_env, "correct horse battery\n"
    )
    assert added.returncode == 0, added.stderr
    assert "created admin alice" in added.stdout

    again = run(["users", "add", "alice", "--password-stdin"], cli_env, "another password\n")
    assert again.returncode == 1 and "already exists" in again.stderr
    short = run(["users", "add", "bob", "--password-stdin"], cli_env, "short\n")
    assert short.returncode == 1 and "at least 8" in short.stderr

    token = run(["tokens", "create", "alice"], cli_env)
    assert token.returncode == 0, token.stderr
    last_line = token.stdout.strip().splitlines()[-1]
    assert re.fullmatch(r"cf_[A-Za-z0-9_-]{40,}", last_line)
    assert run(["tokens", "create", "nobody"], cli_env).returncode == 1

    made = run(
        [
            "characters",
            "add",
            "Alex",
            "--user",
            "alice",
            "--style",
            "realistic",
            "--appearance",
            "short brown hair",
        ],
        cli_env,
    )
    assert made.returncode == 0, made.stderr
    assert "cyberrealistic.safetensors" in made.stdout

    out = tmp_path / "alex.png"
    generated = run(
        [
            "generate",
            "--character",
            "Alex",
            "--prompt",
            "Alex on a mountain peak at sunset",
            "--negative",
            "blurry",
            "--out",
            str(out),
        ],
        cli_env,
    )
    assert generated.returncode == 0, generated.stderr
    assert "realistic · cyberrealistic.safetensors" in generated.stdout
    with Image.open(out) as png:
        assert png.size == (768, 1152)
        assert "Alex on a mountain peak at sunset" in png.info["parameters"]
    body = sims[0].txt2img_bodies()[-1]
    assert body["negative_prompt"].startswith("blurry") and body["steps"] == 25

    missing = run(["generate", "--character", "Nobody", "--prompt", "x"], cli_env)
    assert missing.returncode == 1 and "No character named" in missing.stderr

    sims[0].faults.fail_status = 500
    failed = run(["generate", "--character", "Alex", "--prompt", "x"], cli_env)
    assert failed.returncode == 1 and "failed" in failed.stderr and "Traceback" not in failed.stderr


def test_bad_settings_are_reported_not_traced(cli_env: dict[str, str]) -> None:
    env = {**cli_env, "CHARFORGE_CONFIG": "/no/such.toml"}
    result = run(["users", "list"], env)
    assert (
        result.returncode == 2
        and "CHARFORGE_CONFIG" in result.stderr
        and "Traceback" not in result.stderr
    )
    env = {**cli_env, "RUNPOD_REALISTIC_URL": "not-a-url"}
    result = run(["users", "list"], env)
    assert result.returncode == 2 and "RUNPOD_REALISTIC_URL" in result.stderr
    env = {**cli_env, "CHARFORGE_DATABASE_URL": "postgresql://nobody@127.0.0.1:1/none"}
    result = run(["users", "list"], env)
    assert result.returncode == 2, result.stderr
    assert "Cannot open the database" in result.stderr and "CHARFORGE_DATABASE_URL" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.fixture
def process_cleanup() -> Iterator[list[subprocess.Popen[str]]]:
    procs: list[subprocess.Popen[str]] = []
    yield procs
    for proc in procs:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        for stream in (proc.stdout, proc.stderr):
            if stream:
                stream.close()


def _wait_http(url: str, proc: subprocess.Popen[str]) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"process exited: {proc.stderr.read() if proc.stderr else ''}")
        try:
            httpx.get(url, timeout=1)
            return
        except httpx.TransportError:
            time.sleep(0.2)
    raise AssertionError(f"{url} did not come up")


def test_simulate_a1111_runs_standalone(process_cleanup: list[subprocess.Popen[str]]) -> None:
    port = free_port()
    proc = subprocess.Popen(
        [
            *CHARFORGE,
            "simulate-a1111",
            "--port",
            str(port),
            "--models",
            "a.safetensors,b.safetensors",
            "--delay",
            "0.5",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    process_cleanup.append(proc)
    base = f"http://127.0.0.1:{port}"
    _wait_http(f"{base}/sdapi/v1/sd-models", proc)
    titles = [m["title"] for m in httpx.get(f"{base}/sdapi/v1/sd-models").json()]
    assert [t.split(" [")[0] for t in titles] == ["a.safetensors", "b.safetensors"]
    # --delay paces each generation; the faults endpoint changes it at run time.
    assert httpx.get(f"{base}/_simulator/faults").json()["delay_seconds"] == 0.5
    body = {"prompt": "x", "steps": 2, "width": 64, "height": 64}
    started = time.monotonic()
    assert httpx.post(f"{base}/sdapi/v1/txt2img", json=body, timeout=30).status_code == 200
    assert time.monotonic() - started >= 0.5
    httpx.post(f"{base}/_simulator/faults", json={"delay_seconds": 0}).raise_for_status()
    started = time.monotonic()
    assert httpx.post(f"{base}/sdapi/v1/txt2img", json=body, timeout=30).status_code == 200
    assert time.monotonic() - started < 0.5


def test_serve_demo_is_a_working_sandbox(
    tmp_path: Path, process_cleanup: list[subprocess.Popen[str]]
) -> None:
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CHARFORGE_", "RUNPOD_"))}
    env["CHARFORGE_DATA_DIR"] = str(tmp_path / "demo-data")
    proc = subprocess.Popen(
        [*CHARFORGE, "serve", "--demo", "--port", str(port)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    process_cleanup.append(proc)
    base = f"http://127.0.0.1:{port}"
    _wait_http(f"{base}/healthz", proc)
    # The token is printed on the line after "with API token:".
    output = ""
    assert proc.stderr is not None
    while "cf_" not in output:
        output += proc.stderr.readline()
    token = re.search(r"(cf_[A-Za-z0-9_-]+)", output).group(1)  # type: ignore[union-attr]

    page = httpx.get(base + "/", follow_redirects=True)
    assert page.url.path == "/login"  # the demo account exists, so: sign in
    assert "Demo mode: images come from the built-in A1111 simulator" in page.text
    assert page.headers["x-charforge-simulated"] == "true"
    with httpx.Client(
        base_url=base, headers={"Authorization": f"Bearer {token}"}, timeout=60
    ) as client:
        styles = client.get("/api/styles").json()
        assert all(s["available"] and s["simulated"] for s in styles)
        sakura = client.post(
            "/api/characters", json={"name": "Sakura", "artStyle": {"primaryStyle": "anime"}}
        ).json()
        result = client.post(
            "/api/image-generation/generate",
            json={
                "prompt": "Sakura in a red evening dress at a ballroom",
                "characterId": sakura["id"],
            },
        )
        assert result.status_code == 200, result.text
        assert result.json()["simulated"] is True
        image = client.get(f"/api/images/{result.json()['images'][0]['id']}").json()
        assert image["simulated"] is True


def _tables(stdout: str) -> list[list[list[str]]]:
    """Each Rich table printed: its header row (┃) then its rows (│)."""
    tables: list[list[list[str]]] = []
    for line in stdout.splitlines():
        if "┃" in line:
            tables.append([])
        if ("│" in line or "┃" in line) and tables:
            tables[-1].append([cell.strip() for cell in re.split("[│┃]", line)[1:-1]])
    return tables


def _table_rows(stdout: str) -> list[list[str]]:
    return _tables(stdout)[0]


def test_backends_check_shows_kind_health_checkpoint_hash_and_loaded_model(
    cli_env: dict[str, str], sims: tuple[A1111Simulator, A1111Simulator]
) -> None:
    result = run(["backends", "check"], {**cli_env, "COLUMNS": "250"})
    assert result.returncode == 0, result.stderr
    header, *rows = _table_rows(result.stdout)
    assert header[:8] == [
        "route",
        "checkpoint",
        "backend",
        "kind",
        "reachable",
        "latency",
        "present",
        "hash",
    ]
    by_backend = {row[2]: dict(zip(header, row, strict=True)) for row in rows}
    realistic = by_backend["realistic"]
    assert realistic["kind"] == "a1111"
    assert realistic["reachable"] == "up"
    assert realistic["present"] == "yes"
    assert realistic["loaded"] == "cyberrealistic.safetensors"
    listed = httpx.get(f"{sims[0].url}/sdapi/v1/sd-models").json()
    expected_hash = next(m["hash"] for m in listed if m["title"].startswith("cyberrealistic"))
    assert realistic["hash"] == expected_hash
    assert by_backend["anime-cartoon-fantasy"]["loaded"] == "diving.safetensors"
    # Then each backend once, with the routes it serves.
    header, *rows = _tables(result.stdout)[1]
    servers = {row[0]: dict(zip(header, row, strict=True)) for row in rows}
    assert sorted(servers) == ["anime-cartoon-fantasy", "realistic"]
    assert servers["realistic"]["serves"] == "realistic"
    assert servers["anime-cartoon-fantasy"]["serves"] == "anime, cartoon, fantasy"
    # Neither stand-in has the ControlNet extension: no identity conditioning on them.
    assert servers["realistic"]["identity"] == "none (no ControlNet / IPAdapter)"


def test_backends_check_shows_how_a_backend_conditions_on_references(
    cli_env: dict[str, str], sims: tuple[A1111Simulator, A1111Simulator]
) -> None:
    saved = sims[0].settings
    sims[0].settings = dataclasses.replace(saved, controlnet=True)
    try:
        result = run(["backends", "check", "--json"], {**cli_env, "COLUMNS": "250"})
        table = run(["backends", "check"], {**cli_env, "COLUMNS": "250"})
    finally:
        sims[0].settings = saved
    assert result.returncode == 0, result.stderr
    by_name = {b["name"]: b for route in json.loads(result.stdout) for b in route["backends"]}
    assert "reference_image" in by_name["realistic"]["capabilities"]
    assert by_name["realistic"]["identity_method"] == "controlnet reference_only"
    assert "reference_image" not in by_name["anime-cartoon-fantasy"]["capabilities"]
    header, *rows = _tables(table.stdout)[1]
    servers = {row[0]: dict(zip(header, row, strict=True)) for row in rows}
    assert servers["realistic"]["identity"] == "controlnet reference_only"


def test_backends_check_shows_one_webui_named_by_both_variables_once(
    cli_env: dict[str, str], sims: tuple[A1111Simulator, A1111Simulator]
) -> None:
    both = {**cli_env, "COLUMNS": "250", "RUNPOD_ANIME_CARTOON_FANTASY_URL": sims[0].url + "/"}
    result = run(["backends", "check", "--json"], both)
    assert result.returncode == 1  # the one WebUI has no diving.safetensors
    report = json.loads(result.stdout)
    names = {b["name"] for route in report for b in route["backends"]}
    assert names == {"realistic"}
    realistic = report[0]["backends"][0]
    assert realistic["aliases"] == ["anime-cartoon-fantasy"]
    assert realistic["routes"] == ["anime", "cartoon", "fantasy", "realistic"]
    result = run(["backends", "check"], both)
    _header, *rows = _tables(result.stdout)[1]
    assert [row[:2] for row in rows] == [["realistic", "anime-cartoon-fantasy"]]


def test_backends_check_exits_1_for_a_dead_route_and_for_a_missing_checkpoint(
    cli_env: dict[str, str], tmp_path: Path
) -> None:
    dead = {**cli_env, "COLUMNS": "250", "RUNPOD_REALISTIC_URL": f"http://127.0.0.1:{free_port()}"}
    result = run(["backends"], dead)  # the bare command still runs the check
    assert result.returncode == 1
    assert "down" in result.stdout
    assert "no working backend for: realistic" in result.stderr
    assert "RUNPOD_*_URL / [backends] entry" in " ".join(result.stderr.split())

    config = tmp_path / "charforge.toml"
    config.write_text('[routes.anime]\ncheckpoint = "nothere.safetensors"\n')
    result = run(["backends", "check", "--json"], {**cli_env, "CHARFORGE_CONFIG": str(config)})
    assert result.returncode == 1
    assert "no working backend for: anime" in result.stderr
    report = {entry["route"]: entry for entry in json.loads(result.stdout)}
    assert report["anime"]["working"] is False
    (anime,) = report["anime"]["backends"]
    assert anime["reachable"] is True
    assert anime["checkpoint_present"] is False
    assert report["realistic"]["working"] is True
    assert report["realistic"]["backends"][0]["checkpoint_present"] is True


def test_backends_check_covers_comfyui_runpod_and_local_backends(
    cli_env: dict[str, str], tmp_path: Path
) -> None:
    models = tmp_path / "models"
    (models / "sd15").mkdir(parents=True)
    (models / "sd15" / "fae.safetensors").write_bytes(b"{}")  # listed by name; never loaded
    with FakeComfyUI(["anime/diving.safetensors"]) as comfy, RunPodFake(api_key="k-1") as runpod:
        config = tmp_path / "charforge.toml"
        config.write_text(
            f"""
[backends.comfy]
kind = "comfyui"
url = "{comfy.url}"

[backends.rp]
kind = "runpod"
url = "{runpod.url_for_endpoint}"
worker = "comfyui"
api_key_env = "CF_TEST_RUNPOD_KEY"

[backends.loc]
kind = "local"
models_dir = "{models}"

[routes.anime]
backends = ["comfy"]

[routes.fantasy]
checkpoint = "fae.safetensors"
backends = ["loc"]

[routes.realistic]
backends = ["rp"]
"""
        )
        env = {**cli_env, "CHARFORGE_CONFIG": str(config), "CF_TEST_RUNPOD_KEY": "k-1"}
        result = run(["backends", "check", "--json"], env)
        assert result.returncode == 0, result.stderr
        report = {entry["route"]: entry for entry in json.loads(result.stdout)}
        (comfy_row,) = report["anime"]["backends"]
        assert comfy_row["kind"] == "comfyui" and comfy_row["reachable"] is True
        assert comfy_row["checkpoint_present"] is True and comfy_row["latency_ms"] is not None
        (rp_row,) = report["realistic"]["backends"]
        assert rp_row["kind"] == "runpod (comfyui worker)" and rp_row["reachable"] is True
        # RunPod cannot list a worker's models: unknown, not missing, so the route works.
        assert rp_row["checkpoint_present"] is None and report["realistic"]["working"] is True
        assert any(seen.path.endswith("/health") for seen in runpod.requests)
        (local_row,) = report["fantasy"]["backends"]
        assert local_row["kind"] == "local" and local_row["reachable"] is True
        assert local_row["checkpoint_present"] is True

        result = run(["backends", "check", "--json"], {**env, "CF_TEST_RUNPOD_KEY": "wrong"})
        assert result.returncode == 1
        assert "no working backend for: realistic" in result.stderr
        report = {entry["route"]: entry for entry in json.loads(result.stdout)}
        (rp_row,) = report["realistic"]["backends"]
        assert rp_row["reachable"] is False and "CF_TEST_RUNPOD_KEY" in rp_row["error"]

        (models / "sd15" / "fae.safetensors").unlink()
        result = run(["backends", "check", "--json"], env)
        assert result.returncode == 1
        assert "no working backend for: fantasy" in result.stderr


def test_backends_check_reads_at_80_columns(
    cli_env: dict[str, str], sims: tuple[A1111Simulator, A1111Simulator]
) -> None:
    """Piped or narrow: one fact per line instead of a table squeezed into unreadable cells."""
    result = run(["backends", "check"], {**cli_env, "COLUMNS": "80"})
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert all(len(line) <= 80 for line in lines), lines
    assert "┃" not in result.stdout
    assert "route realistic: checkpoint cyberrealistic.safetensors" in lines
    assert "  backend realistic (a1111): up" in lines
    assert "    loaded cyberrealistic.safetensors" in lines, result.stdout
    assert any(line.startswith("  anime-cartoon-fantasy (a1111): serves anime") for line in lines)


def test_commands_that_read_users_never_create_an_empty_database(
    cli_env: dict[str, str], tmp_path: Path
) -> None:
    empty = tmp_path / "elsewhere"
    env = {**cli_env, "CHARFORGE_DATA_DIR": str(empty), "COLUMNS": "400"}
    env.pop("CHARFORGE_DATABASE_URL", None)
    for args in (
        ["users", "list"],
        ["tokens", "create", "alice"],
        ["characters", "list", "--user", "alice"],
    ):
        result = run(args, env)
        assert result.returncode == 2, (args, result.stdout, result.stderr)
        assert f"No charforge database at {empty / 'charforge.db'}" in result.stderr
        assert "CHARFORGE_DATA_DIR" in result.stderr and "No user named" not in result.stderr
    assert not (empty / "charforge.db").exists()
    # Without the operator's environment at all: it says which defaults it looked at.
    bare = {k: v for k, v in env.items() if k != "CHARFORGE_DATA_DIR"}
    result = subprocess.run(
        [*CHARFORGE, "users", "list"], env=bare, cwd=tmp_path, capture_output=True, text=True
    )
    assert result.returncode == 2 and "are not set" in result.stderr
    assert not (tmp_path / "data" / "charforge.db").exists()
    # The command that starts a new install still creates it.
    added = run(["users", "add", "alice", "--password-stdin"], env, "correct horse battery\n")
    assert added.returncode == 0, added.stderr
    assert run(["users", "list"], env).returncode == 0


def test_a_worker_stops_on_an_unreachable_broker_or_an_unknown_checkpoint(
    cli_env: dict[str, str],
) -> None:
    env = {
        **cli_env,
        "COLUMNS": "400",
        "CHARFORGE_BROKER_URL": f"redis://127.0.0.1:{free_port()}/0",
        "CHARFORGE_BROKER_WAIT_SECONDS": "1",
    }
    started = time.monotonic()
    result = run(["worker"], env)
    assert result.returncode == 2, result.stderr
    assert time.monotonic() - started < 30
    assert "Cannot reach the broker" in result.stderr and "CHARFORGE_BROKER_URL" in result.stderr
    assert "Traceback" not in result.stderr
    result = run(["worker", "--checkpoints", "nosuch.safetensors,diving"], env)
    assert result.returncode == 2
    assert "--checkpoints names nosuch.safetensors, which no route serves" in result.stderr
    assert "cyberrealistic.safetensors, diving.safetensors" in result.stderr


def test_backends_check_checks_the_broker_and_the_workers(
    cli_env: dict[str, str], redis_url: str
) -> None:
    from charforge.jobs.heartbeat import Heartbeat

    env = {**cli_env, "COLUMNS": "250", "CHARFORGE_BROKER_URL": redis_url}
    alone = run(["backends", "check"], env)
    assert alone.returncode == 1
    assert "broker: up" in alone.stderr and "workers: none alive" in alone.stderr
    assert "no live worker consumes charforge.ckpt." in alone.stderr
    queues = ["charforge.ckpt.cyberrealistic", "charforge.ckpt.diving", "charforge.other"]
    beat = Heartbeat(redis_url, "w1", queues, 2)
    beat.start()
    try:
        served = run(["backends", "check"], env)
        assert served.returncode == 0, served.stderr
        assert "worker w1" in served.stderr
    finally:
        beat.stop()
    away = {**env, "CHARFORGE_BROKER_URL": f"redis://127.0.0.1:{free_port()}/0"}
    result = run(["backends", "check"], away)
    assert result.returncode == 1 and "the broker does not answer" in result.stderr
    assert "CHARFORGE_BROKER_URL" in result.stderr


def test_a_cli_generation_in_distributed_mode_is_not_taken_for_a_dead_worker(
    cli_env: dict[str, str],
    redis_url: str,
    sims: tuple[A1111Simulator, A1111Simulator],
    tmp_path: Path,
) -> None:
    """`charforge generate` runs its job in its own process; with a broker set, a server's
    sweeper must see it alive (it sends heartbeats) and leave its running job alone."""
    from charforge.config import Settings
    from charforge.container import build_container

    env = {**cli_env, "CHARFORGE_BROKER_URL": redis_url}
    assert (
        run(
            ["users", "add", "alice", "--password-stdin"], env, "correct horse battery\n"
        ).returncode
        == 0
    )
    made = run(["characters", "add", "Sakura", "--user", "alice", "--style", "anime"], env)
    assert made.returncode == 0, made.stderr
    sims[1].faults.delay_seconds = 3.0
    proc = subprocess.Popen(
        [*CHARFORGE, "generate", "--character", "Sakura", "--prompt", "x", "--user", "alice"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    server = build_container(
        Settings(
            data_dir=Path(env["CHARFORGE_DATA_DIR"]),
            database_url=env["CHARFORGE_DATABASE_URL"],
            broker_url=redis_url,
            runpod_realistic_url=sims[0].url,
            runpod_anime_cartoon_fantasy_url=sims[1].url,
        )
    )
    try:
        deadline = time.monotonic() + 20
        while sims[1].current_task is None:  # the CLI's job is running on the WebUI
            assert time.monotonic() < deadline and proc.poll() is None, proc.stderr
            time.sleep(0.05)
        moved, _ = server.queue._sweeper.sweep()
        assert moved == 0
        out, errors = proc.communicate(timeout=60)
        assert proc.returncode == 0, errors
        assert out.strip().endswith(".png")
    finally:
        sims[1].faults.delay_seconds = 0
        server.close()
        if proc.poll() is None:
            proc.kill()
        proc.communicate()  # closes its pipes
