"""At start: files under the data dir that no row names, left by a process killed between
writing a file and committing its row (``kill -9``), are removed.

A file younger than ``min_age`` is kept whatever the rows say: another process may have just
written it for a row it has not committed yet.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from sqlalchemy import select

from charforge.db.engine import Database
from charforge.db.models import Base
from charforge.storage.files import ImageStore

log = logging.getLogger(__name__)

MIN_AGE_SECONDS = 60.0
_SWEPT = ("images", "references", "thumbs")


def known_files(db: Database) -> set[str]:
    """Every path a row names: each table with a ``file_path`` column (images, references,
    and whatever keeps files the same way, a quarantine say)."""
    known: set[str] = set()
    with db.session() as session:
        for table in Base.metadata.sorted_tables:
            if "file_path" in table.c:
                known.update(str(p) for p in session.scalars(select(table.c.file_path)))
    return known


def _owner(relative: str) -> str:
    """The path a row would name for this file: a thumbnail belongs to its image's file."""
    if not relative.startswith("thumbs/"):
        return relative
    inner = relative.removeprefix("thumbs/").removesuffix(".webp") + ".png"
    return inner if inner.startswith("references/") else "images/" + inner


def sweep_orphans(
    db: Database, store: ImageStore, *, min_age: float = MIN_AGE_SECONDS, now: float | None = None
) -> int:
    """Remove the files no row names that are older than ``min_age`` seconds; their count."""
    known = known_files(db)  # read before listing: a row committed later has a fresh file
    cutoff = (time.time() if now is None else now) - min_age
    removed = 0
    for top in _SWEPT:
        base = store.root / top
        if not base.is_dir():
            continue
        for path in base.rglob("*"):
            if path.is_symlink() or not path.is_file():
                continue
            if _owner(path.relative_to(store.root).as_posix()) in known:
                continue
            if _unlink_if_older(path, cutoff):
                removed += 1
    if removed:
        log.info("removed %d file(s) under %s that no row names", removed, store.root)
    return removed


def _unlink_if_older(path: Path, cutoff: float) -> bool:
    try:
        if path.stat().st_mtime > cutoff:
            return False
        path.unlink()
    except FileNotFoundError:
        return False  # removed meanwhile by its own process
    return True
