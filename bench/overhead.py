"""What charforge adds per generation: N requests straight to an A1111 simulator, then N
through charforge's generate endpoint (auth, DB job, checkpoint check, PNG store, verify).

Run: ``.venv/bin/python -m bench.overhead [N]``. Prints figures; asserts nothing about time.
"""

from __future__ import annotations

import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx
from tests.helpers import LiveServer

from charforge.api.app import create_app
from charforge.config import Settings
from charforge.container import build_container
from charforge.services import users
from charforge.simulator import A1111Simulator, SimulatorSettings

PAYLOAD = {
    "prompt": "Sakura at a ballroom",
    "steps": 25,
    "cfg_scale": 8,
    "width": 512,
    "height": 768,
    "enable_hr": True,
    "hr_scale": 1.5,
    "override_settings": {"sd_model_checkpoint": "diving.safetensors"},
    "override_settings_restore_afterwards": False,
}


def timed(call: object, n: int) -> list[float]:
    samples = []
    for _ in range(n):
        started = time.perf_counter()
        call()  # type: ignore[operator]
        samples.append((time.perf_counter() - started) * 1000)
    return samples


def report(name: str, samples: list[float]) -> float:
    median = statistics.median(samples)
    p95 = sorted(samples)[int(len(samples) * 0.95) - 1]
    print(f"{name:<28} median {median:7.1f} ms   p95 {p95:7.1f} ms   n={len(samples)}")
    return median


def main(n: int) -> None:
    with (
        A1111Simulator(SimulatorSettings(models=["diving.safetensors"])) as anime,
        A1111Simulator(SimulatorSettings(models=["cyberrealistic.safetensors"])) as realistic,
        tempfile.TemporaryDirectory() as tmp,
    ):
        settings = Settings(
            data_dir=Path(tmp),
            runpod_realistic_url=realistic.url,
            runpod_anime_cartoon_fantasy_url=anime.url,
        )
        container = build_container(settings)
        server = LiveServer(create_app(container)).start()
        try:
            with container.db.session() as session:
                user = users.create_user(session, "bench", "bench-password")
                _, token = users.create_token(session, user)
            headers = {"Authorization": f"Bearer {token}"}
            with (
                httpx.Client(timeout=60) as direct,
                httpx.Client(base_url=server.url, headers=headers, timeout=60) as api,
            ):
                character = api.post(
                    "/api/characters", json={"name": "Sakura", "artStyle": "anime"}
                ).json()
                body = {"prompt": "Sakura at a ballroom", "characterId": character["id"]}

                def straight() -> None:
                    direct.post(f"{anime.url}/sdapi/v1/txt2img", json=PAYLOAD).raise_for_status()

                def through() -> None:
                    api.post("/api/image-generation/generate", json=body).raise_for_status()

                straight()
                through()  # warm both paths
                base = report("direct to simulator", timed(straight, n))
                full = report("through charforge", timed(through, n))
            print(
                f"{'overhead per generation':<28} {full - base:7.1f} ms   ratio {full / base:.2f}x"
            )
        finally:
            server.stop()


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 50)
