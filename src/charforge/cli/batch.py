"""``charforge batch FILE``: a file of prompts run as one batch, with a progress bar, the
images written to a folder with their infotext, a summary, and resume after an interruption.

The file is JSON Lines (one object a line: ``prompt`` plus any generation field), CSV (a
``prompt`` column plus any generation fields as columns) or plain text (one prompt a line;
blank lines and lines starting with ``#`` are skipped). A manifest in the output folder records
each finished item by the hash of what it asked; run again, those items are not made again.
"""

from __future__ import annotations

import csv
import hashlib
import json
import shutil
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from charforge.cli.common import (
    _fail,
    _opened,
    _owner,
    _running_jobs_here,
    _settings,
    app,
    err,
    out,
)

MANIFEST = "charforge-batch.json"
# Parallel jobs in this process: jobs for one backend wait at its door, so more buys nothing.
_THREADS_MAX = 4


@dataclass
class Item:
    number: int  # its line in the file (1-based), as errors and the summary name it
    fields: dict[str, Any]
    key: str = ""

    def __post_init__(self) -> None:
        canonical = json.dumps(self.fields, sort_keys=True, ensure_ascii=False)
        self.key = hashlib.sha256(canonical.encode()).hexdigest()[:16]


@dataclass
class Outcome:
    item: Item
    state: str
    files: list[str] = field(default_factory=list)
    error: str = ""


def read_items(path: Path) -> list[Item]:
    """The file's items, each a dict of generation fields (camelCase or snake_case)."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise _fail(f"cannot read {path}: {exc}") from exc
    suffix = path.suffix.lower()
    items: list[Item] = []
    if suffix in (".jsonl", ".ndjson"):
        for number, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                value = json.loads(line)
            except ValueError as exc:
                raise _fail(f"{path}:{number}: not JSON ({exc})") from exc
            if not isinstance(value, dict):
                raise _fail(f"{path}:{number}: each line must be a JSON object")
            items.append(Item(number, value))
    elif suffix == ".csv":
        reader = csv.DictReader(text.splitlines())
        if "prompt" not in (reader.fieldnames or []):
            raise _fail(f"{path}: the CSV needs a 'prompt' column", "Name the first row's columns.")
        for number, row in enumerate(reader, start=2):
            fields = {k.strip(): v for k, v in row.items() if k and v is not None and v.strip()}
            items.append(Item(number, fields))
    else:
        for number, line in enumerate(text.splitlines(), start=1):
            if line.strip() and not line.lstrip().startswith("#"):
                items.append(Item(number, {"prompt": line.strip()}))
    if not items:
        raise _fail(f"{path} has no prompts")
    return items


def _load_manifest(folder: Path) -> dict[str, Any]:
    try:
        data = json.loads((folder / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _finished(manifest: dict[str, Any], item: Item, folder: Path) -> bool:
    entry = manifest.get(item.key)
    return (
        isinstance(entry, dict)
        and entry.get("state") == "succeeded"
        and all((folder / name).is_file() for name in entry.get("files", []))
    )


@app.command()
def batch(
    file: Annotated[Path, typer.Argument(help="JSONL, CSV or a text file of prompts.")],
    character: Annotated[str, typer.Option(help="The character's name or id.")],
    user: Annotated[
        str | None, typer.Option(help="Owner (needed when several users exist).")
    ] = None,
    out_dir: Annotated[
        Path, typer.Option("--out", help="Folder for the images (and the resume manifest).")
    ] = Path("batch-out"),
) -> None:
    """Generate every prompt of FILE for a character; run again to finish what is left."""
    from pydantic import ValidationError

    from charforge.domain.params import GenerateBody
    from charforge.services import batches, characters, quotas

    items = read_items(file)
    out_dir.mkdir(parents=True, exist_ok=True)
    manifest = _load_manifest(out_dir)
    todo = [item for item in items if not _finished(manifest, item, out_dir)]
    skipped = len(items) - len(todo)
    if skipped:
        err.print(f"{skipped} of {len(items)} item(s) already done in {out_dir}: not made again")
    if not todo:
        out.print(f"Nothing left to do: all {len(items)} item(s) are in {out_dir}.")
        return
    settings = _settings()
    with _opened(settings) as container:
        with container.db.session() as session:
            owner = _owner(session, user)
            target = characters.find(session, owner, character)
            bodies = []
            for item in todo:
                try:
                    bodies.append(
                        GenerateBody.model_validate({**item.fields, "characterId": target.id})
                    )
                except ValidationError as exc:
                    first = exc.errors()[0]
                    where = ".".join(str(p) for p in first["loc"])
                    raise _fail(f"{file}:{item.number}: {where}: {first['msg']}") from exc
            _, jobs = batches.submit_bodies(
                session,
                owner,
                bodies,
                {"file": str(file)},
                container.table,
                settings.defaults,
                capabilities=container.pool.capabilities,
                limits=quotas.Limits.of(settings),
                numbers=[item.number for item in todo],
            )
            job_ids = [job.id for job in jobs]
            owner_id = owner.id
        with _running_jobs_here(container):
            outcomes = _run(container, owner_id, list(zip(todo, job_ids, strict=True)), out_dir)
    for outcome in outcomes:
        if outcome.state == "succeeded":
            manifest[outcome.item.key] = {
                "line": outcome.item.number,
                "state": "succeeded",
                "files": outcome.files,
            }
    (out_dir / MANIFEST).write_text(json.dumps(manifest, indent=1), encoding="utf-8")
    _summary(outcomes, skipped)
    if any(o.state != "succeeded" for o in outcomes):
        raise typer.Exit(1)


def _run(
    container: Any, owner_id: int, work: list[tuple[Item, str]], folder: Path
) -> list[Outcome]:
    """Run the jobs in this process (a server sharing the database keeps its own), showing
    images done of all asked, failures and the time left."""
    from charforge.jobs.runner import run_to_end

    wanted = sum(int(item.fields.get("count", 1) or 1) for item, _ in work)
    threads = min(_THREADS_MAX, max(1, len(container.pool.backends)), len(work))
    outcomes: list[Outcome] = []
    with Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total} images"),
        TextColumn("{task.fields[failed]} failed"),
        TimeRemainingColumn(),
        console=err,
        transient=False,
    ) as progress:
        task = progress.add_task("batch", total=wanted, failed=0)

        def one(pair: tuple[Item, str]) -> Outcome:
            item, job_id = pair
            run_to_end(container.runner, job_id, wait=container.settings.backend_timeout)
            return _collect(container, owner_id, item, job_id, folder)

        with ThreadPoolExecutor(max_workers=threads) as pool:
            for outcome in pool.map(one, work):
                outcomes.append(outcome)
                done = sum(len(o.files) for o in outcomes)
                failed = sum(o.state != "succeeded" for o in outcomes)
                progress.update(task, completed=done, failed=failed)
    return outcomes


def _collect(container: Any, owner_id: int, item: Item, job_id: str, folder: Path) -> Outcome:
    """The job's images copied to the folder, each with its infotext beside it."""
    from charforge.db import images as image_rows
    from charforge.db import repositories as repo

    with container.db.session() as session:
        job = repo.job(session, owner_id, job_id)
        if job is None:
            return Outcome(item, "failed", error="the job is gone (its character was deleted)")
        if job.state != "succeeded":
            return Outcome(item, job.state, error=job.error_message or job.state)
        images = list(image_rows.images_of_job(session, job_id))
    files = []
    for image in images:
        name = f"{item.number:04d}-{image.seed}"
        shutil.copyfile(container.store.path(image.file_path), folder / f"{name}.png")
        (folder / f"{name}.txt").write_text(image.infotext + "\n", encoding="utf-8")
        files.append(f"{name}.png")
    return Outcome(item, "succeeded", files=files)


def _summary(outcomes: list[Outcome], skipped: int) -> None:
    table = Table(title="Batch", show_lines=False)
    table.add_column("line", justify="right")
    table.add_column("prompt", overflow="fold", max_width=40)
    table.add_column("state")
    table.add_column("images", justify="right")
    table.add_column("error", overflow="fold", max_width=40)
    for o in sorted(outcomes, key=lambda o: o.item.number):
        style = "green" if o.state == "succeeded" else "red"
        table.add_row(
            str(o.item.number),
            str(o.item.fields.get("prompt", "")),
            f"[{style}]{o.state}[/]",
            str(len(o.files)),
            o.error,
        )
    out.print(table)
    made = sum(len(o.files) for o in outcomes)
    failed = sum(o.state != "succeeded" for o in outcomes)
    out.print(
        f"{made} image(s) made, {failed} item(s) failed"
        + (f", {skipped} already done before" if skipped else "")
    )
