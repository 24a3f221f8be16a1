"""What ``from_single_file`` needs besides the weights, written by code so nothing is fetched.

diffusers builds a pipeline from one ``.safetensors`` file only with ``config=`` a folder that
holds the model's diffusers configs and tokenizer files (no weights); without one it downloads
them from a hub, which charforge never does. For Stable Diffusion 1.x the folder is written
here from the known SD 1.5 configs, with CLIP's tokenizer built from its BPE vocabulary, which
ships inside the ``openai-clip`` (or ``open-clip-torch``) wheel. Other architectures (SDXL,
SD 2.x, ...) need a folder given by the user as ``single_file_config``.

Also here: reading a ``.safetensors`` header (the tensor names and shapes, no weights) and
telling the architecture from it, in any key layout ``keys`` knows (SD 1.x text-encoder
keys with or without ``text_model.``). Nothing in this module imports torch.
"""

from __future__ import annotations

import gzip
import importlib.util
import json
import os
import shutil
import struct
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from charforge.backends.local.keys import canonical_shapes

BPE_FILE = "bpe_simple_vocab_16e6.txt.gz"
# Packages whose wheel carries CLIP's BPE vocabulary, by import name (found without importing).
BPE_PACKAGES = ("clip", "open_clip")
_CONFIG_VERSION = "1"  # bump when the files written below change

Shapes = Mapping[str, tuple[int, ...]]

# -- architectures ------------------------------------------------------------------------------

SD1 = "sd1"
SD1_INPAINT = "sd1-inpainting"
SD2 = "sd2"
SDXL = "sdxl"
SDXL_REFINER = "sdxl-refiner"
SD3 = "sd3"
FLUX = "flux"
UNKNOWN = "unknown"

ARCHITECTURE_LABELS = {
    SD1: "Stable Diffusion 1.x",
    SD1_INPAINT: "Stable Diffusion 1.x inpainting",
    SD2: "Stable Diffusion 2.x",
    SDXL: "SDXL",
    SDXL_REFINER: "SDXL refiner",
    SD3: "Stable Diffusion 3",
    FLUX: "Flux",
    UNKNOWN: "an architecture charforge does not recognise",
}

_UNET = "model.diffusion_model."
_SD1_CROSS_ATTN = _UNET + "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"
_SD1_TOKENS = "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight"


def detect_architecture(shapes: Shapes) -> str:
    """The model family of a single-file checkpoint, from its tensor names and shapes (read
    under the names diffusers reads, so A1111's older SD 1.x key layout is SD 1.x too)."""
    shapes = canonical_shapes(shapes)
    keys = shapes.keys()

    def has_prefix(prefix: str) -> bool:
        return any(key.startswith(prefix) for key in keys)

    if has_prefix(_UNET + "joint_blocks.") or has_prefix("joint_blocks."):
        return SD3
    if has_prefix(_UNET + "double_blocks.") or has_prefix("double_blocks."):
        return FLUX
    if (_UNET + "input_blocks.0.0.weight") not in shapes:
        return UNKNOWN
    if has_prefix("conditioner.embedders.1."):
        return SDXL
    if has_prefix("conditioner.embedders.0.model."):
        return SDXL_REFINER
    if has_prefix("cond_stage_model.model."):
        return SD2
    if has_prefix("cond_stage_model.transformer."):
        if shapes[_UNET + "input_blocks.0.0.weight"][1:2] == (9,):
            return SD1_INPAINT
        # SD 1.x: CLIP ViT-L/14 text (768 wide, 49408 tokens) into a 320-channel UNet.
        if shapes.get(_SD1_CROSS_ATTN) == (320, 768) and shapes.get(_SD1_TOKENS) == (49408, 768):
            return SD1
    return UNKNOWN


def safetensors_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """Tensor names and shapes from a ``.safetensors`` header, without reading the weights."""
    with path.open("rb") as handle:
        head = handle.read(8)
        if len(head) != 8:
            raise ValueError(f"{path.name} is not a safetensors file (too short)")
        (size,) = struct.unpack("<Q", head)
        if size > 100_000_000 or size > path.stat().st_size:
            raise ValueError(f"{path.name} is not a safetensors file (bad header length)")
        try:
            header = json.loads(handle.read(size))
        except ValueError as exc:
            raise ValueError(f"{path.name} is not a safetensors file (bad header)") from exc
    if not isinstance(header, dict):
        raise ValueError(f"{path.name} is not a safetensors file (bad header)")
    return {
        name: tuple(int(n) for n in entry.get("shape", ()))
        for name, entry in header.items()
        if name != "__metadata__" and isinstance(entry, dict)
    }


# -- CLIP tokenizer -----------------------------------------------------------------------------


def find_clip_bpe() -> Path | None:
    """CLIP's BPE vocabulary as shipped in a wheel, found without importing that package."""
    for package in BPE_PACKAGES:
        try:
            spec = importlib.util.find_spec(package)
        except (ImportError, ValueError):
            continue
        for location in (spec.submodule_search_locations or []) if spec else []:
            candidate = Path(location) / BPE_FILE
            if candidate.is_file():
                return candidate
    return None


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible map of bytes to printable characters."""
    keep = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    chars = list(keep)
    extra = 0
    for byte in range(256):
        if byte not in keep:
            keep.append(byte)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(keep, (chr(c) for c in chars), strict=True))


def clip_vocab_and_merges(bpe: Path) -> tuple[dict[str, int], list[str]]:
    """CLIP's vocabulary (49408 entries) and merge rules, as OpenAI's SimpleTokenizer builds
    them from ``bpe_simple_vocab_16e6.txt.gz`` and as transformers' CLIPTokenizer reads them."""
    lines = gzip.decompress(bpe.read_bytes()).decode("utf-8").split("\n")
    merges = lines[1 : 49152 - 256 - 2 + 1]
    base = list(_bytes_to_unicode().values())
    tokens = base + [b + "</w>" for b in base]
    tokens += ["".join(merge.split()) for merge in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    return {token: index for index, token in enumerate(tokens)}, merges


def write_clip_tokenizer(
    folder: Path,
    bpe: Path,
    *,
    pad_token: str = "<|endoftext|>",  # noqa: S107 (not a secret)
) -> None:
    """The files ``CLIPTokenizer.from_pretrained(folder)`` reads (SD 1.x's tokenizer/)."""
    vocab, merges = clip_vocab_and_merges(bpe)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (folder / "merges.txt").write_text(
        "#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8"
    )
    special = {
        "bos_token": "<|startoftext|>",
        "eos_token": "<|endoftext|>",
        "unk_token": "<|endoftext|>",
        "pad_token": pad_token,
    }
    _write_json(folder / "special_tokens_map.json", special)
    _write_json(
        folder / "tokenizer_config.json",
        {
            **special,
            "tokenizer_class": "CLIPTokenizer",
            "model_max_length": 77,
            "do_lower_case": True,
            "errors": "replace",
            "add_prefix_space": False,
            "clean_up_tokenization_spaces": True,
        },
    )


# -- Stable Diffusion 1.5 -----------------------------------------------------------------------

SD15_MODEL_INDEX: dict[str, Any] = {
    "_class_name": "StableDiffusionPipeline",
    "feature_extractor": [None, None],
    "requires_safety_checker": False,
    "safety_checker": [None, None],
    "scheduler": ["diffusers", "PNDMScheduler"],
    "text_encoder": ["transformers", "CLIPTextModel"],
    "tokenizer": ["transformers", "CLIPTokenizer"],
    "unet": ["diffusers", "UNet2DConditionModel"],
    "vae": ["diffusers", "AutoencoderKL"],
}

SD15_UNET: dict[str, Any] = {
    "_class_name": "UNet2DConditionModel",
    "act_fn": "silu",
    "attention_head_dim": 8,
    "block_out_channels": [320, 640, 1280, 1280],
    "center_input_sample": False,
    "cross_attention_dim": 768,
    "down_block_types": [
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "DownBlock2D",
    ],
    "downsample_padding": 1,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "in_channels": 4,
    "layers_per_block": 2,
    "mid_block_scale_factor": 1,
    "norm_eps": 1e-05,
    "norm_num_groups": 32,
    "out_channels": 4,
    "sample_size": 64,
    "up_block_types": [
        "UpBlock2D",
        "CrossAttnUpBlock2D",
        "CrossAttnUpBlock2D",
        "CrossAttnUpBlock2D",
    ],
}

SD15_VAE: dict[str, Any] = {
    "_class_name": "AutoencoderKL",
    "act_fn": "silu",
    "block_out_channels": [128, 256, 512, 512],
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "in_channels": 3,
    "latent_channels": 4,
    "layers_per_block": 2,
    "norm_num_groups": 32,
    "out_channels": 3,
    "sample_size": 512,
    "scaling_factor": 0.18215,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
}

# CLIP ViT-L/14's text tower, as SD 1.5's text_encoder/config.json has it.
SD15_TEXT_ENCODER: dict[str, Any] = {
    "architectures": ["CLIPTextModel"],
    "attention_dropout": 0.0,
    "bos_token_id": 0,
    "dropout": 0.0,
    "eos_token_id": 2,
    "hidden_act": "quick_gelu",
    "hidden_size": 768,
    "initializer_factor": 1.0,
    "initializer_range": 0.02,
    "intermediate_size": 3072,
    "layer_norm_eps": 1e-05,
    "max_position_embeddings": 77,
    "model_type": "clip_text_model",
    "num_attention_heads": 12,
    "num_hidden_layers": 12,
    "pad_token_id": 1,
    "projection_dim": 768,
    "vocab_size": 49408,
}

SD15_SCHEDULER: dict[str, Any] = {
    "_class_name": "PNDMScheduler",
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "clip_sample": False,
    "num_train_timesteps": 1000,
    "prediction_type": "epsilon",
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "timestep_spacing": "leading",
    "trained_betas": None,
}


def _write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def write_sd15_config(folder: Path, bpe: Path) -> None:
    """SD 1.5's diffusers layout without weights: what ``from_single_file(config=...)`` reads."""
    folder.mkdir(parents=True, exist_ok=True)
    _write_json(folder / "model_index.json", SD15_MODEL_INDEX)
    for sub, name, data in (
        ("unet", "config.json", SD15_UNET),
        ("vae", "config.json", SD15_VAE),
        ("text_encoder", "config.json", SD15_TEXT_ENCODER),
        ("scheduler", "scheduler_config.json", SD15_SCHEDULER),
    ):
        (folder / sub).mkdir(exist_ok=True)
        _write_json(folder / sub / name, data)
    write_clip_tokenizer(folder / "tokenizer", bpe)
    (folder / ".charforge-config").write_text(_CONFIG_VERSION, encoding="utf-8")


def ensure_sd15_config(cache_dir: Path, bpe: Path) -> Path:
    """The SD 1.5 config folder under ``cache_dir``, written once (atomically: a folder is
    complete or absent, so concurrent workers never read half of one)."""
    folder = cache_dir / "sd15-config"
    marker = folder / ".charforge-config"
    if marker.is_file() and marker.read_text(encoding="utf-8") == _CONFIG_VERSION:
        return folder
    cache_dir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".sd15-config-", dir=cache_dir))
    try:
        write_sd15_config(staging, bpe)
        if folder.exists():
            old = folder.with_name(f".old-{os.getpid()}-{folder.name}")
            folder.rename(old)
            shutil.rmtree(old, ignore_errors=True)
        try:
            staging.rename(folder)
        except OSError:
            if not marker.is_file():  # not another worker's complete copy: a real failure
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return folder
