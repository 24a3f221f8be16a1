"""Files saved for rows that did not land are removed again."""

from __future__ import annotations

from pathlib import Path

import pytest

from charforge.storage.files import ImageStore


def test_files_saved_in_a_failed_block_are_removed(tmp_path: Path) -> None:
    store = ImageStore(tmp_path)

    def save_two_then_fail() -> None:
        with store.undo_on_failure():
            store.save("references/1/c/a.png", b"a")
            store.save("references/1/c/b.png", b"b")
            raise RuntimeError("the commit failed")

    with pytest.raises(RuntimeError):
        save_two_then_fail()
    assert not list(tmp_path.rglob("*.png"))

    with store.undo_on_failure():
        store.save("references/1/c/kept.png", b"k")
    store.save("references/1/c/outside.png", b"o")  # no block: nothing tracks it
    assert sorted(p.name for p in tmp_path.rglob("*.png")) == ["kept.png", "outside.png"]
