"""Whether this Python can run the local engine, and the engine imported on first use.

``missing_engine_packages`` looks for torch, diffusers and transformers without importing them
(a web process that lists and probes must stay free of torch); ``_load_engine_module`` imports
``charforge.backends.local.engine``, the one module of the package that imports them, when a
generation needs it."""

from __future__ import annotations

import importlib.util
from types import ModuleType

from charforge.errors import BackendUnavailable

INSTALL_HINT = "pip install 'charforge[local]'"
ENGINE_PACKAGES = ("torch", "diffusers", "transformers")  # what the local extra installs


class LocalEngineUnavailable(BackendUnavailable):
    """torch/diffusers are not installed here, or the device asked for is missing: waiting
    does not help, another backend of the pool may."""

    transient = False
    backend_specific = True


def _load_engine_module() -> ModuleType:
    try:
        from charforge.backends.local import engine
    except ImportError as exc:
        missing = getattr(exc, "name", None) or str(exc)
        raise LocalEngineUnavailable(
            f"The local engine needs torch, diffusers and transformers, which are not "
            f"installed in this Python ({missing} is missing).",
            hint=f"Install them with: {INSTALL_HINT}",
        ) from exc
    return engine


def missing_engine_packages() -> list[str]:
    """Which of torch, diffusers and transformers this Python lacks; found without importing
    them (a web process that probes must stay free of torch)."""
    missing = []
    for name in ENGINE_PACKAGES:
        try:
            found = importlib.util.find_spec(name) is not None
        except (ImportError, ValueError):  # a broken install, or a stub in sys.modules
            found = False
        if not found:
            missing.append(name)
    return missing
