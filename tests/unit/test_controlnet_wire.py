"""ControlNet wire mapping: the method chosen from what the extension lists, and the answer's
extra images (detected maps) never taken for generated ones."""

from __future__ import annotations

import base64
import io
import json

from PIL import Image

from charforge.backends.a1111.controlnet import REFERENCE_ONLY, choose_method, script_missing
from charforge.backends.a1111.wire import parse_txt2img

MODULES = ["none", "canny", "reference_only", "ip-adapter-auto", "ip-adapter_face_id_plus"]


def test_the_method_follows_what_is_installed_and_the_style() -> None:
    assert choose_method(MODULES, [], style="realistic") == REFERENCE_ONLY
    assert choose_method(["none", "canny"], [], style="anime") is None
    models = ["ip-adapter_sd15 [6a3f6166]", "ip-adapter-plus-face_sd15 [71693645]"]
    face = choose_method(MODULES, models, style="realistic")
    assert face is not None and face.model == "ip-adapter-plus-face_sd15 [71693645]"
    assert face.module == "ip-adapter-auto" and "ip-adapter-plus-face_sd15" in face.label
    drawn = choose_method(MODULES, models, style="anime")
    assert drawn is not None and drawn.model == "ip-adapter_sd15 [6a3f6166]"
    faceid = choose_method(MODULES, ["ip-adapter-faceid-plusv2_sd15 [6e14fc1a]"], style="realistic")
    assert faceid is not None and faceid.module == "ip-adapter_face_id_plus"
    # A FaceID model without the InsightFace module cannot run: reference_only instead.
    assert choose_method(["reference_only"], ["ip-adapter-faceid_sd15"], style="realistic") == (
        REFERENCE_ONLY
    )
    assert script_missing("Script 'controlnet' not found")
    assert script_missing("always on script controlnet not found")
    assert not script_missing("Script 'adetailer' not found")


def _b64(color: tuple[int, int, int]) -> str:
    out = io.BytesIO()
    Image.new("RGB", (8, 8), color).save(out, format="PNG")
    return base64.b64encode(out.getvalue()).decode()


def test_detected_maps_after_the_generated_images_are_not_kept() -> None:
    generated = [_b64((255, 0, 0)), _b64((0, 255, 0))]
    maps = [_b64((0, 0, 255)), _b64((0, 0, 254))]
    info = {"all_seeds": [5, 6], "index_of_first_image": 0, "sd_model_name": "m"}
    result = parse_txt2img({"images": generated + maps, "info": json.dumps(info)}, "here")
    assert [i.seed for i in result.images] == [5, 6]
    colors = [Image.open(io.BytesIO(i.data)).getpixel((0, 0)) for i in result.images]
    assert colors == [(255, 0, 0), (0, 255, 0)]
