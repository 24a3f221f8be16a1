"""The local engine: diffusers in this process, checkpoints from a models folder.

A checkpoint is a single ``.safetensors`` (or ``.ckpt``) file or a diffusers folder (one with
a ``model_index.json``) anywhere under the models folder (CHARFORGE_MODELS_DIR, or
``models_dir`` of the backend); its name is its path relative to that folder, as A1111 lists
``anime/diving.safetensors``.

Listing, finding and probing read the folder only: no module of this package but ``engine``
imports torch or diffusers, so a web process (which lists checkpoints and probes in distributed
mode) never loads them. ``generate`` imports ``charforge.backends.local.engine`` on first use;
without the ``local`` extra that is a clear error naming ``pip install 'charforge[local]'``.

The modules: ``models_folder`` (checkpoints found and matched, their hashes), ``settings_plan``
(A1111's sampler, scheduler and upscaler names as diffusers', sizes, seeds), ``progress``,
``availability`` (the extra found without importing it, the engine imported on first use),
``adapter`` (``LocalBackend``); ``engine`` (torch and diffusers), ``configs`` (the SD 1.x
config folder, architectures told from a file's tensors) and ``keys`` (checkpoint key layouts).

Behaviour worth knowing:
- one pipeline stays loaded between jobs and is replaced only when another checkpoint is
  asked for, or the same one's weights changed on disk (it is keyed by path and hash, and the
  hash reported is the one of the weights that ran); one generation runs at a time (a lock);
- hashes are A1111's: sha256 of the file (the first 10 hex digits are the short form); for a
  folder the sha256 of its UNet (or transformer) weights. Hashing gigabytes is slow, so hashes
  are kept per (path, size, mtime, ctime) in ``.charforge/hashes.json`` in the models folder
  (or in the user's cache folder when the models folder is read-only);
- ``interrupt`` stops every generate call active when it is called, also one still hashing
  or waiting for the lock, and says False when none was;
- a probe reports the backend down when torch, diffusers or transformers are not installed
  (found without importing them);
- sampler and scheduler names are A1111's and are checked before anything is loaded;
- the high-resolution pass is an img2img pass over the first image upscaled by
  ``hires_scale`` (latents for A1111's "Latent" upscalers, the decoded image otherwise), with
  the components of the loaded pipeline;
- single files need a config folder: ``single_file_config`` of the backend when set, else a
  Stable Diffusion 1.x config written once by charforge (``configs``); for any other
  architecture the error says to set ``single_file_config``.
"""

from charforge.backends.local.adapter import LocalBackend, LocalCheckpointUnusable
from charforge.backends.local.availability import (
    ENGINE_PACKAGES,
    INSTALL_HINT,
    LocalEngineUnavailable,
    missing_engine_packages,
)
from charforge.backends.local.models_folder import (
    HashCache,
    LocalCheckpoint,
    match_checkpoint,
    scan_models,
    short_hash,
)
from charforge.backends.local.settings_plan import (
    SAMPLERS,
    SCHEDULES,
    UPSCALERS,
    SamplerPlan,
    hires_size,
    plan_sampler,
    plan_seeds,
    plan_upscaler,
)

__all__ = [
    "ENGINE_PACKAGES",
    "INSTALL_HINT",
    "SAMPLERS",
    "SCHEDULES",
    "UPSCALERS",
    "HashCache",
    "LocalBackend",
    "LocalCheckpoint",
    "LocalCheckpointUnusable",
    "LocalEngineUnavailable",
    "SamplerPlan",
    "hires_size",
    "match_checkpoint",
    "missing_engine_packages",
    "plan_sampler",
    "plan_seeds",
    "plan_upscaler",
    "scan_models",
    "short_hash",
]
