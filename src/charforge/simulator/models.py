"""What the simulated WebUI has on disk and in memory: checkpoints, options, LoRAs.

``ModelState`` is thread-safe on its own (one lock); callers that must hold A1111's queue lock
for a load (``POST /options``, a generation) take it themselves.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from charforge.simulator.catalog import BASE_OPTIONS, FORGE_OPTIONS, Checkpoint, find_checkpoint
from charforge.simulator.config import Faults, SimulatorSettings
from charforge.simulator.loras import AppliedLora, LoraCatalog, resolve_loras
from charforge.simulator.txt2img import CORRUPT_CHECKPOINT_MESSAGE, GenerationError, ModelRun

log = logging.getLogger("charforge.simulator")

# Options the simulator computes; a POST cannot set them directly.
COMPUTED_OPTIONS = ("sd_model_checkpoint", "sd_checkpoint_hash")


@dataclass(frozen=True)
class Selection:
    """What ``options.sd_model_checkpoint`` holds: a checkpoint, and the raw value written
    before a load (A1111 sets the option first; only a successful load makes it a title)."""

    name: str
    raw: str | None = None


@dataclass
class Overrides:
    """``override_settings`` as ``process_images`` applied them, and what to put back."""

    model: str
    stored: dict[str, Any]
    saved: Selection
    echoed: dict[str, Any]
    """The overrides as A1111 echoes them (an unknown checkpoint popped out)."""


class ModelState:
    """Checkpoints (listed, selected, in memory), options and LoRAs of one WebUI."""

    def __init__(self, settings: SimulatorSettings) -> None:
        self.settings = settings
        self._lock = threading.RLock()
        self._checkpoints: list[Checkpoint] = []
        self._selected = Selection("")
        self._weights = ""  # the model actually in (simulated) VRAM
        self._options: dict[str, Any] = {}
        self._loras = LoraCatalog()
        self._loads = 0
        self._failed_loads: list[dict[str, Any]] = []
        self.reset()

    def reset(self) -> None:
        """First model loaded (and hashed), default options, no load history."""
        with self._lock:
            self._checkpoints = []
            self.refresh_checkpoints()
            first = self._checkpoints[0]
            first.hashed = True
            self._selected = Selection(first.name)
            self._weights = first.name
            self._options = dict(BASE_OPTIONS)
            if self.settings.flavor == "forge":
                self._options.update(FORGE_OPTIONS)
            self.refresh_loras()
            self._loads = 0
            self._failed_loads.clear()

    # ----------------------------------------------------------------- introspection

    @property
    def selected(self) -> str:
        with self._lock:
            return self._selected.name

    @property
    def weights(self) -> str:
        with self._lock:
            return self._weights

    @property
    def loads(self) -> int:
        with self._lock:
            return self._loads

    @property
    def failed_loads(self) -> list[dict[str, Any]]:
        with self._lock:
            return [dict(item) for item in self._failed_loads]

    def option(self, key: str, default: Any) -> Any:
        with self._lock:
            return self._options.get(key, default)

    # ----------------------------------------------------------------- checkpoints

    def refresh_checkpoints(self) -> None:
        """Re-read ``settings.models``; known checkpoints keep their hashed state."""
        with self._lock:
            known = {c.name: c for c in self._checkpoints}
            always_hashed = self.settings.flavor == "a1111"
            fresh: list[Checkpoint] = []
            for name in dict.fromkeys(self.settings.models):
                fresh.append(known.get(name) or Checkpoint(name=name, hashed=always_hashed))
            if fresh:
                self._checkpoints = fresh

    def sd_models(self) -> list[dict[str, Any]]:
        with self._lock:
            return [c.api_item() for c in self._checkpoints]

    def checkpoint(self, name: str) -> Checkpoint:
        with self._lock:
            for checkpoint in self._checkpoints:
                if checkpoint.name == name:
                    return checkpoint
            # Removed by a refresh while selected: keep answering about it.
            return Checkpoint(name=name, hashed=self.settings.flavor == "a1111")

    def model_run(self, name: str) -> ModelRun:
        checkpoint = self.checkpoint(name)
        return ModelRun(checkpoint.name_for_extra, checkpoint.shorthash)

    def find(self, wanted: str | None) -> Checkpoint | None:
        with self._lock:
            return find_checkpoint(self._checkpoints, wanted)

    def load(self, name: str, faults: Faults, via: str, wait: Callable[[float], None]) -> None:
        """Put ``name`` in VRAM (the caller holds the queue lock). Loading hashes the file
        first; a corrupt one then fails to deserialize and the weights stay as they were."""
        with self._lock:
            if self._weights == name:
                return
        if faults.switch_delay_seconds > 0:
            wait(faults.switch_delay_seconds)
        with self._lock:
            self.checkpoint(name).hashed = True
            if name in faults.corrupt_checkpoints:
                self._failed_loads.append(
                    {"checkpoint": name, "via": via, "error": "SafetensorError"}
                )
                log.error("simulator failed to load checkpoint %s (corrupt)", name)
                raise GenerationError("SafetensorError", CORRUPT_CHECKPOINT_MESSAGE)
            self._weights = name
            self._loads += 1
            if self._selected.name == name:
                self._selected = Selection(name)  # a load writes the title back
        log.info("simulator loaded checkpoint %s", name)

    def select(self, selection: Selection) -> None:
        with self._lock:
            self._selected = selection

    # ----------------------------------------------------------------- options

    def options(self) -> dict[str, Any]:
        with self._lock:
            selected = self.checkpoint(self._selected.name)
            weights = self.checkpoint(self._weights)
            return {
                **self._options,
                "sd_model_checkpoint": self._selected.raw or selected.title,
                "sd_checkpoint_hash": weights.sha256,
            }

    def set_plain_options(self, values: dict[str, Any]) -> None:
        """Every option but the computed ones (the checkpoint goes through a load)."""
        with self._lock:
            for key, value in values.items():
                if key not in COMPUTED_OPTIONS:
                    self._options[key] = value

    def apply_overrides(self, overrides: dict[str, Any], ignore_checkpoint: bool) -> Overrides:
        """``process_images``: a known checkpoint override is written to the option (to be
        loaded next), an unknown one is popped out; the other overrides are set as given."""
        echoed = dict(overrides)
        wanted = echoed.get("sd_model_checkpoint")
        with self._lock:
            stored = {k: self._options[k] for k in echoed if k in self._options}
            saved = self._selected
            target = self.find(str(wanted)) if wanted is not None else None
            if wanted is not None and target is None:
                log.warning("checkpoint %r not found; keeping %s", wanted, saved.name)
                echoed.pop("sd_model_checkpoint", None)
            if target is not None and not ignore_checkpoint:
                self._selected = Selection(target.name, str(wanted))
            self.set_plain_options(echoed)
            return Overrides(self._selected.name, stored, saved, echoed)

    def restore(self, overrides: Overrides) -> None:
        with self._lock:
            self._options.update(overrides.stored)
            self._selected = overrides.saved

    # ----------------------------------------------------------------- LoRAs

    def refresh_loras(self) -> None:
        """``POST /sdapi/v1/refresh-loras``: re-read ``settings.loras``."""
        with self._lock:
            self._loras.refresh(list(self.settings.loras), dict(self.settings.lora_metadata))

    def loras(self) -> list[dict[str, Any]]:
        with self._lock:
            return self._loras.api_list()

    def activate_loras(self, prompt: str) -> tuple[list[AppliedLora], str | None]:
        """``extra_networks.activate`` for the Lora network: (applied, ``Lora hashes``)."""
        with self._lock:
            default = float(self._options.get("extra_networks_default_multiplier", 1.0) or 0)
            applied, hashes = resolve_loras(self._loras, prompt, self.refresh_loras, default)
            if not self._options.get("lora_add_hashes_to_infotext", True):
                hashes = None
            return applied, hashes
