"""`charforge batch` as a real process against the A1111 stand-in: JSONL, CSV and text files,
a failing item (non-zero exit, the others made), and a rerun that makes only what is left."""

from __future__ import annotations

import json
from pathlib import Path

from charforge.simulator import A1111Simulator
from charforge.storage.png import read_infotext
from tests.test_cli import cli_env, run  # noqa: F401 - cli_env is a fixture used below


def _setup(env: dict[str, str]) -> None:
    added = run(["users", "add", "alice", "--password-stdin"], env, "correct horse battery\n")
    assert added.returncode == 0, added.stderr
    made = run(["characters", "add", "Sakura", "--style", "anime", "--user", "alice"], env)
    assert made.returncode == 0, made.stderr


def test_a_failing_item_then_a_resume_that_makes_only_what_is_left(
    cli_env: dict[str, str],  # noqa: F811 - the fixture
    tmp_path: Path,
    sims: tuple[A1111Simulator, A1111Simulator],
) -> None:
    _setup(cli_env)
    prompts = tmp_path / "scenes.jsonl"
    lines = [
        {"prompt": "at the beach", "seed": 11},
        {"prompt": "a cursed mirror", "seed": 12},
        {"prompt": "in the snow", "seed": 13, "count": 2, "steps": 12},
    ]
    prompts.write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    out = tmp_path / "out"
    sims[1].faults.nan_prompts = ["cursed"]
    first = run(["batch", str(prompts), "--character", "Sakura", "--out", str(out)], cli_env)
    assert first.returncode == 1, first.stdout + first.stderr
    assert "3 image(s) made, 1 item(s) failed" in first.stdout
    assert "nan" in first.stdout.lower() or "NaN" in first.stdout  # the failure, on its row
    pngs = sorted(p.name for p in out.glob("*.png"))
    assert pngs == ["0001-11.png", "0003-13.png", "0003-14.png"]
    infotext = read_infotext((out / "0003-14.png").read_bytes())
    assert infotext is not None and "Steps: 12" in infotext and "Seed: 14" in infotext
    assert (out / "0003-14.txt").read_text().strip() == infotext.strip()
    asked = len(sims[1].txt2img_bodies())

    # The backend is fixed: the rerun makes only the failed item.
    sims[1].faults.nan_prompts = []
    second = run(["batch", str(prompts), "--character", "Sakura", "--out", str(out)], cli_env)
    assert second.returncode == 0, second.stdout + second.stderr
    assert "2 of 3 item(s) already done" in second.stderr
    assert len(sims[1].txt2img_bodies()) == asked + 1
    assert "0002-12.png" in {p.name for p in out.glob("*.png")}
    third = run(["batch", str(prompts), "--character", "Sakura", "--out", str(out)], cli_env)
    assert third.returncode == 0 and "Nothing left to do" in third.stdout
    assert len(sims[1].txt2img_bodies()) == asked + 1


def test_csv_and_plain_text_files(
    cli_env: dict[str, str],  # noqa: F811 - the fixture
    tmp_path: Path,
    sims: tuple[A1111Simulator, A1111Simulator],
) -> None:
    _setup(cli_env)
    table = tmp_path / "scenes.csv"
    table.write_text("prompt,seed,cfgScale\nat the beach,21,6\nin the rain,22,\n")
    done = run(
        ["batch", str(table), "--character", "Sakura", "--out", str(tmp_path / "a")], cli_env
    )
    assert done.returncode == 0, done.stdout + done.stderr
    bodies = sims[1].txt2img_bodies()
    assert [(b["seed"], b["cfg_scale"]) for b in bodies] == [(21, 6.0), (22, 8.0)] or sorted(
        (b["seed"], b["cfg_scale"]) for b in bodies
    ) == [(21, 6.0), (22, 8.0)]
    text = tmp_path / "scenes.txt"
    text.write_text("# ideas\nat a ballroom\n\non a rooftop\n")
    done = run(["batch", str(text), "--character", "Sakura", "--out", str(tmp_path / "b")], cli_env)
    assert done.returncode == 0, done.stdout + done.stderr
    assert len(list((tmp_path / "b").glob("*.png"))) == 2
    bad = tmp_path / "bad.csv"
    bad.write_text("prompt,stepz\nx,3\n")
    refused = run(["batch", str(bad), "--character", "Sakura"], cli_env)
    assert refused.returncode == 1 and "bad.csv:2" in refused.stderr and "stepz" in refused.stderr
