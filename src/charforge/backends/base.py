"""What every backend offers the job runner."""

from __future__ import annotations

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
class BackendRequest:
    style: str
    checkpoint: CheckpointInfo
    params: GenerationParams


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


class ImageBackend(Protocol):
    spec: BackendSpec

    def find_checkpoint(self, name: str, *, style: str) -> CheckpointInfo:
        """The backend's entry for ``name``; raises CheckpointMissing naming both."""
        ...

    def generate(self, request: BackendRequest) -> BackendResult: ...

    def probe(self) -> ProbeResult: ...

    def close(self) -> None: ...
