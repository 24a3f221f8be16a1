"""The ``charforge`` command line."""

from __future__ import annotations

# Each module registers its commands on the one Typer app.
from charforge.cli import accounts, backends, batch, server
from charforge.cli.common import app

__all__ = ["accounts", "app", "backends", "batch", "main", "server"]


def main() -> None:
    app()
