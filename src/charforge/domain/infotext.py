"""A1111's "parameters" infotext: written into every stored PNG so A1111's PNG Info reads it.

Layout: the prompt, then ``Negative prompt: ...``, then one line of ``Key: value`` pairs where a
value holding ``,``, ``:`` or a newline is written as a JSON string.
"""

from __future__ import annotations

import json
import re
from typing import Any

NEGATIVE_PREFIX = "Negative prompt: "
# Key: value pairs of the last line; a quoted value may contain commas.
_PAIR = re.compile(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')


def _quote(value: Any) -> str:
    text = str(value)
    if any(ch in text for ch in ",:\n") or text.startswith('"'):
        return json.dumps(text, ensure_ascii=False)
    return text


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else str(value)


def build_infotext(
    *,
    prompt: str,
    negative_prompt: str,
    steps: int,
    sampler: str,
    scheduler: str,
    cfg_scale: float,
    seed: int,
    width: int,
    height: int,
    model: str,
    model_hash: str | None,
    hires: bool,
    hires_scale: float,
    hires_upscaler: str,
    denoising_strength: float,
    extra: dict[str, Any] | None = None,
    hires_steps: int = 0,
    clip_skip: int = 1,
) -> str:
    """A1111's keys in A1111's order; as A1111 does, ``Clip skip`` only above 1 and ``Hires
    steps`` only when the pass has a step count of its own."""
    pairs: dict[str, Any] = {
        "Steps": steps,
        "Sampler": sampler,
        "Schedule type": scheduler,
        "CFG scale": _number(cfg_scale),
        "Seed": seed,
        "Size": f"{width}x{height}",
    }
    if model_hash:
        pairs["Model hash"] = model_hash
    pairs["Model"] = model
    if hires:
        pairs["Denoising strength"] = _number(denoising_strength)
    if clip_skip > 1:
        pairs["Clip skip"] = clip_skip
    if hires:
        pairs["Hires upscale"] = _number(hires_scale)
        if hires_steps:
            pairs["Hires steps"] = hires_steps
        pairs["Hires upscaler"] = hires_upscaler
    pairs.update(extra or {})
    lines = [prompt]
    if negative_prompt:
        lines.append(NEGATIVE_PREFIX + negative_prompt)
    lines.append(", ".join(f"{key}: {_quote(value)}" for key, value in pairs.items()))
    return "\n".join(lines)


def parse_infotext(text: str) -> dict[str, str]:
    """Read an infotext back: ``Prompt``, ``Negative prompt`` and every key of the last line."""
    lines = text.strip().split("\n")
    last = lines[-1] if len(_PAIR.findall(lines[-1])) >= 3 else ""
    if last:
        lines = lines[:-1]
    prompt_lines: list[str] = []
    negative_lines: list[str] = []
    in_negative = False
    for line in lines:
        if line.startswith(NEGATIVE_PREFIX):
            in_negative = True
            line = line[len(NEGATIVE_PREFIX) :]
        (negative_lines if in_negative else prompt_lines).append(line)
    result = {"Prompt": "\n".join(prompt_lines), "Negative prompt": "\n".join(negative_lines)}
    for key, value in _PAIR.findall(last):
        value = value.strip()
        if value.startswith('"') and value.endswith('"'):
            value = json.loads(value)
        result[key.strip()] = value
    return result
