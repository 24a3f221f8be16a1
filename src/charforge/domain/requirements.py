"""Fit a request to what the backends of its route can do (see domain.capabilities)."""

from __future__ import annotations

from dataclasses import replace

from charforge.domain.capabilities import DESCRIPTIONS, FIELDS, Capability, needed
from charforge.domain.params import GenerationParams
from charforge.domain.routes import BackendSpec, Route, RouteTable
from charforge.errors import UnsupportedCapability

# What to tell a user who asked for a capability their route cannot give.
_ADVICE: dict[Capability, str] = {
    Capability.HIRES: "Send hires=false",
    Capability.LORA: "Remove the <lora:...> tags from the prompt and the character's description",
    Capability.REFERENCE_IMAGE: "Send identity.strength=0 (or leave identity out to let the "
    "server go without it)",
    Capability.CLIP_SKIP: "Send clipSkip=1 (or leave it out)",
}


def needs_of(params: GenerationParams) -> frozenset[Capability]:
    needs = needed(hires=params.hires, prompt=params.prompt, clip_skip=params.clip_skip)
    if params.identity_required and params.identity_strength > 0:
        needs |= {Capability.REFERENCE_IMAGE}
    return needs


def capable_backends(
    route: Route, table: RouteTable, needs: frozenset[Capability]
) -> tuple[str, ...]:
    """The backends of the route's pool that can run a job with these needs."""
    return tuple(name for name in route.backends if table.backends[name].can(needs))


def fit_to_route(
    params: GenerationParams,
    *,
    hires_asked: bool,
    route: Route,
    table: RouteTable,
    clip_skip_asked: bool = False,
) -> GenerationParams:
    """``params`` as the route can run them: a default high-resolution pass (or clip skip) is
    dropped where no backend of the route has one (and the job records that); anything asked
    for that no backend can do is a 422 naming the backends and the capability."""
    specs = [table.backends[name] for name in route.backends]
    if params.hires and not hires_asked and not any(s.can({Capability.HIRES}) for s in specs):
        params = replace(params, hires=False)
    if (
        params.clip_skip > 1
        and not clip_skip_asked
        and not any(s.can({Capability.CLIP_SKIP}) for s in specs)
    ):
        params = replace(params, clip_skip=1)
    needs = needs_of(params)
    if any(spec.can(needs) for spec in specs):
        return params
    raise _unsupported(route, specs, needs)


def _unsupported(
    route: Route, specs: list[BackendSpec], needs: frozenset[Capability]
) -> UnsupportedCapability:
    lacking = [c for c in sorted(needs) if not any(c in s.capabilities for s in specs)]
    if not lacking:  # each capability exists in the pool, but never all on one backend
        names = ", ".join(sorted(needs))
        return UnsupportedCapability(
            f"No single backend of the {route.style} style can do all of {names} together.",
            field=FIELDS.get(sorted(needs)[0]),
            hint="Ask for fewer of them, or add a backend that has them all to "
            f"[routes.{route.style}] backends.",
        )
    return _lacking(lacking[0], specs, route.style, f"The {route.style} style's backends")


def require_capabilities(
    spec: BackendSpec,
    params: GenerationParams,
    style: str,
    *,
    capabilities: frozenset[Capability] | None = None,
) -> None:
    """For adapters, before anything is sent: the scheduler never gives a backend a job it
    cannot do, but should one come anyway it is refused, never run without what it asked for
    (a pass skipped, LoRA tags rendered as words)."""
    have = spec.capabilities if capabilities is None else capabilities
    lacking = sorted(needs_of(params) - have)
    if lacking:
        raise _lacking(lacking[0], [spec], style, f"Backend '{spec.name}'")


def _lacking(
    capability: Capability, specs: list[BackendSpec], style: str, subject: str
) -> UnsupportedCapability:
    without = ", ".join(f"'{s.name}' ({s.label})" for s in specs)
    return UnsupportedCapability(
        f"{subject} cannot do {DESCRIPTIONS[capability]} ({capability.value}), which this "
        f"request asks for: {without} lack{'s' if len(specs) == 1 else ''} it.",
        field=FIELDS.get(capability),
        hint=f"{_ADVICE.get(capability, 'Leave it out')}, or add a backend that has it to "
        f"[routes.{style}] backends in CHARFORGE_CONFIG.",
        extra={"capability": capability.value, "backends": [s.name for s in specs]},
    )
