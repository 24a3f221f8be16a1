"""Tiny random Stable Diffusion checkpoints, built from configs (no hub, no downloads).

``build_tiny_pipeline`` writes an SD-layout diffusers folder (UNet, VAE, CLIP text encoder, the
real CLIP tokenizer files charforge writes, SD 1.5's scheduler) of a few MB that renders 64x64
in about a tenth of a second on a CPU. ``write_single_file`` writes the same weights as one
``.safetensors`` file in the original (CompVis/LDM) key layout that A1111 checkpoints use:
diffusers converts only from that layout, so the reverse mapping for these SD-shaped models is
here; also in the variants of it that A1111 loads too (text-encoder keys without
``text_model.``, a ``.ckpt`` with PyTorch Lightning's training state beside the weights).
Imported only by tests that have torch.
"""

from __future__ import annotations

import shutil
import sys
import types
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
from diffusers import (
    AutoencoderKL,
    PNDMScheduler,
    StableDiffusionPipeline,
    UNet2DConditionModel,
)
from safetensors.torch import save_file
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from charforge.backends.local.configs import SD15_SCHEDULER, find_clip_bpe, write_clip_tokenizer


def tokenizer_folder(cache: Path) -> Path:
    folder = cache / "clip-tokenizer"
    if not (folder / "vocab.json").is_file():
        bpe = find_clip_bpe()
        assert bpe is not None, "the local extra ships CLIP's BPE vocabulary (openai-clip)"
        write_clip_tokenizer(folder, bpe)
    return folder


def build_tiny_pipeline(folder: Path, *, seed: int, tokenizer: Path) -> None:
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64),
        layers_per_block=1,
        sample_size=16,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=8,
        norm_num_groups=32,
    )
    vae = AutoencoderKL(
        block_out_channels=[32, 64],
        in_channels=3,
        out_channels=3,
        down_block_types=["DownEncoderBlock2D", "DownEncoderBlock2D"],
        up_block_types=["UpDecoderBlock2D", "UpDecoderBlock2D"],
        latent_channels=4,
        norm_num_groups=32,
    )
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            bos_token_id=0,
            eos_token_id=2,
            hidden_size=32,
            intermediate_size=37,
            layer_norm_eps=1e-05,
            num_attention_heads=4,
            num_hidden_layers=2,
            pad_token_id=1,
            vocab_size=49408,
            max_position_embeddings=77,
        )
    )
    pipe = StableDiffusionPipeline(
        unet=unet,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=CLIPTokenizer.from_pretrained(str(tokenizer), local_files_only=True),
        scheduler=PNDMScheduler.from_config(SD15_SCHEDULER),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(str(folder), safe_serialization=True)


def config_only_copy(folder: Path, target: Path) -> Path:
    """The folder without weights: what ``single_file_config`` points at."""
    shutil.copytree(folder, target, ignore=shutil.ignore_patterns("*.safetensors", "*.bin"))
    return target


# -- diffusers -> original (LDM) key layout ---------------------------------------------------

_RESNET = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "time_emb_proj": "emb_layers.1",
    "conv_shortcut": "skip_connection",
}
_UNET_TOP = {
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
    "conv_in": "input_blocks.0.0",
    "conv_norm_out": "out.0",
    "conv_out": "out.2",
}
_VAE_ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out": "proj_out"}


def _resnet(rest: list[str]) -> str:
    return ".".join([_RESNET.get(rest[0], rest[0]), *rest[1:]])


def unet_to_ldm(state: dict[str, Any], config: Any) -> dict[str, Any]:
    per = config["layers_per_block"] + 1  # resnets per level, plus the down/upsampler slot
    with_attention = {
        int(k.split(".")[1]) for k in state if k.startswith("up_blocks.") and ".attentions." in k
    }
    out = {}
    for key, tensor in state.items():
        parts = key.split(".")
        top = next((d for d in _UNET_TOP if key.startswith(d + ".")), None)
        if top is not None:
            new = _UNET_TOP[top] + key[len(top) :]
        elif parts[0] == "down_blocks":
            level, kind = int(parts[1]), parts[2]
            if kind == "resnets":
                new = f"input_blocks.{1 + level * per + int(parts[3])}.0." + _resnet(parts[4:])
            elif kind == "attentions":
                new = f"input_blocks.{1 + level * per + int(parts[3])}.1." + ".".join(parts[4:])
            else:  # downsamplers.0.conv.*
                new = f"input_blocks.{(level + 1) * per}.0.op.{parts[-1]}"
        elif parts[0] == "mid_block":
            if parts[1] == "resnets":
                new = f"middle_block.{2 * int(parts[2])}." + _resnet(parts[3:])
            else:
                new = "middle_block.1." + ".".join(parts[3:])
        elif parts[0] == "up_blocks":
            level, kind = int(parts[1]), parts[2]
            if kind == "resnets":
                new = f"output_blocks.{level * per + int(parts[3])}.0." + _resnet(parts[4:])
            elif kind == "attentions":
                new = f"output_blocks.{level * per + int(parts[3])}.1." + ".".join(parts[4:])
            else:  # upsamplers.0.conv.*: after the attention where the level has one
                slot = 2 if level in with_attention else 1
                new = f"output_blocks.{level * per + per - 1}.{slot}.conv.{parts[-1]}"
        else:
            raise KeyError(key)
        out["model.diffusion_model." + new] = tensor
    return out


def vae_to_ldm(state: dict[str, Any], config: Any) -> dict[str, Any]:
    levels = len(config["up_block_types"])
    out = {}
    for key, tensor in state.items():
        parts = key.split(".")
        side = parts[0]  # encoder | decoder | quant_conv | post_quant_conv
        if len(parts) > 2 and parts[1] == "conv_norm_out":
            new = f"{side}.norm_out.{parts[-1]}"
        elif len(parts) > 2 and parts[1] in ("down_blocks", "up_blocks"):
            index = int(parts[2])
            level = index if side == "encoder" else levels - 1 - index
            name = "down" if side == "encoder" else "up"
            if parts[3] == "resnets":
                rest = parts[5:]
                rest[0] = "nin_shortcut" if rest[0] == "conv_shortcut" else rest[0]
                new = f"{side}.{name}.{level}.block.{parts[4]}." + ".".join(rest)
            else:
                sampler = "downsample" if side == "encoder" else "upsample"
                new = f"{side}.{name}.{level}.{sampler}.conv.{parts[-1]}"
        elif len(parts) > 2 and parts[1] == "mid_block":
            if parts[2] == "resnets":
                rest = parts[4:]
                rest[0] = "nin_shortcut" if rest[0] == "conv_shortcut" else rest[0]
                new = f"{side}.mid.block_{int(parts[3]) + 1}." + ".".join(rest)
            else:  # attentions.0.<to_q|...>[.0].weight: 1x1 convolutions in the original
                new = f"{side}.mid.attn_1.{_VAE_ATTENTION[parts[4]]}.{parts[-1]}"
                if tensor.ndim == 2:
                    tensor = tensor[:, :, None, None]
        else:
            new = key
        out["first_stage_model." + new] = tensor
    return out


def text_encoder_to_ldm(state: dict[str, Any]) -> dict[str, Any]:
    # transformers 5.6+ flattened CLIPTextModel; the original files keep "text_model.".
    return {
        "cond_stage_model.transformer."
        + (key if key.startswith("text_model.") else "text_model." + key): tensor
        for key, tensor in state.items()
    }


def ldm_state_dict(pipe: StableDiffusionPipeline) -> dict[str, Any]:
    state = {}
    state.update(unet_to_ldm(pipe.unet.state_dict(), pipe.unet.config))
    state.update(vae_to_ldm(pipe.vae.state_dict(), pipe.vae.config))
    state.update(text_encoder_to_ldm(pipe.text_encoder.state_dict()))
    return state


TEXT_MODEL = "cond_stage_model.transformer.text_model."


def without_text_model(key: str) -> str:
    """A1111's older SD 1.x layout: CLIP's keys without the ``text_model.`` level."""
    if key.startswith(TEXT_MODEL):
        return "cond_stage_model.transformer." + key[len(TEXT_MODEL) :]
    return key


@contextmanager
def _lightning_callback_class() -> Iterator[type]:
    """A class that pickles as PyTorch Lightning's ModelCheckpoint (not installed here), as
    CompVis' SD 1.x .ckpt files name it in their callback state."""
    name = "pytorch_lightning.callbacks.model_checkpoint"
    parts = name.split(".")
    modules = {
        ".".join(parts[: i + 1]): types.ModuleType(".".join(parts[: i + 1])) for i in range(3)
    }
    callback = type("ModelCheckpoint", (), {"__module__": name})
    setattr(modules[name], "ModelCheckpoint", callback)  # noqa: B010 (a module made here)
    saved = {key: sys.modules.get(key) for key in modules}
    sys.modules.update(modules)
    try:
        yield callback
    finally:
        for key, module in saved.items():
            if module is None:
                sys.modules.pop(key, None)
            else:
                sys.modules[key] = module


def write_single_file(
    folder: Path,
    target: Path,
    *,
    text_model: bool = True,
    training_state: bool = False,
    renames: Mapping[str, str] | None = None,
) -> None:
    """The diffusers folder's weights as one A1111-style checkpoint: ``.safetensors``, or a
    pickled ``.ckpt`` with the weights under ``state_dict`` as CompVis saved them.

    ``text_model=False``: CLIP's keys without ``text_model.``. ``training_state`` (a .ckpt):
    beside ``state_dict`` what PyTorch Lightning saved in CompVis' files (step, epoch, version,
    ModelCheckpoint's state keyed by its class, numpy scalars in it). ``renames``: key prefixes
    replaced (old -> new), for layouts nobody reads."""
    pipe = StableDiffusionPipeline.from_pretrained(
        str(folder), local_files_only=True, dtype=torch.float32
    )
    state = {k: v.detach().contiguous() for k, v in ldm_state_dict(pipe).items()}
    if not text_model:
        state = {without_text_model(k): v for k, v in state.items()}
    for old, new in (renames or {}).items():
        state = {(new + k[len(old) :] if k.startswith(old) else k): v for k, v in state.items()}
    if target.suffix != ".ckpt":
        save_file(state, str(target))
    elif not training_state:
        torch.save({"state_dict": state}, str(target))
    else:
        with _lightning_callback_class() as callback:
            torch.save(
                {
                    "epoch": 5,
                    "global_step": 470000,
                    "pytorch-lightning_version": "1.4.2",
                    "state_dict": state,
                    "callbacks": {
                        callback: {"best_model_score": np.float64(0.5), "best_model_path": ""}
                    },
                },
                str(target),
            )
