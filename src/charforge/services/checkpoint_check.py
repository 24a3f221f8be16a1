"""Whether a character's own checkpoint is on the backends of its route.

Asked when a character is created with a checkpoint of its own, or when its checkpoint or its
route changes; a checkpoint no backend has would otherwise only fail at its first generation
(503 ``checkpoint_missing``). The rule:

- the backends of the character's route are asked which checkpoints they have (the pool's
  probe, shared with ``GET /api/styles`` and the health monitor and reused for a few seconds);
  one the pool holds for down is not asked;
- a name is matched as a job matches it (``find_checkpoint_named``: the exact title, A1111's
  model name, the file's stem), so ``x.safetensors``, ``x`` and ``x.safetensors [hash]`` are
  the same checkpoint;
- not in those listings, each backend that answered is asked as a job would ask it
  (``find_checkpoint``: A1111 first rescans its models folder), so a file just added counts;
- refused (422 naming the field, the checkpoint and the backends, with a hint listing what they
  do have) only when at least one backend answered and none of those that answered has it.

Where no backend of the route answers (down, unreachable, slower than the probe timeout) or
none can list its checkpoints (RunPod serverless), the checkpoint is accepted: as before, a job
for it then waits for a backend or fails with ``checkpoint_missing``. Each round of questions
waits at most the probe timeout (``CHARFORGE_PROBE_TIMEOUT``), and no failure of a backend
becomes an error of the request.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TypeVar

from charforge.backends.base import CheckpointInfo, ProbeResult
from charforge.backends.fan_out import ask_each
from charforge.backends.pool import BackendPool
from charforge.domain.capabilities import Capability
from charforge.domain.checkpoints import find_checkpoint_named, same_checkpoint, strip_hash
from charforge.domain.routes import FALLBACK_STYLE, RouteTable
from charforge.errors import CheckpointMissing, InvalidInput

log = logging.getLogger(__name__)
LISTED_MAX = 12  # checkpoints named in the hint; the rest are counted
T = TypeVar("T")


@dataclass(frozen=True)
class Scope:
    """The backends a character's checkpoint is looked for on."""

    style: str | None  # None: the character has no style yet, so any route may serve it
    backends: tuple[str, ...]


def scope_of(table: RouteTable, style: str | None) -> Scope:
    """The backends of the style's route; without a style, those of every route (the style of
    a generation decides the route of a character stored without one)."""
    if style is not None:
        return Scope(style, table.route(style).backends)
    names = dict.fromkeys(n for route in table.routes.values() for n in route.backends)
    return Scope(None, tuple(names))


def is_own(table: RouteTable, checkpoint: str, style: str | None) -> bool:
    """Whether ``checkpoint`` is the character's own, not its route's: the route's checkpoint
    is the operator's configuration (``charforge backends check`` and ``GET /api/styles``
    report it), not something the character's owner chose, so it is not checked here."""
    if style is not None:
        return not same_checkpoint(checkpoint, table.route(style).checkpoint)
    return table.route_for_checkpoint(checkpoint) is None


def has_checkpoint(name: str, available: Iterable[CheckpointInfo]) -> bool:
    """``name`` among a backend's checkpoints, as the adapters match it."""
    items = list(available)
    if any(info.title == name for info in items):
        return True
    return find_checkpoint_named(name, items, lambda info: info.name) is not None


class BackendCheckpoints:
    """Asks the pool's backends whether they have a checkpoint (see the module's docstring)."""

    def __init__(self, pool: BackendPool, *, timeout: float) -> None:
        self.pool = pool
        self.table = pool.table
        self.timeout = timeout

    def require(self, checkpoint: str, style: str | None, *, field: str) -> None:
        """Raise InvalidInput (422) when the backends that answer lack ``checkpoint``."""
        scope = scope_of(self.table, style)
        # A backend the pool holds for down is not asked: it would only make the caller wait.
        asked = [n for n in scope.backends if self.pool.status(n).healthy]
        probes = self._ask(asked, self._probe)
        listing = {
            name: probe
            for name, probe in probes.items()
            if probe.ok and Capability.CHECKPOINT_LIST in self.table.backends[name].capabilities
        }
        if not listing:
            log.info(
                "checkpoint %s not checked: no backend of %s answered with its checkpoints",
                checkpoint,
                ", ".join(scope.backends) or "no route",
            )
            return
        if any(has_checkpoint(checkpoint, p.checkpoints) for p in listing.values()):
            return
        # Not in listings a few seconds old: ask as a job would (A1111 rescans its folder).
        found = self._ask(list(listing), lambda name: self._find(name, checkpoint))
        if any(found.values()):
            return
        lacking = [name for name in listing if found.get(name) is False]
        if not lacking:  # none of them could say it again: keep today's behaviour
            return
        silent = [name for name in scope.backends if name not in lacking]
        raise self._refusal(checkpoint, scope, field, lacking, silent, listing)

    # -- asking --------------------------------------------------------------------------------

    def _probe(self, name: str) -> ProbeResult:
        return self.pool.probe([name])[name]

    def _find(self, name: str, checkpoint: str) -> bool:
        routes = self.table.routes_of(name)
        try:
            self.pool.backends[name].find_checkpoint(
                checkpoint, style=routes[0] if routes else FALLBACK_STYLE
            )
        except CheckpointMissing:
            return False
        return True

    def _ask(self, names: list[str], question: Callable[[str], T]) -> dict[str, T]:
        """The answers that came within the timeout (a slower probe still lands in the pool's
        cache)."""
        return ask_each(names, question, timeout=self.timeout, what="checkpoint check")

    # -- the answer ----------------------------------------------------------------------------

    def _refusal(
        self,
        checkpoint: str,
        scope: Scope,
        field: str,
        lacking: list[str],
        silent: list[str],
        listing: dict[str, ProbeResult],
    ) -> InvalidInput:
        where = f"the {scope.style} style's backends" if scope.style else "the backends"
        message = (
            f"Checkpoint '{checkpoint}' is not on {where} that answered "
            f"({', '.join(lacking)}), so no image of this character could be made with it."
        )
        if silent:
            message += f" Not asked or not answering: {', '.join(silent)}."
        names = sorted(
            {strip_hash(c.name) for name in lacking for c in listing[name].checkpoints},
            key=str.lower,
        )
        shown = ", ".join(names[:LISTED_MAX]) or "no checkpoints"
        if len(names) > LISTED_MAX:
            shown += f" and {len(names) - LISTED_MAX} more"
        default = (
            f"leave it empty to use the {scope.style} style's own "
            f"({self.table.route(scope.style).checkpoint})"
            if scope.style
            else "leave it empty to use the style's own"
        )
        return InvalidInput(
            message,
            field=field,
            hint=(
                f"They have: {shown}. Name one of these (with or without its file extension), "
                f"{default}, or put {strip_hash(checkpoint)} on the backend first."
            ),
        )
