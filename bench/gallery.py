"""The gallery on a big SQLite database: 100,000 images of one character (plus 20,000 of
another user's and 5,000 of a second character, so the owner and character filters matter),
then pages of 50 timed two ways: through the service layer (the query plus turning every row
into the JSON the API sends) and over HTTP (``GET /api/images`` on a live server).

Timed: the first page; a deep page (a cursor ~60,000 images in); a search for a word in 1 of
20 prompts (``q=beach``) and for one in 1 of 1,000 (``q=lighthouse``); favourites (1 in 1,000
images); a date range; ``minScore``; the character's history; and what the gallery page adds
(the image count and the model and style choices).

Run: ``.venv/bin/python -m bench.gallery [--images 100000] [--runs 30] [--keep DIR]``.
Prints p50/p90 per query; asserts nothing about time.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
from sqlalchemy import insert, select
from tests.helpers import LiveServer

from charforge.api.app import create_app
from charforge.api.schemas import ImageOut
from charforge.config import Settings
from charforge.container import Container, build_container
from charforge.db import images as image_rows
from charforge.db.images import Filters
from charforge.db.models import Character, Image, Job
from charforge.services import cursors, gallery, users
from charforge.simulator import A1111Simulator, SimulatorSettings

PAGE = 50
SCENES = [
    "in a garden at dawn",
    "on a rooftop at night",
    "reading in a library",
    "walking in the rain",
    "in a forest clearing",
    "at a train station",
    "in a cafe by the window",
    "on a mountain path",
    "in a neon-lit alley",
    "at a festival with lanterns",
    "in a snowy village",
    "on a sailing boat",
    "in a sunflower field",
    "at a market stall",
    "in a quiet temple",
    "on a bridge at sunset",
    "in an art studio",
    "at a concert",
    "in a desert oasis",
    "at the beach, waves behind her",  # 1 in 20
]
APPEARANCE = "long pink hair, green eyes, red scarf"
PARAMS = {
    "prompt": "",
    "negative_prompt": "blurry, nsfw, nude, explicit",
    "width": 512,
    "height": 768,
    "steps": 25,
    "cfg_scale": 8.0,
    "seed": -1,
    "sampler": "DPM++ 2M",
    "scheduler": "Karras",
    "hires": True,
    "hires_scale": 1.5,
    "hires_upscaler": "Latent",
    "denoising_strength": 0.5,
    "identity_strength": 0.0,
    "identity_required": False,
    "nsfw": False,
}


def build(container: Container, images: int, rng: random.Random) -> tuple[str, str]:
    """Rows straight through SQLAlchemy core (executemany); returns (character id, token)."""
    with container.db.session() as session:
        owner = users.create_user(session, "bench", "bench-password")
        other = users.create_user(session, "other", "other-password")
        _, token = users.create_token(session, owner)
        ids = (owner.id, other.id)
    sakura, mika, bobby = (str(uuid.uuid4()) for _ in range(3))
    start = datetime(2025, 1, 1)
    with container.db.engine.begin() as conn:
        conn.execute(
            insert(Character),
            [
                _character(sakura, ids[0], "Sakura", start),
                _character(mika, ids[0], "Mika", start),
                _character(bobby, ids[1], "Bobby", start),
            ],
        )
        plan = [
            (sakura, ids[0], images),
            (mika, ids[0], images // 20),
            (bobby, ids[1], images // 5),
        ]
        # All three over the same span of time (a minute apart for Sakura's): interleaved.
        span = timedelta(minutes=images)
        for character_id, owner_id, count in plan:
            for jobs, rows in _batches(character_id, owner_id, count, start, span / count, rng):
                conn.execute(insert(Job), jobs)
                conn.execute(insert(Image), rows)
    return sakura, token


def _character(character_id: str, owner_id: int, name: str, at: datetime) -> dict[str, Any]:
    return {
        "id": character_id,
        "owner_id": owner_id,
        "name": name,
        "description": "",
        "appearance": APPEARANCE,
        "primary_style": "anime",
        "model": "diving.safetensors",
        "negative_prompt": "",
        "loras": [],
        "identity_strength": 0.6,
        "created_at": at,
        "updated_at": at,
    }


def _batches(
    character_id: str,
    owner_id: int,
    count: int,
    start: datetime,
    step: timedelta,
    rng: random.Random,
    per_job: int = 4,
    per_batch: int = 5000,
) -> Iterator[tuple[list[dict[str, Any]], list[dict[str, Any]]]]:
    jobs: list[dict[str, Any]] = []
    rows: list[dict[str, Any]] = []
    job_id = ""
    for n in range(count):
        # Every 10th shares its time with the one before (a tie the id breaks).
        at = start + step * (n - (n % 10 == 1))
        if n % per_job == 0:
            job_id = str(uuid.uuid4())
            jobs.append(_job(job_id, character_id, owner_id, at))
        scene = SCENES[n % len(SCENES)]
        if n % 1000 == 999:
            scene = "by an old lighthouse in a storm"
        prompt = f"{scene}, {APPEARANCE}"
        seed = rng.randrange(2**32)
        score = round(rng.random(), 3) if n % 2 else None
        rows.append(
            {
                "id": str(uuid.uuid4()),
                "owner_id": owner_id,
                "character_id": character_id,
                "job_id": job_id,
                "position": n % per_job,
                "file_path": f"images/{owner_id}/{character_id}/{n}.png",
                "width": 768,
                "height": 1152,
                "seed": seed,
                "art_style": "anime",
                "checkpoint": "diving.safetensors",
                "checkpoint_hash": "a1b2c3d4e5",
                "backend": "anime-cartoon-fantasy",
                "prompt": prompt,
                "negative_prompt": PARAMS["negative_prompt"],
                "params": {**PARAMS, "prompt": prompt, "seed": seed},
                "infotext": f"{prompt}\nNegative prompt: blurry\nSteps: 25, Seed: {seed}, ...",
                "simulated": False,
                "consistency": {"score": score, "method": "face"} if score is not None else None,
                "withheld": n % 200 == 77,
                "favorite": n % 1000 == 3,
                "created_at": at,
            }
        )
        if len(rows) >= per_batch:
            yield jobs, rows
            jobs, rows = [], []
    if rows:
        yield jobs, rows


def _job(job_id: str, character_id: str, owner_id: int, at: datetime) -> dict[str, Any]:
    return {
        "id": job_id,
        "owner_id": owner_id,
        "character_id": character_id,
        "state": "succeeded",
        "art_style": "anime",
        "checkpoint": "diving.safetensors",
        "params": PARAMS,
        "user_prompt": "bench",
        "request": {},
        "attempts": 1,
        "count": 4,
        "created_at": at,
    }


def timed(call: Callable[[], Any], runs: int) -> list[float]:
    call()  # warm
    samples = []
    for _ in range(runs):
        started = time.perf_counter()
        call()
        samples.append((time.perf_counter() - started) * 1000)
    return samples


def p(samples: list[float], q: float) -> float:
    return sorted(samples)[max(0, round(len(samples) * q) - 1)]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--images", type=int, default=100_000)
    parser.add_argument("--runs", type=int, default=30)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--keep", type=Path, help="build the database here and keep it")
    args = parser.parse_args()
    with (
        A1111Simulator(SimulatorSettings(models=["diving.safetensors"])) as anime,
        A1111Simulator(SimulatorSettings(models=["cyberrealistic.safetensors"])) as realistic,
        tempfile.TemporaryDirectory() as tmp,
    ):
        root = args.keep or Path(tmp)
        settings = Settings(
            data_dir=root,
            database_url=f"sqlite:///{root / 'gallery.db'}",
            runpod_realistic_url=realistic.url,
            runpod_anime_cartoon_fantasy_url=anime.url,
        )
        container = build_container(settings)
        server = LiveServer(create_app(container)).start()
        try:
            started = time.perf_counter()
            sakura, token = build(container, args.images, random.Random(args.seed))
            print(
                f"built {args.images:,} images of one character (+{args.images // 5:,} of "
                f"another user's, +{args.images // 20:,} of a second character) in "
                f"{time.perf_counter() - started:.1f} s"
            )
            run(container, server.url, token, sakura, args.runs)
        finally:
            server.stop()


def run(container: Container, url: str, token: str, sakura: str, runs: int) -> None:
    with container.db.session() as session:
        owner = users.require_user(session, "bench")
        created, last_id = session.execute(
            select(Image.created_at, Image.id)
            .where(Image.character_id == sakura)
            .order_by(Image.created_at.desc(), Image.id.desc())
            .offset(60_000)
            .limit(1)
        ).one()
    deep_cursor = cursors.encode(created, last_id)
    cases: list[tuple[str, dict[str, Any]]] = [
        ("first page", {}),
        ("deep page (60,000 in)", {"cursor": deep_cursor}),
        ("q=beach (1 in 20)", {"q": "beach"}),
        ("q=lighthouse (1 in 1,000)", {"q": "lighthouse"}),
        ("favorite=true (1 in 1,000)", {"favorite": True}),
        ("from/to (one day)", {"since": "2025-02-20", "until": "2025-02-20"}),
        ("minScore=0.9", {"min_score": 0.9}),
        ("minScore=0.999 (1 in 2,000)", {"min_score": 0.999}),
    ]
    print(f"\npages of {PAGE}, {runs} runs each; p50 / p90 in ms")
    print(f"{'query':<28} {'service':>17} {'HTTP':>17}  items")
    headers = {"Authorization": f"Bearer {token}"}
    with httpx.Client(base_url=url, headers=headers, timeout=60) as client:
        for name, extra in cases:
            cursor = extra.pop("cursor", None)
            filters = gallery.filters_of(container.table, character_id=sakura, **extra)

            def service(filters: Filters = filters, cursor: str | None = cursor) -> int:
                with container.db.session() as session:
                    rows, _ = gallery.search(session, owner, filters, limit=PAGE, cursor=cursor)
                    body = [ImageOut.of(r).model_dump(mode="json", by_alias=True) for r in rows]
                    json.dumps(body)
                    return len(rows)

            query = {"characterId": sakura, "limit": PAGE, **_wire(extra)}
            if cursor:
                query["cursor"] = cursor

            def http(query: dict[str, Any] = query) -> int:
                response = client.get("/api/images", params=query)
                response.raise_for_status()
                return len(response.json()["items"])

            items = service()
            assert http() == items
            a, b = timed(service, runs), timed(http, runs)
            print(
                f"{name:<28} {statistics.median(a):7.1f} / {p(a, 0.9):6.1f}"
                f"   {statistics.median(b):7.1f} / {p(b, 0.9):6.1f}  {items:5d}"
            )

        def page_extras() -> None:
            with container.db.session() as session:
                image_rows.count_shown(session, owner.id, sakura)
                image_rows.facets(session, owner.id, sakura)

        e = timed(page_extras, runs)
        name = "gallery page: count+choices"
        print(f"{name:<28} {statistics.median(e):7.1f} / {p(e, 0.9):6.1f}")
        history = f"/api/characters/{sakura}/images"
        h = timed(lambda: client.get(history, params={"limit": PAGE}).raise_for_status(), runs)
        print(
            f"{'history (HTTP only)':<28} {'':>17}   {statistics.median(h):7.1f} / {p(h, 0.9):6.1f}"
        )


def _wire(extra: dict[str, Any]) -> dict[str, Any]:
    names = {"since": "from", "until": "to", "min_score": "minScore"}
    return {
        names.get(k, k): (str(v).lower() if isinstance(v, bool) else v) for k, v in extra.items()
    }


if __name__ == "__main__":
    main()
