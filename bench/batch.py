"""Batch throughput against the A1111 stand-in: one batch of N prompts over real HTTP to an
embedded charforge whose anime route is a pool of two simulators, each taking ``--delay``
seconds an image (run in a process of their own, as real WebUIs are).

Prints the batch's wall time, images a second, the ideal (N x delay / 2 backends) and the
efficiency against it, and charforge's own time per image (wall minus the ideal, over N).
Then the same generations (the very txt2img bodies each simulator received) are sent back to
back by a plain HTTP loop, one per simulator: ``direct`` is what the stand-ins themselves cost
(rendering and encoding their PNGs, over HTTP), and efficiency against it is charforge's own.

Run: ``.venv/bin/python -m bench.batch [--items 100] [--delay 0.2]``. Prints figures; asserts
nothing about time.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
from tests.helpers import LiveServer

from bench.fleet import send_back_to_back
from charforge.api.app import create_app
from charforge.config import Settings
from charforge.container import build_container
from charforge.services import users

BACKENDS = 2


def main(items: int, delay: float) -> None:
    sims = subprocess.Popen(
        [sys.executable, "-m", "bench.sims", "a=diving.safetensors", "b=diving.safetensors"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert sims.stdout is not None
        urls: dict[str, str] = json.loads(sims.stdout.readline())
        for url in urls.values():
            httpx.post(f"{url}/_simulator/faults", json={"delay_seconds": delay}).raise_for_status()
        wall = run(urls, items, delay)
        direct = replay(urls)
        print(f"  direct client (the same generations back to back): {direct:.2f} s")
        print(f"  efficiency against it {direct / wall:.3f}")
        print(f"  charforge's own time per image beyond it {(wall - direct) / items * 1000:.1f} ms")
    finally:
        if sims.stdin is not None:
            sims.stdin.close()
        sims.wait(timeout=10)


def run(urls: dict[str, str], items: int, delay: float) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        settings = Settings(
            data_dir=Path(tmp) / "data",
            runpod_realistic_url=urls["a"],
            # Two URLs in one variable: the route's pool of two backends.
            runpod_anime_cartoon_fantasy_url=f"{urls['a']},{urls['b']}",
            health_failures=100,
        )
        container = build_container(settings)
        server = LiveServer(create_app(container)).start()
        try:
            with container.db.session() as session:
                owner = users.create_user(session, "bench", "bench-password")
                _, token = users.create_token(session, owner, "bench")
            headers = {"Authorization": f"Bearer {token}"}
            with httpx.Client(base_url=server.url, headers=headers, timeout=60) as client:
                made = client.post(
                    "/api/characters",
                    json={"name": "Sakura", "artStyle": {"primaryStyle": "anime"}},
                ).json()
                body = {
                    "characterId": made["id"],
                    "items": [{"prompt": f"scene {n}"} for n in range(items)],
                }
                started = time.perf_counter()
                batch = client.post("/api/batches", json=body).json()
                while (done := client.get(f"/api/batches/{batch['id']}").json())["state"] in (
                    "queued",
                    "running",
                ):
                    time.sleep(0.05)
                wall = time.perf_counter() - started
        finally:
            server.stop()
    ideal = items * delay / BACKENDS
    print(f"batch of {items} prompts, {BACKENDS} backends, {delay:g} s an image: {done['state']}")
    print(f"  wall {wall:.2f} s, {done['images'] / wall:.2f} images/s")
    print(f"  ideal {ideal:.2f} s: efficiency {ideal / wall:.3f}")
    print(f"  charforge's own time per image {(wall - ideal) / items * 1000:.1f} ms")
    return wall


def replay(urls: dict[str, str]) -> float:
    """Wall time of a direct client: each simulator gets the txt2img bodies it received
    during the batch again, back to back, all simulators at once."""
    bodies: dict[str, list[Any]] = {}
    for url in set(urls.values()):
        recorded = httpx.get(f"{url}/_simulator/requests").json()
        bodies[url] = [
            r["body"]
            for r in recorded
            if r["method"] == "POST" and r["path"] == "/sdapi/v1/txt2img"
        ]

    return send_back_to_back(bodies)


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--items", type=int, default=100)
    parser.add_argument("--delay", type=float, default=0.2)
    args = parser.parse_args()
    main(args.items, args.delay)
