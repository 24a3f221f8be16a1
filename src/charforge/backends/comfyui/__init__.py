"""The ComfyUI backend: ``client`` (HTTP, websocket and their faults), ``graph`` (charforge's
graph and a user's workflow template), ``prompts`` (one graph queued and followed, stopped when
given up on), ``identity`` (IPAdapter conditioning on reference images), ``adapter``."""

from charforge.backends.comfyui.adapter import ComfyUIBackend, combo_options, match_checkpoint

__all__ = ["ComfyUIBackend", "combo_options", "match_checkpoint"]
