"""Images from runpod-workers/worker-comfyui: one job per image, the same graph as the ComfyUI
adapter's (``comfyui.graph``) as ``input.workflow``.

Facts (worker-comfyui handler.py): it takes ``{"workflow": graph, "images"?: [{name, image:
base64}]}`` (each image is posted to its ComfyUI's ``/upload/image`` with ``overwrite`` before
the graph is queued) and returns ``{"images": [{filename, type: "base64" | "s3_url", data}]}``
(before 5.0: ``{"status": "success", "message": ...}``); a graph ComfyUI refuses fails the job
with ComfyUI's message in the error ("Cannot execute because node X does not exist."); its
newer versions put ``{"value", "max"}`` step progress into ``output`` while IN_PROGRESS.

References go in ``input.images`` of every job (each job may land on another worker), named
by content hash, and the graph gets the ComfyUI adapter's IPAdapter nodes (comfyui.identity).
"""

from __future__ import annotations

import base64
import logging
import secrets
from collections.abc import Callable
from typing import Any

import httpx

from charforge.backends.base import (
    BackendRequest,
    BackendResult,
    GeneratedImage,
    IdentityUse,
    Progress,
)
from charforge.backends.comfyui.graph import Graph, checkpoints_in, graph_for
from charforge.backends.comfyui.identity import (
    Conditioning,
    add_ipadapter,
    check_workflow_reference,
    preset_for,
    reference_name,
)
from charforge.backends.guard import ResponseTooLarge
from charforge.backends.identity_rule import asked
from charforge.backends.runpod.client import RunPodClient
from charforge.backends.runpod.identity import RunPodIdentity, names_ipadapter
from charforge.backends.runpod.jobs import JobRunner, text_of
from charforge.backends.transport import capitalized, decode_image_base64
from charforge.domain.params import seeds_for
from charforge.errors import BackendBadResponse, BackendRejected, BackendUnavailable

log = logging.getLogger(__name__)


class ComfyWorker:
    def __init__(
        self,
        client: RunPodClient,
        jobs: JobRunner,
        template: Graph | None,
        identity: RunPodIdentity,
    ) -> None:
        self.client, self.jobs, self.template = client, jobs, template
        self.identity = identity
        self.spec = client.spec

    def generate(self, request: BackendRequest, deadline: float) -> BackendResult:
        checkpoint = request.checkpoint.title
        conditioning, identity = self._plan(request)
        # ComfyUI has no "random": one is picked here, so every image's seed is known.
        seeds = seeds_for(request.params.seed, request.count, pick=secrets.randbelow)
        images: list[GeneratedImage] = []
        graph: Graph = {}
        for index, seed in enumerate(seeds):
            report = self._progress_reporter(request, index)
            while True:
                graph = self._graph(request, seed, conditioning)
                job_input: dict[str, Any] = {"workflow": graph}
                if conditioning is not None:
                    job_input["images"] = _images(request, len(conditioning.names))
                try:
                    output = self.jobs.run(
                        job_input, request.style, deadline, report, request=request
                    )
                except BackendRejected as exc:
                    node = names_ipadapter(exc.message)
                    if conditioning is None or conditioning.preset is None or node is None:
                        raise  # a user's workflow cannot run without its own nodes
                    why = f"its ComfyUI worker has no {node} node (ComfyUI_IPAdapter_plus)"
                    self.identity.found_missing(why)
                    identity = self.identity.without(request, why)
                    conditioning = None
                    continue
                break
            images.append(GeneratedImage(self._image(output, request.style), seed))
            if request.on_progress is not None:
                self._report(request.on_progress, Progress((index + 1) / request.count))
        if conditioning is not None:
            self.identity.found_working()
        # The worker's output names no model, and ComfyUI refuses an unknown ckpt_name when it
        # validates the graph instead of substituting one (that is a FAILED job, mapped to
        # CheckpointMissing): a COMPLETED job ran exactly the ckpt_name charforge sent.
        ran = checkpoint if checkpoint in checkpoints_in(graph) else None
        return BackendResult(
            images=images,
            checkpoint=ran,
            checkpoint_hash=None,
            info={"worker": "comfyui", "seeds": [image.seed for image in images]},
            identity=identity,
        )

    def _plan(self, request: BackendRequest) -> tuple[Conditioning | None, IdentityUse | None]:
        check_workflow_reference(self.template, request, self.spec.name)
        if not asked(request):
            return None, None
        why = self.identity.known_missing()
        if why is not None:
            return None, self.identity.without(request, why)
        # A workflow's placeholder takes one picture: the first reference.
        references = request.references[:1] if self.template else request.references
        conditioning = Conditioning(
            tuple(reference_name(reference) for reference in references),
            None if self.template is not None else preset_for(request.style),
            request.params.identity_strength,
        )
        return conditioning, IdentityUse(True, conditioning.label)

    def _graph(
        self, request: BackendRequest, seed: int, conditioning: Conditioning | None
    ) -> Graph:
        graph = graph_for(
            self.template,
            request.params,
            request.checkpoint.title,
            seed,
            reference_image=conditioning.names[0] if conditioning else None,
        )
        return add_ipadapter(graph, conditioning) if conditioning else graph

    def _progress_reporter(
        self, request: BackendRequest, index: int
    ) -> Callable[[Any], None] | None:
        """Turns worker-comfyui's ``{"value", "max"}`` progress into the request's fraction."""
        report = request.on_progress
        if report is None:
            return None

        def on_output(output: Any) -> None:
            if not isinstance(output, dict):
                return
            value, most = output.get("value"), output.get("max")
            if isinstance(value, int) and isinstance(most, int) and most > 0:
                inner = min(max(value / most, 0.0), 1.0)
                self._report(report, Progress((index + inner) / request.count, value, most))

        return on_output

    def _report(self, report: Callable[[Progress], None], update: Progress) -> None:
        try:
            report(update)
        except Exception:  # progress is a nicety (the runner writes it to the database):
            # a failing report must never end a generation, or leave its job running
            log.exception("backend %s: progress callback failed", self.spec.name)

    def _image(self, output: Any, style: str) -> bytes:
        where = self.client.where(style)
        if not isinstance(output, dict):
            raise BackendBadResponse(f"{capitalized(where)} sent no output for a finished job.")
        if output.get("status") == "error":  # older workers report failures as output
            raise BackendRejected(
                f"{capitalized(where)}'s ComfyUI worker failed: {text_of(output.get('message'))}",
                hint="This is the worker's own message; the endpoint's logs show the details.",
            )
        items = output.get("images")
        if isinstance(items, list) and items and isinstance(items[0], dict):
            # Extra images (a batch, a second SaveImage) belong to no seed of ours.
            first = items[0]
            if first.get("type") == "s3_url":
                return self._download(first.get("data"), where)
            return decode_image_base64(first.get("data"), where)
        message = output.get("message")  # worker-comfyui before 5.0
        if isinstance(message, list) and message and isinstance(message[0], dict):
            kind, message = message[0].get("imageType"), message[0].get("image")
            if kind == "url":
                return self._download(message, where)
        if isinstance(message, str) and message:
            if message.startswith(("http://", "https://")):
                return self._download(message, where)
            return decode_image_base64(message, where)
        problems = output.get("errors") or output.get("status")
        raise BackendBadResponse(
            f"{capitalized(where)}'s ComfyUI worker returned no image"
            + (f" ({text_of(problems)})." if problems else "."),
            hint="Check that the workflow ends in a SaveImage node.",
            retriable=False,  # the same graph gives the same nothing
        )

    def _download(self, url: Any, where: str) -> bytes:
        """A worker's image in its S3 bucket: a plain GET of a pre-signed URL, never with the
        RunPod key (it would go to the bucket's host), and never shown (it is a credential)."""
        if not isinstance(url, str) or not url.startswith(("http://", "https://")):
            raise BackendBadResponse(f"{capitalized(where)} sent an image link that is not a URL.")
        try:
            response = self.client.http.get(url, timeout=self.client.pacing.call_timeout)
        except ResponseTooLarge as exc:
            raise BackendBadResponse(
                f"The image {where} stored in its bucket is larger than "
                f"{exc.cap} bytes (CHARFORGE_BACKEND_MAX_RESPONSE_BYTES); it was not kept."
            ) from exc
        except httpx.HTTPError as exc:
            raise BackendUnavailable(
                f"Could not download the image {where} stored in its bucket: "
                f"{exc or type(exc).__name__}.",
                hint="Check the worker's BUCKET_ENDPOINT_URL and that the bucket is reachable.",
            ) from exc
        if response.status_code != 200:
            raise BackendBadResponse(
                f"The bucket of {where} answered HTTP {response.status_code} for an image.",
                hint="Check the worker's bucket settings (BUCKET_ENDPOINT_URL and its keys).",
            )
        return response.content


def _images(request: BackendRequest, count: int) -> list[dict[str, str]]:
    """worker-comfyui's ``input.images``: the references used, under content-hash names."""
    return [
        {"name": reference_name(ref), "image": base64.b64encode(ref.png).decode("ascii")}
        for ref in request.references[:count]
    ]
