"""The AUTOMATIC1111 / Forge WebUI backend: ``client`` (HTTP and its faults), ``wire`` (bodies
and answers), ``tasks`` (one task followed in the WebUI's global state), ``adapter``."""

from charforge.backends.a1111.adapter import A1111Backend
from charforge.backends.a1111.client import auth_setting
from charforge.backends.a1111.wire import error_text, parse_txt2img, txt2img_payload

__all__ = ["A1111Backend", "auth_setting", "error_text", "parse_txt2img", "txt2img_payload"]
