"""What a fake ComfyUI needs for identity conditioning; shared by the ComfyUI and RunPod fakes.

- ``InputFolder``: ComfyUI's input / temp / output folders as ``POST /upload/image``
  (server.py ``image_upload``) fills them: ``overwrite`` "true" or "1" replaces a file; without
  it a clash is renamed ``x (1).png``, ``x (2).png``..., unless the bytes are identical (the
  existing name is answered and nothing is written, ComfyUI #3465). ``resolve`` is
  ``folder_paths.exists_annotated_filepath`` (``name [output]`` etc., subfolders allowed).
- ``LoadImage`` (nodes.py): its ``image`` combo lists the image files at the top of the input
  folder, but as the node has ``VALIDATE_INPUTS(image)`` ComfyUI skips the combo check and an
  absent file is a ``custom_validation_failed`` "Invalid image file: NAME"; a file that is not a
  picture fails at execution (PIL ``UnidentifiedImageError``).
- ``IPAdapterUnifiedLoader`` and ``IPAdapterAdvanced`` (cubiq/ComfyUI_IPAdapter_plus,
  IPAdapterPlus.py) with their exact ``INPUT_TYPES``; applying one blends its reference into the
  rendered picture: ``alpha = 0.25 * weight * (end_at - start_at)`` clamped to 0..0.5.
"""

from __future__ import annotations

import hashlib
import io
import posixpath
from dataclasses import dataclass, field
from typing import Any

from PIL import Image, ImageOps, UnidentifiedImageError

IPADAPTER_PRESETS = [
    "LIGHT - SD1.5 only (low strength)",
    "STANDARD (medium strength)",
    "VIT-G (medium strength)",
    "PLUS (high strength)",
    "PLUS FACE (portraits)",
    "FULL FACE - SD1.5 only (portraits stronger)",
]
WEIGHT_TYPES = [
    "linear",
    "ease in",
    "ease out",
    "ease in-out",
    "reverse in-out",
    "weak input",
    "weak output",
    "weak middle",
    "strong middle",
    "style transfer",
    "composition",
    "strong style transfer",
    "style and composition",
    "style transfer precise",
    "composition precise",
]
COMBINE_EMBEDS = ["concat", "add", "subtract", "average", "norm average"]
EMBEDS_SCALING = ["V only", "K+V", "K+V w/ C penalty", "K+mean(V) w/ C penalty"]

# INPUT_TYPES exactly as the node pack declares them (V1 nodes: /object_info shows them as is).
IPADAPTER_NODES: dict[str, dict[str, Any]] = {
    "IPAdapterUnifiedLoader": {
        "input": {
            "required": {"model": ["MODEL"], "preset": [IPADAPTER_PRESETS]},
            "optional": {"ipadapter": ["IPADAPTER"]},
        },
        "output": ["MODEL", "IPADAPTER"],
        "output_name": ["model", "ipadapter"],
    },
    "IPAdapterAdvanced": {
        "input": {
            "required": {
                "model": ["MODEL"],
                "ipadapter": ["IPADAPTER"],
                "image": ["IMAGE"],
                "weight": ["FLOAT", {"default": 1.0, "min": -1, "max": 5, "step": 0.05}],
                "weight_type": [WEIGHT_TYPES],
                "combine_embeds": [COMBINE_EMBEDS],
                "start_at": ["FLOAT", {"default": 0.0, "min": 0.0, "max": 1.0, "step": 0.001}],
                "end_at": ["FLOAT", {"default": 1.0, "min": 0.0, "max": 1.0, "step": 0.001}],
                "embeds_scaling": [EMBEDS_SCALING],
            },
            "optional": {
                "image_negative": ["IMAGE"],
                "attn_mask": ["MASK"],
                "clip_vision": ["CLIP_VISION"],
            },
        },
        "output": ["MODEL"],
        "output_name": ["MODEL"],
    },
}
_IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".gif", ".bmp", ".tif", ".tiff")
FOLDER_TYPES = ("input", "temp", "output")


def spec_inputs(spec: dict[str, list[Any]]) -> dict[str, tuple[str, Any]]:
    """V1 ``INPUT_TYPES`` entries as the fake's ``(kind, combo options or limits)`` pairs."""
    out: dict[str, tuple[str, Any]] = {}
    for name, entry in spec.items():
        if isinstance(entry[0], list):
            out[name] = ("COMBO", list(entry[0]))
        else:
            out[name] = (str(entry[0]), entry[1] if len(entry) > 1 else None)
    return out


@dataclass
class Upload:
    """One ``POST /upload/image`` as the server handled it."""

    requested: str
    name: str
    subfolder: str
    type: str
    overwrite: bool
    duplicate: bool
    """Same name and same bytes as a file already there: nothing was written."""
    size: int
    sha256: str


@dataclass
class InputFolder:
    """ComfyUI's input, temp and output folders: ``(type, subfolder, name) -> bytes``."""

    files: dict[tuple[str, str, str], bytes] = field(default_factory=dict)
    uploads: list[Upload] = field(default_factory=list)

    def upload(
        self,
        data: bytes,
        filename: str,
        *,
        type_: str = "input",
        subfolder: str = "",
        overwrite: str | None = None,
    ) -> dict[str, str]:
        """``image_upload``: stores the file and answers ``{name, subfolder, type}``.

        Raises ``ValueError`` where ComfyUI answers 400 (no file name, a path out of the
        folder) and ``KeyError`` for an unknown ``type`` (ComfyUI fails with a 500).
        """
        if type_ not in FOLDER_TYPES:
            raise KeyError(type_)
        if not filename:
            raise ValueError("no file name")
        folder = posixpath.normpath(posixpath.join("/root", subfolder, filename))
        if not folder.startswith("/root/"):
            raise ValueError("outside the folder")
        stem, ext = posixpath.splitext(filename)
        name, duplicate = filename, False
        replace = overwrite in ("true", "1")
        if not replace:
            number = 1
            while _key(type_, subfolder, name) in self.files:
                if self.files[_key(type_, subfolder, name)] == data:
                    duplicate = True
                    break
                name = f"{stem} ({number}){ext}"
                number += 1
        if not duplicate:
            self.files[_key(type_, subfolder, name)] = data
        digest = hashlib.sha256(data).hexdigest()
        self.uploads.append(
            Upload(filename, name, subfolder, type_, replace, duplicate, len(data), digest)
        )
        return {"name": name, "subfolder": subfolder, "type": type_}

    def listing(self) -> list[str]:
        """LoadImage's combo: image files at the top of the input folder, sorted."""
        names = [
            name
            for (type_, sub, name) in self.files
            if type_ == "input" and sub == "" and name.lower().endswith(_IMAGE_EXTENSIONS)
        ]
        return sorted(names)

    def resolve(self, annotated: Any) -> bytes | None:
        """``exists_annotated_filepath``: ``sub/name.png`` or ``name.png [output]``."""
        if not isinstance(annotated, str):
            return None
        type_, name = "input", annotated
        for candidate in FOLDER_TYPES:
            if annotated.endswith(f" [{candidate}]"):
                type_, name = candidate, annotated[: -len(candidate) - 3]
        if posixpath.normpath(name).startswith(("/", "..")):
            return None
        return self.files.get(_key(type_, "", name))

    def get(self, type_: str, subfolder: str, name: str) -> bytes | None:
        return self.files.get(_key(type_, subfolder, name))


def _key(type_: str, subfolder: str, name: str) -> tuple[str, str, str]:
    """Where ``subfolder/name`` lands: (type, folder relative to the type's root, file name)."""
    path = posixpath.normpath(posixpath.join(subfolder, name))
    sub, _, base = path.rpartition("/")
    return (type_, sub, base)


def load_image_error(name: str) -> dict[str, Any]:
    """The node error ``LoadImage.VALIDATE_INPUTS`` makes for a file that is not there."""
    return {
        "type": "custom_validation_failed",
        "message": "Custom validation failed for node",
        "details": f"image - Invalid image file: {name}",
        "extra_info": {"input_name": "image"},
    }


def open_picture(data: bytes, name: str, folder: str = "/ComfyUI/input") -> Image.Image:
    """``LoadImage.load_image``'s ``Image.open``; ``ValueError`` with PIL's message."""
    try:
        picture = Image.open(io.BytesIO(data))
        picture.load()
    except (UnidentifiedImageError, OSError) as exc:
        raise ValueError(f"cannot identify image file '{folder}/{name}'") from exc
    return ImageOps.exif_transpose(picture).convert("RGB")


def ipadapter_alpha(weight: float, start_at: float, end_at: float) -> float:
    return min(max(0.25 * weight * (end_at - start_at), 0.0), 0.5)


def blend_references(picture: Image.Image, adapters: list[dict[str, Any]]) -> Image.Image:
    """The picture with each applied IPAdapter's reference blended in (centre-cropped to the
    picture's size, as CLIPImageProcessor crops the centre)."""
    for adapter in adapters:
        weight = float(adapter.get("weight", 1.0))
        alpha = ipadapter_alpha(
            weight, float(adapter.get("start_at", 0.0)), float(adapter.get("end_at", 1.0))
        )
        reference = adapter.get("picture")
        if alpha <= 0 or reference is None:
            continue
        fitted = ImageOps.fit(reference, picture.size, Image.Resampling.LANCZOS)
        picture = Image.blend(picture.convert("RGB"), fitted, alpha)
    return picture


def png(picture: Image.Image) -> bytes:
    out = io.BytesIO()
    picture.save(out, format="PNG", compress_level=1)
    return out.getvalue()
