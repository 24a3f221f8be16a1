"""Sampler and scheduler names as AUTOMATIC1111 1.10 knows them, and every spelling it accepts.

A1111 looks names up exactly and silently runs its default for anything else, yet it also
accepts the older combined form "DPM++ 2M Karras" (``get_sampler_and_scheduler`` splits off a
trailing schedule name). charforge accepts every spelling A1111 lists (name, alias, any case,
the combined form) and records the canonical names, so an image says what really ran.

``resolve`` works on any catalog: this built-in one when a request is submitted, and the
lists a WebUI serves (``/sdapi/v1/samplers``, ``/schedulers``) right before it runs.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from charforge.errors import InvalidInput


@dataclass(frozen=True)
class Sampler:
    name: str
    aliases: tuple[str, ...]
    options: dict[str, Any]

    @property
    def default_scheduler(self) -> str | None:
        value = self.options.get("scheduler")
        return value if isinstance(value, str) else None


@dataclass(frozen=True)
class Scheduler:
    name: str  # "karras"
    label: str  # "Karras": what txt2img takes and the infotext writes
    aliases: tuple[str, ...] | None = None
    default_rho: float = -1
    need_inner_model: bool = False


SAMPLERS: tuple[Sampler, ...] = (
    Sampler("DPM++ 2M", ("k_dpmpp_2m",), {"scheduler": "karras"}),
    Sampler(
        "DPM++ SDE",
        ("k_dpmpp_sde",),
        {"scheduler": "karras", "second_order": True, "brownian_noise": True},
    ),
    Sampler(
        "DPM++ 2M SDE", ("k_dpmpp_2m_sde",), {"scheduler": "exponential", "brownian_noise": True}
    ),
    Sampler(
        "DPM++ 2M SDE Heun",
        ("k_dpmpp_2m_sde_heun",),
        {"scheduler": "exponential", "brownian_noise": True, "solver_type": "heun"},
    ),
    Sampler(
        "DPM++ 2S a",
        ("k_dpmpp_2s_a",),
        {"scheduler": "karras", "uses_ensd": True, "second_order": True},
    ),
    Sampler(
        "DPM++ 3M SDE",
        ("k_dpmpp_3m_sde",),
        {"scheduler": "exponential", "discard_next_to_last_sigma": True, "brownian_noise": True},
    ),
    Sampler("Euler a", ("k_euler_a", "k_euler_ancestral"), {"uses_ensd": True}),
    Sampler("Euler", ("k_euler",), {}),
    Sampler("LMS", ("k_lms",), {}),
    Sampler("Heun", ("k_heun",), {"second_order": True}),
    Sampler("DPM2", ("k_dpm_2",), {"discard_next_to_last_sigma": True, "second_order": True}),
    Sampler(
        "DPM2 a",
        ("k_dpm_2_a",),
        {"discard_next_to_last_sigma": True, "uses_ensd": True, "second_order": True},
    ),
    Sampler("DPM fast", ("k_dpm_fast",), {"uses_ensd": True}),
    Sampler("DPM adaptive", ("k_dpm_ad",), {"uses_ensd": True}),
    Sampler("Restart", ("restart",), {"scheduler": "karras", "second_order": True}),
    Sampler("DDIM", ("ddim",), {}),
    Sampler("DDIM CFG++", ("ddim_cfgpp",), {}),
    Sampler("PLMS", ("plms",), {}),
    Sampler("UniPC", ("unipc",), {}),
    Sampler("LCM", ("k_lcm",), {}),
)

SCHEDULERS: tuple[Scheduler, ...] = (
    Scheduler("automatic", "Automatic"),
    Scheduler("uniform", "Uniform", need_inner_model=True),
    Scheduler("karras", "Karras", default_rho=7.0),
    Scheduler("exponential", "Exponential"),
    Scheduler("polyexponential", "Polyexponential", default_rho=1.0),
    Scheduler("sgm_uniform", "SGM Uniform", aliases=("SGMUniform",), need_inner_model=True),
    Scheduler("kl_optimal", "KL Optimal"),
    Scheduler("align_your_steps", "Align Your Steps"),
    Scheduler("simple", "Simple"),
    Scheduler("normal", "Normal"),
    Scheduler("ddim", "DDIM"),
    Scheduler("beta", "Beta"),
)


@dataclass(frozen=True)
class NameBook:
    """Every accepted spelling (lower case) -> the spelling txt2img looks up exactly."""

    samplers: dict[str, str]
    schedulers: dict[str, str] | None  # None: the WebUI has no scheduler list (before 1.9)

    @classmethod
    def of(
        cls,
        samplers: Iterable[tuple[str, Iterable[str]]],
        schedulers: Iterable[tuple[str, Iterable[str]]] | None,
    ) -> NameBook:
        """From (exact name, other spellings) pairs."""

        def book(entries: Iterable[tuple[str, Iterable[str]]]) -> dict[str, str]:
            spellings: dict[str, str] = {}
            for exact, others in entries:
                for spelling in (exact, *others):
                    if spelling:
                        spellings.setdefault(spelling.lower(), exact)
            return spellings

        return cls(book(samplers), None if schedulers is None else book(schedulers))


BUILT_IN = NameBook.of(
    ((s.name, s.aliases) for s in SAMPLERS),
    ((s.label, (s.name, *(s.aliases or ()))) for s in SCHEDULERS),
)


def resolve(
    book: NameBook,
    sampler: str,
    scheduler: str | None,
    *,
    strict: bool,
    where: str = "charforge",
) -> tuple[str, str | None]:
    """(sampler, scheduler) as ``book`` spells them. A combined "DPM++ 2M Karras" is split;
    its schedule wins over ``scheduler`` only when ``scheduler`` is None (a request that
    names two different schedules is refused). Unknown names raise when ``strict``, else
    pass through unchanged (another backend kind may know them)."""
    found = book.samplers.get(sampler.lower())
    if found is None and book.schedulers is not None:
        split = _split_combined(book, sampler)
        if split is not None:
            found, suffix = split
            wanted = book.schedulers.get(scheduler.lower()) if scheduler else None
            if scheduler is not None and wanted != suffix:
                raise InvalidInput(
                    f"Sampler '{sampler}' already names the {suffix} schedule, but scheduler "
                    f"says '{scheduler}'.",
                    field="scheduler",
                    hint=f"Send sampler '{found}' with the scheduler you want, or leave "
                    "scheduler out.",
                )
            scheduler = suffix
    if found is None:
        if strict:
            raise _unknown("sampler", sampler, book.samplers, where)
        found = sampler
    if scheduler is None or book.schedulers is None:
        return found, scheduler
    exact = book.schedulers.get(scheduler.lower())
    if exact is None:
        if strict:
            raise _unknown("scheduler", scheduler, book.schedulers, where)
        exact = scheduler
    return found, exact


def _split_combined(book: NameBook, sampler: str) -> tuple[str, str] | None:
    lowered = sampler.lower()
    for spelling, exact in (book.schedulers or {}).items():
        if lowered.endswith(" " + spelling):
            base = book.samplers.get(lowered[: -len(spelling) - 1].strip())
            if base is not None:
                return base, exact
    return None


def _unknown(field: str, value: str, names: dict[str, str], where: str) -> InvalidInput:
    shown = ", ".join(dict.fromkeys(names.values()))
    return InvalidInput(
        f"{field.capitalize()} '{value}' is not known to {where}; A1111 would silently use "
        f"another. Known: {shown}.",
        field=field,
        hint=f"Pick one of the {field}s listed (any case, an alias, or the combined "
        f'"DPM++ 2M Karras" form), or leave {field} out for the default.',
    )


@dataclass(frozen=True)
class Upscaler:
    """An entry of A1111's ``GET /sdapi/v1/upscalers``."""

    name: str
    model_name: str | None
    model_path: str | None
    scale: float


# ``shared.latent_upscale_modes`` of A1111 1.10 (``GET /sdapi/v1/latent-upscale-modes``): the
# high-resolution pass scales the latent; ``hr_upscaler`` null means "Latent".
LATENT_UPSCALE_MODES: tuple[str, ...] = (
    "Latent",
    "Latent (antialiased)",
    "Latent (bicubic)",
    "Latent (bicubic antialiased)",
    "Latent (nearest)",
    "Latent (nearest-exact)",
)
_KAIR = "https://github.com/cszn/KAIR/releases/download/v1.0/"
_REAL_ESRGAN = "https://github.com/xinntao/Real-ESRGAN/releases/download/"
# The upscalers a fresh A1111 1.10 lists (their model files are fetched on first use).
UPSCALERS: tuple[Upscaler, ...] = (
    Upscaler("None", None, None, 4),
    Upscaler("Lanczos", None, None, 4),
    Upscaler("Nearest", None, None, 4),
    Upscaler("ESRGAN_4x", "ESRGAN_4x", _KAIR + "ESRGAN.pth", 4),
    Upscaler("LDSR", None, "https://heibox.uni-heidelberg.de/f/578df07c8fc04ffbadf3/?dl=1", 4),
    Upscaler("R-ESRGAN 4x+", None, _REAL_ESRGAN + "v0.1.0/RealESRGAN_x4plus.pth", 4),
    Upscaler(
        "R-ESRGAN 4x+ Anime6B", None, _REAL_ESRGAN + "v0.2.2.4/RealESRGAN_x4plus_anime_6B.pth", 4
    ),
    Upscaler("ScuNET GAN", None, _KAIR + "scunet_color_real_gan.pth", 4),
    Upscaler("ScuNET PSNR", None, _KAIR + "scunet_color_real_psnr.pth", 4),
    Upscaler(
        "SwinIR 4x",
        None,
        "https://github.com/JingyunLiang/SwinIR/releases/download/v0.0/"
        "003_realSR_BSRGAN_DFOWMFC_s64w8_SwinIR-L_x4_GAN.pth",
        4,
    ),
)
# What the high-resolution pass may name when no backend says what it has.
BUILT_IN_UPSCALERS: tuple[str, ...] = (*LATENT_UPSCALE_MODES, *(u.name for u in UPSCALERS))


def canonical_upscaler(name: str) -> str:
    """A1111's own spelling of one of its upscalers (it looks them up exactly); any other
    name is left for the backend to judge (an upscaler model added to that WebUI)."""
    lowered = name.strip().lower()
    return next((known for known in BUILT_IN_UPSCALERS if known.lower() == lowered), name)
