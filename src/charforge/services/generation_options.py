"""What the Generate page offers for a character: the samplers, schedulers and upscalers of
the backends of its route, and the defaults a request left empty gets.

The backends that answer are asked (A1111: ``/sdapi/v1/samplers``, ``/schedulers``,
``/upscalers``, ``/latent-upscale-modes``; each adapter keeps its lists a minute), at most the
probe timeout; a backend held for down is not asked. A job may go to any backend of the pool,
so a name is offered only when every backend that answered has it. When none answers, or one
kind cannot list names (ComfyUI, RunPod, the local engine take A1111's names and translate
them), the built-in A1111 1.10 lists are offered, with ``source: "builtin"``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from charforge.backends.base import ListsNames, NameLists
from charforge.backends.fan_out import ask_each
from charforge.backends.pool import BackendPool
from charforge.config import GenerationDefaults
from charforge.db.models import Character
from charforge.domain.capabilities import Capability
from charforge.domain.consistency import resolve
from charforge.domain.samplers import BUILT_IN_UPSCALERS, SAMPLERS, SCHEDULERS
from charforge.services.characters import look_of

BUILT_IN = NameLists(
    samplers=[s.name for s in SAMPLERS],
    schedulers=[s.label for s in SCHEDULERS],
    upscalers=list(BUILT_IN_UPSCALERS),
)


@dataclass(frozen=True)
class GenerationOptions:
    style: str
    samplers: list[str]
    schedulers: list[str]
    upscalers: list[str]
    defaults: dict[str, Any]
    source: str  # "backend": read from the route's backends; "builtin": none answered
    backends: list[str]  # the backends whose lists these are


def options_for(
    character: Character, pool: BackendPool, defaults: GenerationDefaults, *, timeout: float
) -> GenerationOptions:
    route = resolve(look_of(character), None, None, pool.table).route
    answers = _ask(
        pool, [n for n in route.backends if pool.status(n).healthy], route.style, timeout
    )
    lists = _merged(list(answers.values())) if answers else BUILT_IN
    specs = [pool.table.backends[n] for n in route.backends]
    hires = defaults.hires and any(s.can({Capability.HIRES}) for s in specs)
    return GenerationOptions(
        style=route.style,
        samplers=lists.samplers,
        schedulers=lists.schedulers,
        upscalers=lists.upscalers,
        defaults={
            "width": defaults.width,
            "height": defaults.height,
            "steps": defaults.steps,
            "cfgScale": defaults.cfg_scale,
            "sampler": defaults.sampler,
            "scheduler": defaults.scheduler,
            "hires": hires,
            "hiresScale": defaults.hires_scale,
            "hiresSteps": defaults.hires_steps,
            "denoisingStrength": defaults.denoising_strength,
            "hiresUpscaler": defaults.hires_upscaler,
            "clipSkip": defaults.clip_skip,
        },
        source="backend" if answers else "builtin",
        backends=sorted(answers),
    )


def _ask(pool: BackendPool, names: list[str], style: str, timeout: float) -> dict[str, NameLists]:
    """Each backend's lists, asked at once; those that came within the timeout."""
    asked: dict[str, ListsNames] = {}
    for name in names:
        backend = pool.backends.get(name)
        if isinstance(backend, ListsNames):
            asked[name] = backend
    if not asked:
        return {}
    return ask_each(
        asked, lambda name: asked[name].name_lists(style), timeout=timeout, what="gen-options"
    )


def _merged(answers: list[NameLists]) -> NameLists:
    """The names every backend has, in the first one's order; a list no backend gave (an
    older WebUI without /schedulers) is the built-in one."""

    def common(kind: str) -> list[str]:
        given = [getattr(a, kind) for a in answers if getattr(a, kind)]
        if not given:
            return list(getattr(BUILT_IN, kind))
        rest = [{name.lower() for name in names} for names in given[1:]]
        return [name for name in given[0] if all(name.lower() in r for r in rest)]

    return NameLists(common("samplers"), common("schedulers"), common("upscalers"))
