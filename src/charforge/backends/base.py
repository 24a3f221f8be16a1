"""What every backend offers the job runner."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from charforge.domain.params import GenerationParams
from charforge.domain.routes import BackendSpec


@dataclass(frozen=True)
class CheckpointInfo:
    name: str  # file name as the backend lists it, without the " [hash]" suffix
    title: str  # exactly what the backend accepts to select it
    hash: str | None  # short hash when the backend reports one


@dataclass(frozen=True)
class Progress:
    fraction: float  # 0..1 over the whole request
    step: int | None = None  # sampling step of the current image, where reported
    steps: int | None = None


@dataclass(frozen=True)
class BackendRequest:
    style: str
    checkpoint: CheckpointInfo
    params: GenerationParams
    count: int = 1  # images wanted, one seed after the other (A1111's n_iter)
    on_progress: Callable[[Progress], None] | None = None


@dataclass(frozen=True)
class GeneratedImage:
    data: bytes  # as the backend sent it; validated when stored
    seed: int


@dataclass(frozen=True)
class BackendResult:
    images: list[GeneratedImage]
    checkpoint: str | None  # the model that really ran, as the backend reports it
    checkpoint_hash: str | None
    info: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class ProbeResult:
    ok: bool
    latency_ms: float | None
    error: str | None = None
    checkpoints: list[CheckpointInfo] = field(default_factory=list)
    loaded: str | None = None  # the checkpoint in memory now, where the backend says


class ImageBackend(Protocol):
    spec: BackendSpec

    def find_checkpoint(self, name: str, *, style: str) -> CheckpointInfo:
        """The backend's entry for ``name``; raises CheckpointMissing naming both."""
        ...

    def generate(self, request: BackendRequest) -> BackendResult: ...

    def probe(self) -> ProbeResult: ...

    def loaded_checkpoint(self) -> str | None:
        """The checkpoint in memory now; None when the backend does not say."""
        ...

    def interrupt(self) -> bool:
        """Stop the generation running now, where the backend can; True when it was asked."""
        ...

    def close(self) -> None: ...
