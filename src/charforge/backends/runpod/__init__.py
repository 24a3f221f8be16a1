"""The RunPod serverless backend: ``client`` (the API, its key and faults, pacing), ``jobs``
(one job submitted, polled, cancelled), ``a1111`` and ``comfy`` (each worker's input and
output), ``adapter``."""

from charforge.backends.runpod.adapter import RunPodBackend
from charforge.backends.runpod.client import DEFAULT_PACING, Pacing

__all__ = ["DEFAULT_PACING", "Pacing", "RunPodBackend"]
