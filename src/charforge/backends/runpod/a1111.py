"""Images from runpod-workers/worker-a1111, and what ran checked against what was asked.

worker-a1111 hands ``input`` to ``/sdapi/v1/txt2img`` unchanged and returns A1111's answer
(an error answer too, which makes the job FAILED). Nothing lists the worker's samplers or
schedulers, and A1111 silently replaces a name it does not know, so its ``info`` says what ran
(``sampler_name``; since 1.9 ``extra_generation_params["Schedule type"]``) and is compared with
the request. Identity goes in ``alwayson_scripts.controlnet`` as on A1111 (identity.py).
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from charforge.backends.a1111 import parse_txt2img, txt2img_payload
from charforge.backends.a1111.controlnet import (
    DEFAULT_UNITS,
    REFERENCE_ONLY,
    script_missing,
    units_reported,
    with_units,
)
from charforge.backends.base import BackendRequest, BackendResult, IdentityUse
from charforge.backends.identity_rule import asked
from charforge.backends.runpod.client import RunPodClient
from charforge.backends.runpod.identity import NO_CONTROLNET, RunPodIdentity
from charforge.backends.runpod.jobs import JobRunner
from charforge.domain.params import GenerationParams
from charforge.errors import BackendRejected, InvalidInput

# A1111 1.10's schedule types (modules/sd_schedulers.py): its txt2img takes a schedule's name,
# its label or an alias for the same one; every spelling, lowered, -> the label, lowered.
_SCHEDULES: dict[str, str] = {
    "automatic": "automatic",
    "uniform": "uniform",
    "karras": "karras",
    "exponential": "exponential",
    "polyexponential": "polyexponential",
    "sgm_uniform": "sgm uniform",
    "sgm uniform": "sgm uniform",
    "sgmuniform": "sgm uniform",
    "kl_optimal": "kl optimal",
    "kl optimal": "kl optimal",
    "align_your_steps": "align your steps",
    "align your steps": "align your steps",
    "simple": "simple",
    "normal": "normal",
    "ddim": "ddim",
    "beta": "beta",
}
# Longest first, so "SGM Uniform" is not read as "Uniform".
_SCHEDULE_SUFFIXES = sorted(_SCHEDULES, key=len, reverse=True)
# A1111's aliases of its samplers (modules/sd_samplers_*.py), lowered -> the name it reports.
_SAMPLER_ALIASES: dict[str, str] = {
    "k_dpmpp_2m": "dpm++ 2m",
    "k_dpmpp_sde": "dpm++ sde",
    "k_dpmpp_2m_sde": "dpm++ 2m sde",
    "k_dpmpp_2m_sde_heun": "dpm++ 2m sde heun",
    "k_dpmpp_2s_a": "dpm++ 2s a",
    "k_dpmpp_3m_sde": "dpm++ 3m sde",
    "k_euler_a": "euler a",
    "k_euler_ancestral": "euler a",
    "k_euler": "euler",
    "k_lms": "lms",
    "k_heun": "heun",
    "k_dpm_2": "dpm2",
    "k_dpm_2_a": "dpm2 a",
    "k_dpm_fast": "dpm fast",
    "k_dpm_ad": "dpm adaptive",
    "k_lcm": "lcm",
    "ddim_cfgpp": "ddim cfg++",
}


class A1111Worker:
    def __init__(self, client: RunPodClient, jobs: JobRunner, identity: RunPodIdentity) -> None:
        self.client, self.jobs, self.identity = client, jobs, identity

    def generate(self, request: BackendRequest, deadline: float) -> BackendResult:
        where = self.client.where(request.style)
        payload = txt2img_payload(request)
        payload.pop("force_task_id", None)  # the worker's WebUI is its own; ids mean nothing
        units, identity = self._units(request)
        try:
            output = self.jobs.run(
                with_units(payload, units) if units else payload,
                request.style,
                deadline,
                request=request,
            )
        except BackendRejected as exc:
            if not (units and script_missing(exc.message)):
                raise
            # The worker's WebUI has no ControlNet: say so, and go without.
            self.identity.found_missing(NO_CONTROLNET)
            identity = self.identity.without(request, NO_CONTROLNET)
            units = []
            output = self.jobs.run(payload, request.style, deadline, request=request)
        result = parse_txt2img(output, where)
        check_sampling(result.info, request.params, where)
        if units and not units_reported(result.info, len(units)):
            # The extension names every unit it ran; one it skipped leaves the image
            # unconditioned, and that is never claimed.
            identity = self.identity.without(
                request, "the ControlNet extension did not apply the units"
            )
        elif units:
            self.identity.found_working()
        return replace(result, identity=identity)

    def _units(self, request: BackendRequest) -> tuple[list[dict[str, Any]], IdentityUse | None]:
        """The ControlNet units of this request (reference_only: the worker's models cannot
        be listed, and it needs none), and what its images will say about identity."""
        if not asked(request):
            return [], None
        why = self.identity.known_missing()
        if why is not None:
            return [], self.identity.without(request, why)
        # The worker's settings cannot be asked either: the extension's default unit count.
        units, label = REFERENCE_ONLY.capped(
            request.references, request.params.identity_strength, DEFAULT_UNITS
        )
        return units, IdentityUse(True, label)


def check_sampling(info: Any, p: GenerationParams, where: str) -> None:
    """A1111 silently runs its default for a sampler or schedule type it does not know,
    and RunPod cannot list the worker's names first: compare what ran (``info``) with
    what was asked, and discard the images when they differ."""
    if not isinstance(info, dict):
        return
    sampler, suffix = _split_schedule(p.sampler)
    ran_sampler = info.get("sampler_name")
    if (
        isinstance(ran_sampler, str)
        and ran_sampler
        and sampler  # none asked: A1111's default is what was asked for
        and not (_same_sampler(p.sampler, ran_sampler) or _same_sampler(sampler, ran_sampler))
    ):
        raise _not_what_ran("sampler", p.sampler, ran_sampler, where)
    # A suffix of an old combined name ("DPM++ 2M Karras") wins over the scheduler field,
    # in A1111 as here; "Automatic" (or none) asks for the sampler's own default.
    # Before 1.9 (and for samplers without a schedule) no "Schedule type" is reported.
    asked = suffix or p.scheduler
    extra = info.get("extra_generation_params")
    ran_schedule = extra.get("Schedule type") if isinstance(extra, dict) else None
    if (
        isinstance(ran_schedule, str)
        and ran_schedule
        and _schedule_key(asked) not in ("", "automatic")
        and _schedule_key(asked) != _schedule_key(ran_schedule)
    ):
        raise _not_what_ran("scheduler", asked, ran_schedule, where)


def _not_what_ran(field: str, asked: str, ran: str, where: str) -> InvalidInput:
    return InvalidInput(
        f"{field.capitalize()} '{asked}' is not known to {where}: its A1111 "
        f"worker silently ran '{ran}' instead, so the images were discarded.",
        field=field,
        hint=f"Use a {field} name that A1111 lists (/sdapi/v1/{field}s), e.g. '{ran}', or "
        f"leave {field} out for the default.",
    )


def _schedule_key(name: str) -> str:
    """A schedule type as A1111 compares them: its name, label or alias are the same one."""
    lowered = name.strip().lower()
    return _SCHEDULES.get(lowered, lowered)


def _split_schedule(sampler: str) -> tuple[str, str | None]:
    """A1111's reading of an old combined sampler name: "DPM++ 2M Karras" is the sampler
    "DPM++ 2M" with the schedule "Karras" (which wins over the scheduler field)."""
    name = sampler.strip()
    lowered = name.lower()
    for suffix in _SCHEDULE_SUFFIXES:
        if lowered.endswith(" " + suffix):
            return name[: -len(suffix) - 1].rstrip(), name[-len(suffix) :]
    return name, None


def _same_sampler(asked: str, ran: str) -> bool:
    """Whether A1111 reporting ``ran`` means it ran the sampler asked for: the same name in
    any case, or an alias of it (A1111 reports the sampler's own name)."""
    wanted, reported = asked.strip().lower(), ran.strip().lower()
    return wanted == reported or _SAMPLER_ALIASES.get(wanted) == reported
