"""What every backend offers the job runner."""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

from charforge.domain.capabilities import Capability
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
class ReferenceImage:
    """A character's reference picture, as stored (PNG)."""

    sha256: str
    png: bytes


@dataclass(frozen=True)
class IdentityUse:
    """Whether a generation was conditioned on the references, and how; or why not."""

    applied: bool
    method: str | None = None  # "controlnet ip-adapter (ip-adapter-plus-face_sd15)", ...
    reason: str | None = None

    def to_json(self, strength: float) -> dict[str, Any]:
        if self.applied:
            return {"applied": True, "strength": strength, "method": self.method}
        return {"applied": False, "reason": self.reason}


@dataclass(frozen=True)
class BackendRequest:
    style: str
    checkpoint: CheckpointInfo
    params: GenerationParams
    count: int = 1  # images wanted, one seed after the other (A1111's n_iter)
    on_progress: Callable[[Progress], None] | None = None
    # Names this attempt on the backend (A1111's force_task_id), so that its progress,
    # cancel and timeout touch only it. Every process derives the same id (task_id_of).
    task_id: str | None = None
    # Set when the attempt must stop (cancelled, lease lost): checked before anything is sent
    # and while it runs, so a cancel that comes before the adapter knows the task is not lost.
    cancelled: threading.Event | None = None
    # Conditioning pictures, used at params.identity_strength (0: none). Without a way to use
    # them the adapter refuses when params.identity_required, else runs without and says so.
    references: tuple[ReferenceImage, ...] = ()


def task_id_of(job_id: str, attempt: int) -> str:
    return f"charforge-{job_id}-{attempt}"


@dataclass(frozen=True)
class GeneratedImage:
    data: bytes  # as the backend sent it; validated when stored
    seed: int
    # Infotext fields of the run that charforge does not write itself ("Lora hashes",
    # "TI hashes", "ControlNet 0", ...): kept in the stored PNG.
    extra: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class BackendResult:
    images: list[GeneratedImage]
    checkpoint: str | None  # the model that really ran, as the backend reports it
    checkpoint_hash: str | None
    info: dict[str, Any] = field(default_factory=dict)
    # The sampler and schedule that ran, as the backend names them (None: as asked).
    sampler: str | None = None
    scheduler: str | None = None
    identity: IdentityUse | None = None  # None: no conditioning was asked for
    # Cancelled while it ran: this many images were whole before the stop (the rest were
    # never made or are half-made, and are not in ``images``); None: it was not cancelled.
    stopped_after: int | None = None


@dataclass(frozen=True)
class ProbeResult:
    ok: bool
    latency_ms: float | None
    error: str | None = None
    checkpoints: list[CheckpointInfo] = field(default_factory=list)
    loaded: str | None = None  # the checkpoint in memory now, where the backend says
    # What its kind can do but this one cannot, found out by asking it (A1111 without the
    # ControlNet extension lacks reference_image); None: not asked (it did not answer).
    lacking: frozenset[Capability] | None = None
    identity_method: str | None = None  # how it conditions on references, when it can


@dataclass(frozen=True)
class NameLists:
    """What a backend offers by name, as A1111 names them: samplers, schedule types (labels)
    and high-resolution upscalers (latent modes first). An empty list: not listed."""

    samplers: list[str]
    schedulers: list[str]
    upscalers: list[str]


@runtime_checkable
class ListsNames(Protocol):
    """A backend that can say which samplers, schedulers and upscalers it has."""

    def name_lists(self, style: str | None) -> NameLists: ...


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

    def interrupt(self, task_id: str) -> bool:
        """Stop the generation of this attempt (``BackendRequest.task_id``) and no other; True
        when the backend was asked to. An attempt that waits behind another one is stopped
        when it starts, never by stopping the one that runs."""
        ...

    def close(self) -> None: ...
