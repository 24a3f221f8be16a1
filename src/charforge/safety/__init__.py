"""Safety: the content policy (restricted terms and patterns, an always-on built-in category).

The services that take user text (characters, generation) get the policy of the container
whose database their session uses: one process may hold several containers (the CLI, tests),
and threading a policy argument through every caller of those services would touch them all.
"""

from __future__ import annotations

import threading
import weakref
from pathlib import Path

from sqlalchemy import Engine
from sqlalchemy.orm import Session

from charforge.safety.builtin import BUILTIN_CATEGORY
from charforge.safety.policy import (
    ENV_VAR,
    ContentPolicy,
    PolicyError,
    builtin_policy,
    fold,
    load_policy,
)

__all__ = [
    "BUILTIN_CATEGORY",
    "ENV_VAR",
    "ContentPolicy",
    "PolicyError",
    "PolicyHolder",
    "builtin_policy",
    "fold",
    "install_policy",
    "load_policy",
    "policy_of",
]


class PolicyHolder:
    """The policy in force for one container; an admin's reload swaps it whole, so a check
    running meanwhile sees the old or the new one, never half of each."""

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self.current = load_policy(path)
        self._lock = threading.Lock()

    @classmethod
    def for_settings(cls, path: Path | None) -> PolicyHolder:
        """At start: a broken file stops the start with a message naming the variable."""
        try:
            return cls(path)
        except PolicyError as exc:
            raise PolicyError(f"{ENV_VAR}: {exc}") from exc

    def reload(self) -> ContentPolicy:
        """Read the file again; a broken file raises ``PolicyError`` and keeps the old one."""
        with self._lock:
            self.current = load_policy(self.path)
            return self.current


_BY_ENGINE: weakref.WeakKeyDictionary[Engine, PolicyHolder] = weakref.WeakKeyDictionary()
_BUILTIN = builtin_policy()


def install_policy(engine: Engine, holder: PolicyHolder) -> None:
    _BY_ENGINE[engine] = holder


def policy_of(session: Session) -> ContentPolicy:
    """The policy for this session's database; the built-in category alone where none was
    installed (it is never off)."""
    bind = session.get_bind()
    engine = bind if isinstance(bind, Engine) else bind.engine
    holder = _BY_ENGINE.get(engine)
    return holder.current if holder is not None else _BUILTIN
