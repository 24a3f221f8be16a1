"""The local diffusers engine (backends of kind "local").

The first part needs no torch: names, listing, hashing, errors, the SD 1.5 config folder and a
web process that must never import torch. The second part renders with tiny random Stable
Diffusion checkpoints built here from configs (a diffusers folder each, tiny-a and tiny-b, and
tiny-a's weights as one A1111-style .safetensors file), on the CPU, offline; it is skipped
where the ``local`` extra (torch, diffusers, transformers) is not installed.
"""

from __future__ import annotations

import hashlib
import importlib.util
import io
import json
import os
import shutil
import socket
import struct
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from PIL import Image

import charforge.backends.local
from charforge.backends.base import BackendRequest, CheckpointInfo, Progress
from charforge.backends.local import (
    ENGINE_PACKAGES,
    SAMPLERS,
    LocalBackend,
    LocalCheckpointUnusable,
    LocalEngineUnavailable,
    hires_size,
    match_checkpoint,
    missing_engine_packages,
    plan_sampler,
    plan_seeds,
    plan_upscaler,
    scan_models,
)
from charforge.backends.local.configs import (
    SD1,
    SDXL,
    UNKNOWN,
    clip_vocab_and_merges,
    detect_architecture,
    ensure_sd15_config,
    find_clip_bpe,
    safetensors_shapes,
)
from charforge.backends.local.keys import (
    canonical_key,
    layout_problem,
    renamed_keys,
    unwrap_state_dict,
)
from charforge.backends.local.models_folder import _Stopped
from charforge.config import BackendConfig, RouteConfig
from charforge.domain.params import GenerationParams
from charforge.domain.routes import BackendSpec
from charforge.errors import CheckpointMissing, InvalidInput, UnsupportedCapability
from charforge.simulator import A1111Simulator
from tests.conftest import Live

SOURCE = "[backends.loc] in charforge.toml"

pytestmark = [
    # diffusers' schedulers hand torch tensors to NumPy; torch 2.13's Tensor.__array__ and
    # __array_wrap__ predate NumPy 2's signatures. Not charforge's code, and harmless.
    pytest.mark.filterwarnings("ignore:__array__ implementation doesn't accept:DeprecationWarning"),
    pytest.mark.filterwarnings("ignore:__array_wrap__ must accept context:DeprecationWarning"),
]


def spec_for(models_dir: Path, **extra: Any) -> BackendSpec:
    return BackendSpec(
        name="loc",
        kind="local",
        url=f"local:{models_dir}",
        auth=None,
        timeout=60.0,
        connect_timeout=2.0,
        source=SOURCE,
        models_dir=models_dir,
        device="cpu",
        **extra,
    )


def params(**extra: Any) -> GenerationParams:
    values: dict[str, Any] = {
        "prompt": "a red fox in the snow",
        "negative_prompt": "blurry",
        "width": 64,
        "height": 64,
        "steps": 2,
        "cfg_scale": 7.0,
        "seed": 1234,
        "sampler": "DPM++ 2M",
        "scheduler": "Karras",
        "hires": True,
        "hires_scale": 1.5,
        "hires_upscaler": "Latent",
        "denoising_strength": 0.5,
    }
    values.update(extra)
    return GenerationParams(**values)


TASK = "charforge-job-1"


def request(
    checkpoint: str = "tiny-a", *, count: int = 1, on_progress: Any = None, **extra: Any
) -> BackendRequest:
    return BackendRequest(
        "anime",
        CheckpointInfo(checkpoint, checkpoint, None),
        params(**extra),
        count,
        on_progress,
        task_id=TASK,
    )


def write_safetensors_header(path: Path, shapes: dict[str, tuple[int, ...]]) -> None:
    """A .safetensors header naming float16 tensors of these shapes; the data is left out
    (SD-sized embeddings would be 100+ MB), which is all that reading a header needs."""
    header: dict[str, Any] = {}
    offset = 0
    for name, shape in shapes.items():
        size = 2
        for n in shape:
            size *= n
        header[name] = {
            "dtype": "F16",
            "shape": list(shape),
            "data_offsets": [offset, offset + size],
        }
        offset += size
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw)


def png_size(data: bytes) -> tuple[int, int]:
    with Image.open(io.BytesIO(data)) as image:
        assert image.format == "PNG"
        return image.size


def pixels(data: bytes) -> bytes:
    with Image.open(io.BytesIO(data)) as image:
        return image.convert("RGB").tobytes()


# Tensor names and shapes that tell the architectures apart (a few of each family's keys).
SD1_KEYS: dict[str, tuple[int, ...]] = {
    "model.diffusion_model.input_blocks.0.0.weight": (320, 4, 3, 3),
    "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": (320, 768),
    "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight": (49408, 768),
    "first_stage_model.encoder.conv_in.weight": (128, 3, 3, 3),
}
SDXL_KEYS: dict[str, tuple[int, ...]] = {
    "model.diffusion_model.input_blocks.0.0.weight": (320, 4, 3, 3),
    "conditioner.embedders.0.transformer.text_model.embeddings.token_embedding.weight": (
        49408,
        768,
    ),
    "conditioner.embedders.1.model.token_embedding.weight": (49408, 1280),
}


# -- without torch -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("sampler", "scheduler", "cls", "sigmas"),
    [
        ("Euler", "Automatic", "EulerDiscreteScheduler", None),
        ("Euler a", "Karras", "EulerAncestralDiscreteScheduler", "karras"),
        ("DPM++ 2M", "Karras", "DPMSolverMultistepScheduler", "karras"),
        ("dpm++ 2m karras", "", "DPMSolverMultistepScheduler", "karras"),  # A1111 < 1.9 title
        ("DDIM", "Uniform", "DDIMScheduler", None),
        ("LMS", "Exponential", "LMSDiscreteScheduler", "exponential"),
        ("Heun", "Automatic", "HeunDiscreteScheduler", None),
        ("UniPC", "SGM Uniform", "UniPCMultistepScheduler", None),
        ("DPM++ SDE", "Karras", "DPMSolverSDEScheduler", "karras"),
    ],
)
def test_a1111_names_map_to_diffusers_schedulers(
    sampler: str, scheduler: str, cls: str, sigmas: str | None
) -> None:
    plan = plan_sampler(sampler, scheduler)
    assert (plan.class_name, plan.sigmas) == (cls, sigmas)
    if sampler.startswith("DPM++ 2M"):
        assert plan.options == {"algorithm_type": "dpmsolver++", "solver_order": 2}
    if scheduler == "SGM Uniform":
        assert plan.options["timestep_spacing"] == "trailing"


def test_unknown_sampler_or_scheduler_is_a_422_naming_field_and_known_names() -> None:
    with pytest.raises(InvalidInput) as caught:
        plan_sampler("Euler Z", "Karras")
    assert caught.value.field == "sampler"
    assert "Euler Z" in caught.value.message and "DPM++ 2M" in caught.value.message
    assert caught.value.status == 422
    with pytest.raises(InvalidInput) as caught:
        plan_sampler("Euler", "Wobbly")
    assert caught.value.field == "scheduler" and "Karras" in caught.value.message


def test_hires_size_and_upscalers() -> None:
    assert hires_size(64, 64, 1.5) == (96, 96)
    assert hires_size(512, 768, 1.5) == (768, 1152)
    assert hires_size(72, 64, 1.3) == (96, 80)  # 93.6 -> 96, 83.2 -> 80: multiples of 8
    assert plan_upscaler("Latent") == ("Latent", (True, "bilinear", False))
    assert plan_upscaler("lanczos")[0] == "Lanczos"
    assert plan_upscaler("R-ESRGAN 4x+")[0] == "Lanczos"  # no ESRGAN weights here


@pytest.fixture
def fake_models(tmp_path: Path) -> Path:
    """A models folder with a single file, a diffusers folder and things that are neither."""
    models = tmp_path / "models"
    (models / "anime").mkdir(parents=True)
    write_safetensors_header(models / "anime" / "diving.safetensors", SD1_KEYS)
    (models / "old.ckpt").write_bytes(b"not really a checkpoint")
    (models / "tiny-a" / "unet").mkdir(parents=True)
    (models / "tiny-a" / "model_index.json").write_text('{"_class_name": "X"}')
    (models / "tiny-a" / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(b"u" * 100)
    (models / "tiny-a" / "vae.safetensors").write_bytes(b"part of the folder, not a checkpoint")
    (models / "notes.txt").write_text("not a checkpoint")
    (models / ".charforge").mkdir()
    (models / ".charforge" / "hidden.safetensors").write_bytes(b"x")
    return models


def test_lists_files_and_diffusers_folders(fake_models: Path) -> None:
    found = scan_models(fake_models)
    assert [c.name for c in found] == ["anime/diving.safetensors", "old.ckpt", "tiny-a"]
    assert match_checkpoint("diving.safetensors", found) == found[0]  # folder aside, as A1111
    assert match_checkpoint("anime/diving.safetensors [abcdef0123]", found) == found[0]
    assert match_checkpoint("diving", found) == found[0]
    assert match_checkpoint("tiny-a", found) == found[2]
    assert match_checkpoint("tiny-b", found) is None

    backend = LocalBackend(spec_for(fake_models))
    info = backend.find_checkpoint("diving.safetensors", style="anime")
    file_sha = hashlib.sha256((fake_models / "anime" / "diving.safetensors").read_bytes())
    assert info == CheckpointInfo(
        "anime/diving.safetensors", "anime/diving.safetensors", file_sha.hexdigest()[:10]
    )
    folder = backend.find_checkpoint("tiny-a", style="anime")
    # A folder's hash is its UNet weights' hash: stable while the weights are.
    assert folder.hash == hashlib.sha256(b"u" * 100).hexdigest()[:10]


def test_missing_checkpoint_names_the_folder_its_setting_and_what_is_there(
    fake_models: Path,
) -> None:
    backend = LocalBackend(spec_for(fake_models))
    with pytest.raises(CheckpointMissing) as caught:
        backend.find_checkpoint("cyberrealistic.safetensors", style="realistic")
    error = caught.value
    assert "cyberrealistic.safetensors" in error.message and str(fake_models) in error.message
    assert "anime/diving.safetensors, old.ckpt, tiny-a" in error.message
    assert error.hint is not None
    assert "CHARFORGE_MODELS_DIR" in error.hint and SOURCE in error.hint
    assert error.backend_specific  # another backend of the pool may have it

    gone = LocalBackend(spec_for(fake_models / "nowhere"))
    with pytest.raises(CheckpointMissing, match="does not exist"):
        gone.find_checkpoint("tiny-a", style="anime")
    probe = gone.probe()
    assert not probe.ok and probe.error is not None and "does not exist" in probe.error


def test_hashes_are_cached_per_size_and_mtime_and_kept_on_disk(fake_models: Path) -> None:
    path = fake_models / "anime" / "diving.safetensors"
    backend = LocalBackend(spec_for(fake_models))
    first = backend.find_checkpoint("diving", style="anime").hash
    cache = json.loads((fake_models / ".charforge" / "hashes.json").read_text())
    assert cache[str(path)]["sha256"].startswith(first or "-")

    # A probe never reads weights: it shows hashes already known, and only those.
    probed = {c.name: c.hash for c in LocalBackend(spec_for(fake_models)).probe().checkpoints}
    assert probed == {"anime/diving.safetensors": first, "old.ckpt": None, "tiny-a": None}

    # Another process trusts the file while size and mtime match ...
    cache[str(path)]["sha256"] = "f" * 64
    (fake_models / ".charforge" / "hashes.json").write_text(json.dumps(cache))
    assert LocalBackend(spec_for(fake_models)).find_checkpoint("diving", style="a").hash == "f" * 10
    # ... and hashes again once the file changed.
    write_safetensors_header(path, {**SD1_KEYS, "extra": (2,)})
    changed = LocalBackend(spec_for(fake_models)).find_checkpoint("diving", style="anime").hash
    assert changed == hashlib.sha256(path.read_bytes()).hexdigest()[:10] != first
    # ... also when it was replaced by one of the same size with the old mtime (`cp -p`).
    before = path.stat()
    path.write_bytes(path.read_bytes().replace(b"extra", b"EXTRA"))
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert path.stat().st_size == before.st_size
    replaced = LocalBackend(spec_for(fake_models)).find_checkpoint("diving", style="anime").hash
    assert replaced == hashlib.sha256(path.read_bytes()).hexdigest()[:10] != changed

    # Hashing stops when the generate call it serves is interrupted.
    backend = LocalBackend(spec_for(fake_models))
    with pytest.raises(_Stopped):
        backend.hashes.sha256(backend._locate("old.ckpt", style="anime"), stopped=lambda: True)
    assert backend.hashes.cached(backend._locate("old.ckpt", style="anime")) is None


def test_read_only_models_folder_keeps_its_cache_elsewhere(
    fake_models: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    backend = LocalBackend(spec_for(fake_models))
    monkeypatch.setattr(os, "access", lambda *_args, **_kw: False)
    assert backend.cache_dir().is_relative_to(tmp_path / "xdg" / "charforge")


def test_architecture_from_the_safetensors_header(tmp_path: Path) -> None:
    assert detect_architecture(SD1_KEYS) == SD1
    assert detect_architecture(SDXL_KEYS) == SDXL
    assert detect_architecture({"double_blocks.0.img_attn.qkv.weight": (9216, 3072)}) == "flux"
    assert detect_architecture({"cond_stage_model.model.token_embedding.weight": (1, 1)}) == (
        UNKNOWN
    )
    inpainting = {**SD1_KEYS, "model.diffusion_model.input_blocks.0.0.weight": (320, 9, 3, 3)}
    assert detect_architecture(inpainting) == "sd1-inpainting"
    path = tmp_path / "x.safetensors"
    write_safetensors_header(path, SDXL_KEYS)
    assert safetensors_shapes(path) == SDXL_KEYS
    path.write_bytes(b"\xff" * 16)
    with pytest.raises(ValueError, match="not a safetensors file"):
        safetensors_shapes(path)


# SD 1.x's CLIP keys as A1111's older layout has them (no "text_model."), and where diffusers
# reads them.
OLD_TEXT_KEYS = {
    "cond_stage_model.transformer.embeddings.token_embedding.weight": (
        "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight"
    ),
    "cond_stage_model.transformer.encoder.layers.11.mlp.fc2.bias": (
        "cond_stage_model.transformer.text_model.encoder.layers.11.mlp.fc2.bias"
    ),
    "cond_stage_model.transformer.final_layer_norm.weight": (
        "cond_stage_model.transformer.text_model.final_layer_norm.weight"
    ),
}


def test_a1111s_older_text_encoder_keys_are_renamed_for_diffusers() -> None:
    for old, new in OLD_TEXT_KEYS.items():
        assert canonical_key(old) == new and canonical_key(new) == new
    untouched = [
        "model.diffusion_model.input_blocks.0.0.weight",
        "first_stage_model.encoder.conv_in.weight",
        "cond_stage_model.transformer.text_model.embeddings.position_ids",
        "cond_stage_model.transformer.text_projection.weight",  # not one of A1111's three
        "conditioner.embedders.0.transformer.embeddings.token_embedding.weight",  # SDXL: no
    ]
    assert renamed_keys([*OLD_TEXT_KEYS, *untouched]) == OLD_TEXT_KEYS
    assert renamed_keys(untouched) == {}  # the layout diffusers reads: nothing to do
    # A key that is there under both names keeps the one diffusers reads.
    both = [*OLD_TEXT_KEYS, *OLD_TEXT_KEYS.values()]
    assert renamed_keys(both) == {}

    weights = {"model.diffusion_model.x": 1}
    assert unwrap_state_dict({"state_dict": weights, "global_step": 470000}) == weights
    assert unwrap_state_dict({"state_dict": {"state_dict": weights}}) == weights
    assert unwrap_state_dict(weights) == weights
    assert unwrap_state_dict([1, 2]) == {}

    sd1 = [*SD1_KEYS, "first_stage_model.decoder.conv_out.weight"]
    assert layout_problem(sd1) is None
    old_layout = [k for k in sd1 if not k.startswith("cond_stage_model.")] + list(OLD_TEXT_KEYS)
    assert layout_problem(old_layout) is None
    assert layout_problem(SDXL_KEYS.keys() | {"first_stage_model.x"}) is None
    assert layout_problem(["double_blocks.0.img_attn.qkv.weight"]) is None  # Flux: diffusers'
    no_text = [k for k in sd1 if not k.startswith("cond_stage_model.")]
    assert layout_problem(no_text) == (
        "it has no text encoder weights under the key names charforge knows"
    )
    assert "no UNet and no VAE" in (layout_problem(["lora_unet_down.alpha"]) or "")
    assert layout_problem([]) == "it holds no tensors"


def test_sd1_files_in_the_older_key_layout_are_sd1_and_get_the_sd15_config(
    tmp_path: Path,
) -> None:
    old_layout = {k: v for k, v in SD1_KEYS.items() if not k.startswith("cond_stage_model.")}
    old_layout["cond_stage_model.transformer.embeddings.token_embedding.weight"] = (49408, 768)
    assert detect_architecture(old_layout) == SD1
    # Only where SD 1.x's shapes are: the rename does not make anything SD 1.x.
    smaller = {
        **old_layout,
        "cond_stage_model.transformer.embeddings.token_embedding.weight": (1, 8),
    }
    assert detect_architecture(smaller) == UNKNOWN
    models = tmp_path / "models"
    models.mkdir()
    write_safetensors_header(models / "merged.safetensors", old_layout)
    if find_clip_bpe() is None:
        pytest.skip("the local extra (openai-clip's BPE vocabulary) is not installed")
    backend = LocalBackend(spec_for(models))
    folder = backend._single_file_config(backend._locate("merged", style="a"), ModuleType("e"))
    assert folder == models / ".charforge" / "sd15-config"


def test_single_file_of_an_architecture_without_config_asks_for_single_file_config(
    tmp_path: Path,
) -> None:
    models = tmp_path / "models"
    models.mkdir()
    write_safetensors_header(models / "xl.safetensors", SDXL_KEYS)
    backend = LocalBackend(spec_for(models))
    module = ModuleType("fake_engine")  # reading a safetensors header needs no engine
    with pytest.raises(LocalCheckpointUnusable) as caught:
        backend._single_file_config(backend._locate("xl", style="anime"), module)
    assert "SDXL" in caught.value.message
    assert caught.value.hint is not None and "single_file_config" in caught.value.hint
    assert SOURCE in caught.value.hint


def test_sd15_single_files_get_a_config_folder_written_once(tmp_path: Path) -> None:
    models = tmp_path / "models"
    models.mkdir()
    write_safetensors_header(models / "diving.safetensors", SD1_KEYS)
    backend = LocalBackend(spec_for(models))
    if find_clip_bpe() is None:
        pytest.skip("the local extra (openai-clip's BPE vocabulary) is not installed")
    folder = backend._single_file_config(backend._locate("diving", style="anime"), ModuleType("e"))
    assert folder == models / ".charforge" / "sd15-config"
    index = json.loads((folder / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionPipeline" and index["safety_checker"] == [
        None,
        None,
    ]
    for file in ("unet/config.json", "vae/config.json", "text_encoder/config.json"):
        assert (folder / file).is_file()
    vocab = json.loads((folder / "tokenizer" / "vocab.json").read_text())
    assert len(vocab) == 49408 and vocab["<|endoftext|>"] == 49407 and vocab["cat</w>"] == 2368
    stamp = (folder / "model_index.json").stat().st_mtime_ns
    assert ensure_sd15_config(models / ".charforge", find_clip_bpe() or Path()) == folder
    assert (folder / "model_index.json").stat().st_mtime_ns == stamp  # not written again
    # A given folder wins over the generated one.
    given = LocalBackend(spec_for(models, single_file_config=tmp_path / "mine"))
    assert given._single_file_config(given._locate("diving", style="a"), ModuleType("e")) == (
        tmp_path / "mine"
    )


def test_without_the_extra_generation_says_how_to_install_it(
    fake_models: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # What `import charforge.backends.local.engine` does where torch is not installed.
    monkeypatch.setitem(sys.modules, "charforge.backends.local.engine", None)
    monkeypatch.delattr(charforge.backends.local, "engine", raising=False)
    backend = LocalBackend(spec_for(fake_models))
    with pytest.raises(LocalEngineUnavailable) as caught:
        backend.generate(request("tiny-a"))
    assert caught.value.hint is not None and "pip install 'charforge[local]'" in caught.value.hint
    assert caught.value.backend_specific and not caught.value.retriable
    assert backend.loaded_checkpoint() is None


def test_lora_tags_are_refused_before_anything_is_loaded(fake_models: Path) -> None:
    backend = LocalBackend(spec_for(fake_models))
    with pytest.raises(UnsupportedCapability) as caught:
        backend.generate(request("tiny-a", prompt="a red fox, <lora:foxy:0.8>"))
    error = caught.value
    assert "'loc'" in error.message and "(lora)" in error.message
    assert error.field == "prompt" and error.status == 422
    assert error.extra == {"capability": "lora", "backends": ["loc"]}
    assert backend.loads == 0 and backend._engine is None


def test_seeds_count_up_and_wrap_within_the_seed_range() -> None:
    assert plan_seeds(4294967295, 2) == [4294967295, 0]
    assert plan_seeds(40, 3) == [40, 41, 42]
    assert plan_seeds(7, 0) == [7]
    first, second = plan_seeds(-1, 2)
    assert 0 <= first < 2**32 and second == (first + 1) % 2**32


def test_out_of_memory_is_told_by_its_type_or_its_text(fake_models: Path) -> None:
    backend = LocalBackend(spec_for(fake_models))
    checkpoint = backend._locate("tiny-a", style="anime")

    class OutOfMemoryError(RuntimeError):  # torch.OutOfMemoryError, by its name
        pass

    for exc in (
        OutOfMemoryError(""),
        RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB"),
        RuntimeError("torch.OutOfMemoryError: tried to allocate"),
        RuntimeError("Allocation on device 0 would exceed allowed memory"),
    ):
        assert "ran out of memory" in backend._render_error(checkpoint, exc).message, exc
        assert "ran out of memory" in backend._load_error(checkpoint, exc, None).message, exc
    other = backend._render_error(checkpoint, RuntimeError("mat1 and mat2 shapes differ"))
    assert "ran out of memory" not in other.message and "mat1" in other.message


def test_probe_reports_down_without_torch_diffusers_or_transformers(
    fake_models: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = importlib.util.find_spec
    hidden: set[str] = set(ENGINE_PACKAGES)
    seen: list[str] = []

    def find_spec(name: str, *args: Any, **kwargs: Any) -> Any:
        seen.append(name)
        if name in hidden:
            return None
        if name in ENGINE_PACKAGES:
            return object()  # "installed", whether it is here or not
        return real(name, *args, **kwargs)

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)
    backend = LocalBackend(spec_for(fake_models))
    probe = backend.probe()
    assert not probe.ok and probe.error is not None
    assert "torch, diffusers, transformers are not installed" in probe.error
    assert "pip install 'charforge[local]'" in probe.error and "'loc'" in probe.error
    hidden = {"diffusers"}
    probe = backend.probe()
    assert not probe.ok and probe.error is not None
    assert "diffusers is not installed" in probe.error and "torch" not in probe.error
    hidden = set()
    assert backend.probe().ok
    assert set(ENGINE_PACKAGES) <= set(seen)


def test_interrupt_says_false_when_nothing_runs(fake_models: Path) -> None:
    assert LocalBackend(spec_for(fake_models)).interrupt(TASK) is False


def test_bad_names_are_refused_before_anything_is_loaded(fake_models: Path) -> None:
    backend = LocalBackend(spec_for(fake_models))
    with pytest.raises(InvalidInput, match="Unknown sampler"):
        backend.generate(request("tiny-a", sampler="Euler Z"))
    with pytest.raises(CheckpointMissing):
        backend.generate(request("tiny-z"))
    assert backend.loads == 0 and backend._engine is None


WEB_PROCESS = textwrap.dedent(
    """
    import json, sys
    from pathlib import Path
    from fastapi.testclient import TestClient
    from charforge.api.app import create_app
    from charforge.config import BackendConfig, RouteConfig, Settings
    from charforge.container import build_container
    from charforge.services import users

    models, data = Path(sys.argv[1]), Path(sys.argv[2])
    settings = Settings(
        data_dir=data,
        runpod_realistic_url="http://127.0.0.1:9",
        runpod_anime_cartoon_fantasy_url="http://127.0.0.1:9",
        backends={"loc": BackendConfig(kind="local", models_dir=models)},
        routes={"anime": RouteConfig(checkpoint="tiny-a", backends=["loc"])},
    )
    container = build_container(settings)
    with TestClient(create_app(container)) as client:
        with container.db.session() as session:
            user = users.create_user(session, "web", "password-web")
            _, token = users.create_token(session, user, "test")
        styles = client.get("/api/styles", headers={"Authorization": "Bearer " + token})
        assert styles.status_code == 200, styles.text
        probe = container.pool.probe(["loc"], max_age=0.0)["loc"]
        found = container.pool.backends["loc"].find_checkpoint("tiny-a", style="anime")
    print(json.dumps({
        "anime": [s for s in styles.json() if s["style"] == "anime"][0]["checkpoint"],
        "probe_ok": probe.ok,
        "listed": [c.name for c in probe.checkpoints],
        "found": found.name,
        "hash": found.hash,
        "imported": sorted(
            m for m in ("torch", "diffusers", "transformers", "huggingface_hub", "safetensors")
            if m in sys.modules
        ),
    }))
    """
)


def test_web_process_lists_and_probes_without_importing_torch(
    fake_models: Path, tmp_path: Path
) -> None:
    done = subprocess.run(
        [sys.executable, "-c", WEB_PROCESS, str(fake_models), str(tmp_path / "data")],
        capture_output=True,
        text=True,
        timeout=90,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    seen = json.loads(done.stdout.strip().splitlines()[-1])
    assert seen["imported"] == []
    # Up where the local extra is installed (found without importing it), down elsewhere.
    assert seen["probe_ok"] is (not missing_engine_packages())
    assert seen["listed"] == ["anime/diving.safetensors", "old.ckpt", "tiny-a"]
    assert seen["found"] == "tiny-a" and seen["hash"] and seen["anime"] == "tiny-a"


# -- with torch: tiny checkpoints ----------------------------------------------------------------


class NetworkAttempt(AssertionError):
    pass


@pytest.fixture(scope="module")
def offline() -> Iterator[list[Any]]:
    """Fails any connection or name lookup beyond loopback while the engine runs."""
    attempts: list[Any] = []
    local = {"127.0.0.1", "::1", "localhost"}
    real_connect, real_lookup = socket.socket.connect, socket.getaddrinfo

    def connect(self: socket.socket, address: Any) -> Any:
        if isinstance(address, tuple) and address[0] not in local:
            attempts.append(address)
            raise NetworkAttempt(f"network access to {address}")
        return real_connect(self, address)

    def lookup(host: Any, *args: Any, **kwargs: Any) -> Any:
        if host not in local and host is not None:
            attempts.append(host)
            raise NetworkAttempt(f"name lookup of {host}")
        return real_lookup(host, *args, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(socket.socket, "connect", connect)
        patch.setattr(socket, "getaddrinfo", lookup)
        yield attempts
    assert attempts == [], f"the local engine tried the network: {attempts}"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory, offline: list[Any]) -> dict[str, Path]:
    """tiny-a and tiny-b (diffusers folders, different random weights), tiny-a's weights as
    tiny-single.safetensors in A1111's layout, and tiny-a's configs without weights."""
    for name in ("torch", "diffusers", "transformers", "accelerate"):
        pytest.importorskip(name)
    from tests.backends import tiny_sd

    root = tmp_path_factory.mktemp("local-engine")
    models = root / "models"
    models.mkdir()
    tokenizer = tiny_sd.tokenizer_folder(root)
    tiny_sd.build_tiny_pipeline(models / "tiny-a", seed=1, tokenizer=tokenizer)
    tiny_sd.build_tiny_pipeline(models / "tiny-b", seed=2, tokenizer=tokenizer)
    tiny_sd.write_single_file(models / "tiny-a", models / "tiny-single.safetensors")
    tiny_sd.write_single_file(models / "tiny-a", models / "tiny-pickle.ckpt")
    config = tiny_sd.config_only_copy(models / "tiny-a", root / "tiny-config")
    return {"models": models, "config": config, "root": root}


@pytest.fixture(scope="module")
def engine(tiny: dict[str, Path]) -> Iterator[LocalBackend]:
    """One backend for the module: its pipeline stays loaded between tests."""
    backend = LocalBackend(spec_for(tiny["models"], single_file_config=tiny["config"]))
    yield backend
    backend.close()


def test_renders_txt2img_plus_the_hires_pass(engine: LocalBackend, tiny: dict[str, Path]) -> None:
    result = engine.generate(request("tiny-a"))
    assert len(result.images) == 1 and result.images[0].seed == 1234
    assert png_size(result.images[0].data) == (96, 96)  # 64x64 times hires_scale 1.5
    assert result.checkpoint == "tiny-a"
    unet = tiny["models"] / "tiny-a" / "unet" / "diffusion_pytorch_model.safetensors"
    assert result.checkpoint_hash == hashlib.sha256(unet.read_bytes()).hexdigest()[:10]
    assert engine.find_checkpoint("tiny-a", style="anime").hash == result.checkpoint_hash
    assert result.info["device"] == "cpu" and result.info["dtype"] == "float32"
    assert result.info["diffusers_scheduler"] == "DPMSolverMultistepScheduler"
    assert result.info["sigmas"] == "karras" and result.info["hires_upscaler"] == "Latent"
    assert engine.loaded_checkpoint() == "tiny-a"

    plain = engine.generate(request("tiny-a", hires=False))
    assert png_size(plain.images[0].data) == (64, 64)
    lanczos = engine.generate(request("tiny-a", hires_upscaler="Lanczos", hires_scale=2.0))
    assert png_size(lanczos.images[0].data) == (128, 128)
    assert lanczos.info["hires_upscaler"] == "Lanczos"


def test_same_seed_same_pixels_other_seed_other_pixels(engine: LocalBackend) -> None:
    first = engine.generate(request("tiny-a", seed=7)).images[0]
    again = engine.generate(request("tiny-a", seed=7)).images[0]
    other = engine.generate(request("tiny-a", seed=8)).images[0]
    assert first.data == again.data
    assert pixels(first.data) != pixels(other.data)


def test_count_uses_consecutive_seeds_each_reproducible(engine: LocalBackend) -> None:
    both = engine.generate(request("tiny-a", seed=40, count=2, hires=False))
    assert [i.seed for i in both.images] == [40, 41]
    assert both.info["all_seeds"] == [40, 41]
    alone = engine.generate(request("tiny-a", seed=41, hires=False)).images[0]
    assert pixels(both.images[1].data) == pixels(alone.data)
    assert pixels(both.images[0].data) != pixels(both.images[1].data)
    # After the last seed comes 0, a seed that can be asked for again.
    wrapped = engine.generate(request("tiny-a", seed=2**32 - 1, count=2, hires=False))
    assert [i.seed for i in wrapped.images] == [2**32 - 1, 0]
    assert wrapped.info["all_seeds"] == [2**32 - 1, 0] and wrapped.info["seed"] == 2**32 - 1


def test_random_seed_is_picked_once_and_reported(engine: LocalBackend) -> None:
    result = engine.generate(request("tiny-a", seed=-1, count=2, hires=False))
    seed = result.images[0].seed
    assert 0 <= seed < 2**32 and result.images[1].seed == seed + 1 and result.info["seed"] == seed
    again = engine.generate(request("tiny-a", seed=seed, hires=False)).images[0]
    assert pixels(again.data) == pixels(result.images[0].data)


@pytest.mark.parametrize(
    ("sampler", "scheduler"),
    [
        ("Euler", "Automatic"),
        ("Euler a", "Karras"),
        ("DDIM", "Automatic"),
        ("LMS", "Karras"),
        ("Heun", "Karras"),
        ("UniPC", "Karras"),
        ("DPM++ SDE", "Karras"),
        ("DPM++ 2M SDE", "Exponential"),
        ("DPM2 a", "Automatic"),
        ("PLMS", "Automatic"),
    ],
)
def test_samplers_run(engine: LocalBackend, sampler: str, scheduler: str) -> None:
    result = engine.generate(
        request("tiny-a", sampler=sampler, scheduler=scheduler, hires=False, steps=3)
    )
    assert len(result.images) == 1 and png_size(result.images[0].data) == (64, 64)
    assert result.info["diffusers_scheduler"] == SAMPLERS[sampler][0]
    if sampler in ("Euler a", "DDIM", "PLMS"):
        assert result.info["sigmas"] is None  # no sigma schedule to choose there
    elif scheduler != "Automatic":
        assert result.info["sigmas"] == scheduler.lower()


def test_unknown_sampler_fails_before_loading(tiny: dict[str, Path]) -> None:
    backend = LocalBackend(spec_for(tiny["models"]))
    with pytest.raises(InvalidInput) as caught:
        backend.generate(request("tiny-b", sampler="Euler Z"))
    assert caught.value.field == "sampler" and "Euler a" in caught.value.message
    assert backend.loads == 0 and backend.loaded_checkpoint() is None


def test_pipeline_stays_loaded_and_switches_with_the_checkpoint(tiny: dict[str, Path]) -> None:
    backend = LocalBackend(spec_for(tiny["models"]))
    try:
        assert backend.loaded_checkpoint() is None
        a = backend.generate(request("tiny-a", seed=5, hires=False))
        assert (backend.loaded_checkpoint(), backend.loads) == ("tiny-a", 1)
        assert a.info["checkpoint_loaded"] is True
        again = backend.generate(request("tiny-a", seed=5, hires=False))
        assert (backend.loaded_checkpoint(), backend.loads) == ("tiny-a", 1)  # no reload
        assert again.info["checkpoint_loaded"] is False
        b = backend.generate(request("tiny-b", seed=5, hires=False))
        assert (backend.loaded_checkpoint(), backend.loads) == ("tiny-b", 2)
        assert b.checkpoint == "tiny-b" and b.checkpoint_hash != a.checkpoint_hash
        assert pixels(b.images[0].data) != pixels(a.images[0].data)  # other weights
        back = backend.generate(request("tiny-a", seed=5, hires=False))
        assert backend.loads == 3 and pixels(back.images[0].data) == pixels(a.images[0].data)
        assert backend.probe().loaded == "tiny-a"
    finally:
        backend.close()
    assert backend.loaded_checkpoint() is None


@pytest.mark.parametrize("sampler", ["DPM++ 2M", "Heun"])  # Heun: two timesteps a step
def test_progress_is_reported_up_to_the_end(engine: LocalBackend, sampler: str) -> None:
    seen: list[Progress] = []
    engine.generate(request("tiny-a", steps=4, count=2, sampler=sampler, on_progress=seen.append))
    assert seen, "no progress reported"
    fractions = [p.fraction for p in seen]
    assert fractions == sorted(fractions) and fractions[-1] == 1.0
    assert seen[-1].steps == 4 + 2  # both passes of an image: 4 steps, then 4 x 0.5


def test_interrupt_stops_the_running_generation(engine: LocalBackend) -> None:
    def stop(_progress: Progress) -> None:
        assert engine.interrupt("charforge-another-job-1") is False  # not this call's task
        engine.interrupt(TASK)

    started = time.perf_counter()
    result = engine.generate(request("tiny-a", steps=50, count=3, on_progress=stop))
    assert result.images == [] and result.info["interrupted"] is True
    assert time.perf_counter() - started < 5
    # The next generation is not affected.
    assert len(engine.generate(request("tiny-a", hires=False)).images) == 1


def test_interrupt_reaches_a_call_that_waits_for_the_lock(engine: LocalBackend) -> None:
    """The lease keeper interrupts once: a cancel that comes before the call takes the lock
    (while another generation holds it) must stop that call, not be forgotten."""
    engine.generate(request("tiny-a", hires=False))  # tiny-a loaded and hashed
    loads = engine.loads
    seen: list[Progress] = []
    results: list[Any] = []
    engine._lock.acquire()  # as a generation running now would
    try:
        thread = threading.Thread(
            target=lambda: results.append(
                engine.generate(request("tiny-a", on_progress=seen.append))
            )
        )
        thread.start()
        deadline = time.monotonic() + 10
        while not engine._calls and time.monotonic() < deadline:
            time.sleep(0.005)
        assert engine.interrupt(TASK) is True
    finally:
        engine._lock.release()
    thread.join(30)
    [result] = results
    assert result.images == [] and result.info["interrupted"] is True
    assert seen == [] and engine.loads == loads  # nothing rendered, nothing loaded
    assert engine.interrupt(TASK) is False  # nothing runs any more
    # The next call is not affected by the earlier cancel.
    assert len(engine.generate(request("tiny-a", hires=False)).images) == 1


def test_close_interrupts_and_does_not_wait_for_a_generation_that_holds_on(
    tiny: dict[str, Path],
) -> None:
    backend = LocalBackend(spec_for(tiny["models"]))
    started, release = threading.Event(), threading.Event()

    def progress(_update: Progress) -> None:
        started.set()
        release.wait(10)  # a slow step on a CPU

    results: list[Any] = []
    thread = threading.Thread(
        target=lambda: results.append(
            backend.generate(request("tiny-a", steps=20, count=2, on_progress=progress))
        )
    )
    thread.start()
    try:
        assert started.wait(30)
        began = time.perf_counter()
        backend.close(timeout=0.2)
        assert time.perf_counter() - began < 2
        assert backend.loaded_checkpoint() is None  # the backend no longer holds it
    finally:
        release.set()
        thread.join(30)
    [result] = results
    assert result.images == [] and result.info["interrupted"] is True  # stopped at its next step


def test_weights_replaced_under_the_same_name_are_loaded_again(
    tiny: dict[str, Path], tmp_path: Path
) -> None:
    """The pipeline is kept by path and hash, not by name: new weights under an old name are
    read again, and the hash reported is that of the weights that ran (the drift check)."""
    models = tmp_path / "models"
    shutil.copytree(tiny["models"] / "tiny-a", models / "tiny-a")
    unet = models / "tiny-a" / "unet" / "diffusion_pytorch_model.safetensors"
    backend = LocalBackend(spec_for(models))
    try:
        a = backend.generate(request("tiny-a", seed=5, hires=False))
        old = unet.stat()
        shutil.rmtree(models / "tiny-a")
        shutil.copytree(tiny["models"] / "tiny-b", models / "tiny-a")
        os.utime(unet, ns=(old.st_atime_ns, old.st_mtime_ns))  # even with the old mtime
        assert unet.stat().st_size == old.st_size
        b = backend.generate(request("tiny-a", seed=5, hires=False))
        new_hash = hashlib.sha256(unet.read_bytes()).hexdigest()
        assert b.info["checkpoint_loaded"] is True and backend.loads == 2
        assert b.info["sha256"] == new_hash and b.checkpoint_hash == new_hash[:10]
        assert b.checkpoint_hash != a.checkpoint_hash
        assert pixels(b.images[0].data) != pixels(a.images[0].data)  # tiny-b's weights ran
        again = backend.generate(request("tiny-a", seed=5, hires=False))
        assert backend.loads == 2 and again.checkpoint_hash == b.checkpoint_hash  # kept
    finally:
        backend.close()


def test_weights_that_change_while_loading_are_read_again(
    tiny: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from charforge.backends.local import engine as engine_module

    models = tmp_path / "models"
    shutil.copytree(tiny["models"] / "tiny-a", models / "tiny-a")
    unet = models / "tiny-a" / "unet" / "diffusion_pytorch_model.safetensors"
    old_hash = hashlib.sha256(unet.read_bytes()).hexdigest()
    real_load = engine_module.DiffusersEngine.load
    asked: list[str] = []

    def load(self: Any, name: str, path: Path, **kwargs: Any) -> bool:
        if not asked:  # the file is replaced just as it is read
            shutil.rmtree(models / "tiny-a")
            shutil.copytree(tiny["models"] / "tiny-b", models / "tiny-a")
        asked.append(kwargs["sha256"])
        return real_load(self, name, path, **kwargs)

    monkeypatch.setattr(engine_module.DiffusersEngine, "load", load)
    backend = LocalBackend(spec_for(models))
    try:
        result = backend.generate(request("tiny-a", seed=5, hires=False))
        assert backend.loads == 2  # read again once it held still
    finally:
        backend.close()
    new_hash = hashlib.sha256(unet.read_bytes()).hexdigest()
    assert asked == [old_hash, new_hash]
    assert result.info["sha256"] == new_hash and len(result.images) == 1


def test_single_file_checkpoint_loads_offline_with_its_config_folder(
    engine: LocalBackend, tiny: dict[str, Path]
) -> None:
    folder = engine.generate(request("tiny-a", seed=99)).images[0]
    single = engine.generate(request("tiny-single.safetensors", seed=99))
    assert single.checkpoint == "tiny-single.safetensors"
    file = tiny["models"] / "tiny-single.safetensors"
    assert single.checkpoint_hash == hashlib.sha256(file.read_bytes()).hexdigest()[:10]
    # The same weights in A1111's layout render the same pixels as the diffusers folder.
    assert pixels(single.images[0].data) == pixels(folder.data)
    pickled = engine.generate(request("tiny-pickle.ckpt", seed=99))
    assert pickled.checkpoint == "tiny-pickle.ckpt"
    assert pixels(pickled.images[0].data) == pixels(folder.data)


def test_single_file_without_a_config_for_its_architecture_is_a_clear_error(
    tiny: dict[str, Path],
) -> None:
    # Without single_file_config: the tiny file is not SD 1.x-shaped, so nothing fits.
    backend = LocalBackend(spec_for(tiny["models"]))
    for name in ("tiny-single.safetensors", "tiny-pickle.ckpt"):  # header / unpickled keys
        with pytest.raises(LocalCheckpointUnusable) as caught:
            backend.generate(request(name))
        assert "not recognise" in caught.value.message
        assert "single_file_config" in (caught.value.hint or "")
    assert backend.loads == 0


@pytest.fixture(scope="module")
def layouts(tiny: dict[str, Path]) -> Iterator[tuple[LocalBackend, Path]]:
    """tiny-a's weights in the other single-file layouts the WebUIs load, and in ones nobody
    reads, in a models folder of their own; a backend with tiny-a's configs for it."""
    from tests.backends import tiny_sd

    folder, models = tiny["models"] / "tiny-a", tiny["root"] / "layouts"
    models.mkdir()
    shutil.copy(tiny["models"] / "tiny-single.safetensors", models / "text-model.safetensors")
    tiny_sd.write_single_file(folder, models / "old-keys.safetensors", text_model=False)
    tiny_sd.write_single_file(folder, models / "lightning.ckpt", training_state=True)
    tiny_sd.write_single_file(
        folder, models / "old-keys-lightning.ckpt", text_model=False, training_state=True
    )
    tiny_sd.write_single_file(
        folder,
        models / "unknown-keys.safetensors",
        renames={tiny_sd.TEXT_MODEL: "cond_stage_model.clip."},
    )
    (models / "damaged.ckpt").write_bytes(b"not a pickle at all")
    backend = LocalBackend(spec_for(models, single_file_config=tiny["config"]))
    yield backend, models
    backend.close()


def test_text_encoder_keys_without_text_model_load_as_a1111_loads_them(
    engine: LocalBackend, layouts: tuple[LocalBackend, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The same weights with CLIP's keys without "text_model." render the same pixels as with
    them: the keys were mapped onto the text encoder, not left out (diffusers refuses such a
    file: "Failed to load CLIPTextModel")."""
    backend, models = layouts
    file = models / "old-keys.safetensors"
    keys = safetensors_shapes(file)
    assert not any("text_model." in k for k in keys)
    assert "cond_stage_model.transformer.final_layer_norm.weight" in keys
    before = sorted(p.relative_to(models) for p in models.rglob("*") if p.is_file())

    reference = engine.generate(request("tiny-single.safetensors", seed=99, hires=False))
    old = backend.generate(request("old-keys.safetensors", seed=99, hires=False))
    assert old.checkpoint == "old-keys.safetensors"
    assert pixels(old.images[0].data) == pixels(reference.images[0].data)
    # The hash is the file's on disk, and nothing rewritten was left beside it.
    assert old.info["sha256"] == hashlib.sha256(file.read_bytes()).hexdigest()
    after = sorted(p.relative_to(models) for p in models.rglob("*") if p.is_file())
    assert {p for p in after if p not in before} <= {Path(".charforge/hashes.json")}

    # The layout diffusers reads is left to diffusers: no tensor of it is read beforehand.
    from charforge.backends.local import engine as engine_module

    read: list[Path] = []
    real = engine_module.renamed_tensors
    monkeypatch.setattr(
        engine_module, "renamed_tensors", lambda path, *a: read.append(path) or real(path, *a)
    )
    same = backend.generate(request("text-model.safetensors", seed=99, hires=False))
    assert pixels(same.images[0].data) == pixels(reference.images[0].data) and read == []
    backend.generate(request("old-keys.safetensors", seed=99, hires=False))
    assert read == [file]


def test_pickled_checkpoints_with_training_state_load_as_a1111_loads_them(
    engine: LocalBackend, layouts: tuple[LocalBackend, Path]
) -> None:
    """A .ckpt as CompVis saved SD 1.x: the weights under "state_dict" beside PyTorch
    Lightning's training state, which names a class torch's weights-only unpickler refuses
    (A1111's lets it through); in the text_model. layout and in the older one."""
    import torch

    from charforge.backends.local import engine as engine_module

    backend, models = layouts
    reference = engine.generate(request("tiny-single.safetensors", seed=99, hires=False))
    for name in ("lightning.ckpt", "old-keys-lightning.ckpt"):
        path = models / name
        with pytest.raises(Exception, match="ModelCheckpoint"):  # what diffusers runs into
            torch.load(path, map_location="cpu", weights_only=True)
        result = backend.generate(request(name, seed=99, hires=False))
        assert pixels(result.images[0].data) == pixels(reference.images[0].data), name
        assert result.info["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
        shapes = engine_module.checkpoint_shapes(path)  # what the SD 1.x check reads
        assert "model.diffusion_model.input_blocks.0.0.weight" in shapes
        assert not any(k in shapes for k in ("global_step", "epoch", "callbacks", "state_dict"))
    # The unpickler's allowance for that bookkeeping ended with the loads.
    allowed = torch.serialization.get_safe_globals()
    assert not [g for g in allowed if isinstance(g, tuple) and "pytorch_lightning" in g[1]]


def test_single_file_in_no_layout_charforge_knows_is_an_error_naming_it(
    layouts: tuple[LocalBackend, Path],
) -> None:
    backend, _models = layouts
    with pytest.raises(LocalCheckpointUnusable) as caught:
        backend.generate(request("unknown-keys.safetensors"))
    message = caught.value.message
    assert "'unknown-keys.safetensors'" in message
    assert "unknown-keys.safetensors is not a checkpoint layout charforge can load" in message
    assert "no text encoder weights" in message
    assert "cond_stage_model.clip. (" in message and "model.diffusion_model. (" in message
    assert "cond_stage_model.transformer.[text_model.]" in message
    assert "Failed to load CLIPTextModel" in message  # diffusers' word, as part of it
    assert caught.value.backend_specific and caught.value.hint

    with pytest.raises(LocalCheckpointUnusable) as caught:
        backend.generate(request("damaged.ckpt"))
    assert "damaged.ckpt could not be read as a .ckpt file" in caught.value.message
    assert "Python objects besides tensors" in caught.value.message
    assert backend.loaded_checkpoint() is None


def test_generated_sd15_config_builds_sd15_exactly(tiny: dict[str, Path]) -> None:
    """The SD 1.5 folder charforge writes, instantiated without weights (meta device): the
    parameter counts of SD 1.5's UNet, VAE and CLIP text encoder, its real tokenizer, and an
    SD 1.x key layout that detect_architecture recognises."""
    from accelerate import init_empty_weights
    from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    from tests.backends import tiny_sd

    bpe = find_clip_bpe()
    assert bpe is not None
    folder = ensure_sd15_config(tiny["root"] / "cache", bpe)
    assert StableDiffusionPipeline.load_config(str(folder))["_class_name"] == (
        "StableDiffusionPipeline"
    )
    with init_empty_weights():
        unet = UNet2DConditionModel.from_config(
            UNet2DConditionModel.load_config(str(folder), subfolder="unet")
        )
        vae = AutoencoderKL.from_config(AutoencoderKL.load_config(str(folder), subfolder="vae"))
        text = CLIPTextModel(CLIPTextConfig.from_pretrained(str(folder / "text_encoder")))
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert (count(unet), count(vae), count(text)) == (859_520_964, 83_653_863, 123_060_480)
    tokenizer = CLIPTokenizer.from_pretrained(str(folder / "tokenizer"), local_files_only=True)
    assert tokenizer("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]
    assert tokenizer.model_max_length == 77

    shapes = {
        k: tuple(v.shape)
        for k, v in {
            **tiny_sd.unet_to_ldm(unet.state_dict(), unet.config),
            **tiny_sd.text_encoder_to_ldm(text.state_dict()),
        }.items()
    }
    assert detect_architecture(shapes) == SD1
    vocab, merges = clip_vocab_and_merges(bpe)
    assert len(vocab) == 49408 and len(merges) == 48894


def test_generate_endpoint_renders_on_the_local_backend(
    tiny: dict[str, Path],
    live_factory: Any,
    sims: tuple[A1111Simulator, A1111Simulator],
) -> None:
    realistic, anime = sims
    live: Live = live_factory(
        realistic.url,
        anime.url,
        backends={"loc": BackendConfig(kind="local", models_dir=tiny["models"], device="cpu")},
        routes={"anime": RouteConfig(checkpoint="tiny-a", backends=["loc"])},
    )
    client = live.user("alice")
    made = client.post(
        "/api/characters",
        json={"name": "Sakura", "appearance": "pink hair", "artStyle": {"primaryStyle": "anime"}},
    )
    assert made.status_code == 201, made.text
    character = made.json()
    assert character["imageGeneration"]["model"] == "tiny-a"
    response = client.post(
        "/api/image-generation/generate",
        json={
            "prompt": "in a garden",
            "characterId": character["id"],
            "width": 64,
            "height": 64,
            "steps": 2,
            "seed": 77,
        },
    )
    assert response.status_code == 200, response.text
    result = response.json()
    assert result["backend"] == "loc" and result["model"] == "tiny-a"
    image = result["images"][0]
    assert (image["width"], image["height"], image["seed"]) == (96, 96, 77)
    file = client.get(image["url"])
    assert file.status_code == 200 and file.headers["content-type"] == "image/png"
    assert png_size(file.content) == (96, 96)
    assert anime.txt2img_bodies() == []  # the A1111 pool was not asked
    backend = live.container.pool.backends["loc"]
    assert isinstance(backend, LocalBackend) and backend.loaded_checkpoint() == "tiny-a"


def test_hires_steps_clip_skip_and_a_pass_that_only_scales(engine: LocalBackend) -> None:
    seen: list[Progress] = []
    engine.generate(
        request("tiny-a", steps=4, hires_steps=3, denoising_strength=0.4, on_progress=seen.append)
    )
    assert seen[-1].steps == 4 + 3  # A1111's hr_second_pass_steps: exactly 3 in the second pass
    plain = engine.generate(request("tiny-a", hires=False, seed=5)).images[0]
    skipped = engine.generate(request("tiny-a", hires=False, seed=5, clip_skip=2)).images[0]
    assert skipped.data != plain.data  # the text encoder's layer before the last: other pixels
    scaled = engine.generate(request("tiny-a", denoising_strength=0.0, hires_scale=2.0))
    assert png_size(scaled.images[0].data) == (128, 128)  # strength 0: only scaled
