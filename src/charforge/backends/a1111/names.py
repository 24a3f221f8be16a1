"""What one A1111/Forge WebUI has by name: samplers, schedulers, LoRAs and high-resolution
upscalers, read from its lists and kept for a minute.

A1111 silently replaces an unknown sampler or scheduler and silently ignores an unknown LoRA,
so those are checked here before anything runs; an unknown ``hr_upscaler`` fails the job with a
500 only after the first pass ("could not find upscaler named ..."), and it is looked up
exactly, so it is checked too and sent in the WebUI's own spelling.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any, TypeVar

from charforge.backends.a1111.client import A1111Client
from charforge.backends.base import NameLists
from charforge.domain.capabilities import lora_tags
from charforge.domain.routes import BackendSpec
from charforge.domain.samplers import LATENT_UPSCALE_MODES, NameBook
from charforge.errors import BackendRejected, LoraMissing, UpscalerMissing

CACHE_SECONDS = 60.0
T = TypeVar("T")


class WebUINames:
    def __init__(self, spec: BackendSpec, http: A1111Client) -> None:
        self.spec = spec
        self._http = http
        self._cache: dict[str, tuple[float, Any]] = {}
        self._lock = threading.Lock()

    def _cached(self, key: str, fetch: Callable[[], T], *, fresh: bool = False) -> T:
        with self._lock:
            hit = self._cache.get(key)
            if not fresh and hit and time.monotonic() - hit[0] < CACHE_SECONDS:
                value: T = hit[1]
                return value
        value = fetch()
        with self._lock:
            self._cache[key] = (time.monotonic(), value)
        return value

    def _list(self, path: str, style: str | None) -> list[dict[str, Any]] | None:
        """A WebUI list (samplers, schedulers, loras, upscalers); None when it has no such
        route."""
        try:
            response = self._http.call("GET", path, style=style)
        except BackendRejected as exc:
            if "404" in exc.message:
                return None  # A1111 before 1.9 has no /schedulers; no Lora extension
            raise
        data = self._http.json(response, style)
        return [item for item in data if isinstance(item, dict)] if isinstance(data, list) else []

    # -- samplers and schedulers ---------------------------------------------------------------

    def _sampling_lists(self, style: str | None) -> tuple[list[dict[str, Any]], list[Any] | None]:
        def fetch() -> tuple[list[dict[str, Any]], list[Any] | None]:
            samplers = self._list("/sdapi/v1/samplers", style) or []
            return samplers, self._list("/sdapi/v1/schedulers", style)

        return self._cached("sampling", fetch)

    def name_book(self, style: str | None = None) -> NameBook:
        """Every sampler and scheduler spelling this WebUI takes -> the one txt2img looks up
        exactly (a sampler by name, a scheduler by name or label; aliases only in the lists)."""
        samplers, schedulers = self._sampling_lists(style)
        return NameBook.of(
            ((str(s["name"]), s.get("aliases") or ()) for s in samplers if s.get("name")),
            None
            if schedulers is None
            else (
                (str(s["label"]), (s.get("name"), *(s.get("aliases") or ())))
                for s in schedulers
                if s.get("label")
            ),
        )

    # -- LoRAs -----------------------------------------------------------------------------------

    def _lora_names(self, style: str, *, fresh: bool = False) -> list[str]:
        """Names and aliases a ``<lora:...>`` tag may use (A1111 looks them up exactly)."""

        def fetch() -> list[str]:
            items = self._list("/sdapi/v1/loras", style) or []
            names = [str(i[key]) for i in items for key in ("name", "alias") if i.get(key)]
            return list(dict.fromkeys(names))

        return self._cached("loras", fetch, fresh=fresh)

    def check_loras(self, prompt: str, style: str) -> None:
        """Every ``<lora:name>`` tag names a LoRA this WebUI has: A1111 silently renders
        without an unknown one, so it is refused before anything runs."""
        wanted = [name for name, _ in lora_tags(prompt)]
        if not wanted:
            return
        known = set(self._lora_names(style))
        if any(name not in known for name in wanted):
            # A file dropped into models/Lora shows up after a refresh.
            self._http.call("POST", "/sdapi/v1/refresh-loras", style=style)
            known = set(self._lora_names(style, fresh=True))
        missing = [name for name in wanted if name not in known]
        if missing:
            has = ", ".join(sorted(known)) or "none"
            near = [k for k in known for m in missing if k.lower() == m.lower()]
            raise LoraMissing(
                f"LoRA {', '.join(repr(m) for m in missing)} is not on backend "
                f"'{self.spec.name}' (A1111 would silently render without it). "
                f"That backend has: {has}.",
                field="prompt",
                hint=(f"Did you mean {near[0]}? LoRA names are exact. " if near else "")
                + "Put the file into the WebUI's models/Lora folder, or fix the "
                "<lora:name:weight> tag in the prompt or the character's description.",
                extra={"loras": sorted(known)},
            )

    # -- upscalers -------------------------------------------------------------------------------

    def upscalers(self, style: str | None, *, fresh: bool = False) -> list[str] | None:
        """The latent modes, then the upscalers; None when the WebUI lists no upscalers."""

        def fetch() -> list[str] | None:
            items = self._list("/sdapi/v1/upscalers", style)
            if items is None:
                return None
            modes = self._list("/sdapi/v1/latent-upscale-modes", style)
            latent = [str(m["name"]) for m in modes or [] if m.get("name")]
            named = [str(u["name"]) for u in items if u.get("name")]
            return list(dict.fromkeys([*(latent or LATENT_UPSCALE_MODES), *named]))

        return self._cached("upscalers", fetch, fresh=fresh)

    def upscaler(self, asked: str, style: str) -> str:
        """``asked`` in the WebUI's own spelling (A1111 looks it up exactly, case included);
        UpscalerMissing listing what it has when it has no such upscaler. A WebUI that lists
        none is trusted with the name as it is."""
        for fresh in (False, True):  # an upscaler model added since is listed on a new read
            known = self.upscalers(style, fresh=fresh)
            if known is None:
                return asked
            found = next((name for name in known if name.lower() == asked.lower()), None)
            if found is not None:
                return found
        raise UpscalerMissing(
            f"Upscaler '{asked}' is not on backend '{self.spec.name}' (A1111 would fail the "
            f"job after its first pass). That backend has: {', '.join(known or [])}.",
            field="hiresUpscaler",
            hint="Pick one of the upscalers listed (any case), put the upscaler's model into "
            "the WebUI's models folder, or leave hiresUpscaler out for the default.",
            extra={"upscalers": known or []},
        )

    # -- everything the Generate page offers -----------------------------------------------------

    def lists(self, style: str | None) -> NameLists:
        samplers, schedulers = self._sampling_lists(style)
        return NameLists(
            samplers=[str(s["name"]) for s in samplers if s.get("name")],
            schedulers=[str(s["label"]) for s in schedulers or [] if s.get("label")],
            upscalers=self.upscalers(style) or [],
        )
