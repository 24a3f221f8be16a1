"""Files without a row (a process killed between the file and its row) are swept at start."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

from charforge.container import build_container
from charforge.simulator import A1111Simulator
from charforge.storage.sweep import sweep_orphans
from tests.api.test_generate import create, generate
from tests.conftest import Live, make_settings

HOUR_AGO = time.time() - 3600


def _plant(root: Path, relative: str, *, old: bool = True) -> Path:
    path = root / relative
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"\x89PNG orphan")
    if old:
        os.utime(path, (HOUR_AGO, HOUR_AGO))
    return path


def test_orphans_go_fresh_files_and_files_with_a_row_stay(live: Live) -> None:
    alice = live.user("alice")
    character = create(alice, "Ann")
    image = generate(alice, character).json()["images"][0]
    store = live.container.store
    (png,) = (store.root / "images").rglob("*.png")
    store.thumbnail(png.relative_to(store.root).as_posix())
    kept = sorted(p for p in store.root.rglob("*") if p.is_file() and "charforge.db" not in p.name)
    assert any(p.suffix == ".webp" for p in kept) and any(p.suffix == ".png" for p in kept)
    for path in kept:  # old, but named by a row (a thumbnail by its image's row)
        os.utime(path, (HOUR_AGO, HOUR_AGO))
    orphans = [
        _plant(store.root, "images/1/gone/a.png"),
        _plant(store.root, "images/1/gone/.tmp-abc.png"),  # killed mid-write
        _plant(store.root, "references/1/gone/r.png"),
        _plant(store.root, "thumbs/1/gone/a.webp"),
        _plant(store.root, "thumbs/references/1/gone/r.webp"),
    ]
    fresh = _plant(store.root, "images/1/gone/being-written.png", old=False)
    elsewhere = _plant(store.root, "backups/old.png")  # not a folder the store owns

    assert sweep_orphans(live.container.db, store) == len(orphans)
    assert not any(p.exists() for p in orphans)
    assert all(p.exists() for p in (*kept, fresh, elsewhere))
    assert alice.get(image["url"]).status_code == 200
    assert sweep_orphans(live.container.db, store) == 0


def test_the_container_sweeps_when_it_starts(
    tmp_path: Path, database_url: str, sims: tuple[A1111Simulator, A1111Simulator], caplog: Any
) -> None:
    data = tmp_path / "data"
    orphan = _plant(data, "images/7/c/i.png")
    container = build_container(make_settings(data, database_url, sims[0].url, sims[1].url))
    caplog.set_level("INFO", logger="charforge.storage.sweep")
    container.start()
    try:
        assert not orphan.exists()
        assert "removed 1 file(s)" in caplog.text
    finally:
        container.close()
