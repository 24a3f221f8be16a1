"""ComfyUI over its HTTP and websocket API.

Facts this adapter is built on (read in ComfyUI's server.py, execution.py and main.py; the
prompt's way is in prompts.py):
- nodes are cached by their inputs: a prompt identical to an earlier one runs nothing, its
  SaveImage node only repeats its cached output and the history names the earlier file;
- ``/object_info/{node}`` lists combo values as ``[[...], {...}]`` (before 2025) or as
  ``["COMBO", {"options": [...]}]``, and answers ``{}`` for a node class it does not have;
  ComfyUI reports no checkpoint hashes.

What charforge does on top: every prompt it queued and gives up on (timeout, interrupt, any
error before its history entry is read) is stopped, else it runs on and the next prompt waits
behind it; a few failed history reads in a row are ridden out while the deadline allows. The
high-resolution pass is part of charforge's own graph (``graph.build_graph``): upscaler models
are not loaded, a Lanczos pixel upscale stands in for them and the result's info says what ran
(``hires_upscaler_used``). A user's workflow has only the passes and loaders it was drawn
with: a request needing more (hires, LoRA tags) is refused, never silently run without; its
sampler and scheduler are required placeholders, checked by name like charforge's own graph's.
Identity conditioning (IPAdapter nodes, references uploaded by content hash) is identity.py.
"""

from __future__ import annotations

import logging
import secrets
import threading
import time
from dataclasses import dataclass, replace
from typing import Any

from charforge.backends.base import (
    BackendRequest,
    BackendResult,
    CheckpointInfo,
    GeneratedImage,
    IdentityUse,
    ProbeResult,
)
from charforge.backends.comfyui.client import ComfyClient
from charforge.backends.comfyui.graph import (
    IDS,
    Graph,
    WorkflowError,
    comfy_sampler,
    graph_for,
    hires_upscale,
    load_workflow,
    placeholder_inputs,
)
from charforge.backends.comfyui.identity import (
    IPADAPTER_NODES,
    ComfyIdentity,
    Conditioning,
    add_ipadapter,
)
from charforge.backends.comfyui.prompts import (
    QUIET_SECONDS,
    Active,
    PromptRunner,
    Tracker,
    sampling_passes,
)
from charforge.backends.comfyui.wire import InputImageMissing, NodeMissing
from charforge.backends.transport import capitalized
from charforge.domain.capabilities import CUSTOM_WORKFLOW_LACKS, Capability, lora_tags
from charforge.domain.checkpoints import find_checkpoint_named
from charforge.domain.params import seeds_for
from charforge.domain.requirements import require_capabilities
from charforge.domain.routes import BackendSpec
from charforge.errors import (
    BackendBadResponse,
    CheckpointMissing,
    InvalidInput,
    LoraMissing,
)

log = logging.getLogger(__name__)

# A checkpoint list is trusted this long; the check after generation catches one that vanished.
_CHECKPOINT_CACHE_SECONDS = 10.0
_NAME_CACHE_SECONDS = 60.0


def combo_options(info: Any, node: str, name: str) -> list[str] | None:
    """A combo input's values from ``/object_info/{node}``, in the old and the new shape."""
    node_info = info.get(node) if isinstance(info, dict) else None
    inputs = node_info.get("input") if isinstance(node_info, dict) else None
    if not isinstance(inputs, dict):
        return None
    for section in ("required", "optional"):
        spec = inputs.get(section, {}).get(name) if isinstance(inputs.get(section), dict) else None
        if not isinstance(spec, list) or not spec:
            continue
        options: Any = spec[0]  # old: [["a", "b"], {...}]
        if spec[0] == "COMBO":  # new: ["COMBO", {"options": ["a", "b"]}]
            options = (
                spec[1].get("options") if len(spec) > 1 and isinstance(spec[1], dict) else None
            )
        if isinstance(options, list):
            return [str(option) for option in options]
    return None


def match_checkpoint(name: str, available: list[CheckpointInfo]) -> CheckpointInfo | None:
    """``name`` among ComfyUI's checkpoints, which may be in subfolders (``sd15/x.safetensors``)."""
    return find_checkpoint_named(name, available, lambda info: info.name)


@dataclass
class _Run:
    """One image of a request, and how it is conditioned (which may change as it runs)."""

    request: BackendRequest
    index: int
    seed: int
    loras: dict[str, str]
    conditioning: Conditioning | None
    identity: IdentityUse | None


class ComfyUIBackend:
    def __init__(
        self,
        spec: BackendSpec,
        *,
        probe_timeout: float = 3.0,
        quiet_seconds: float = QUIET_SECONDS,
    ) -> None:
        self.spec = spec
        self._probe_timeout = probe_timeout
        self._template: Graph | None = None
        # Where the graph that ran names its checkpoint.
        self._checkpoint_inputs = [(IDS.checkpoint_loader, "ckpt_name")]
        self._capabilities = spec.capabilities
        if spec.workflow is not None:
            try:
                self._template = load_workflow(spec.workflow)
            except WorkflowError as exc:
                raise ValueError(f"{spec.source}: {exc}") from exc
            self._checkpoint_inputs = placeholder_inputs(self._template, "checkpoint")
            # Whatever the spec says: charforge cannot add passes or loaders to a workflow.
            self._capabilities = spec.capabilities - CUSTOM_WORKFLOW_LACKS
        self._http = ComfyClient(spec)
        self.prompts = PromptRunner(
            self._http, quiet_seconds=quiet_seconds, checkpoint_refused=self._checkpoint_refused
        )
        self._info: dict[str, tuple[float, Any]] = {}
        self._listed: tuple[float, list[CheckpointInfo]] | None = None
        self._lock = threading.Lock()
        self.identity = ComfyIdentity(
            self._http, self._template, self.object_info, self.forget_info, combo_options
        )

    def close(self) -> None:
        self._http.close()

    def _where(self, style: str | None) -> str:
        return self._http.where(style)

    # -- what the server has ---------------------------------------------------------------

    def object_info(
        self, node: str, *, style: str | None, max_age: float, timeout: float | None = None
    ) -> Any:
        """``/object_info/{node}``, read again when the copy is older than ``max_age``."""
        with self._lock:
            cached = self._info.get(node)
        if cached and time.monotonic() - cached[0] < max_age:
            return cached[1]
        response = self._http.call("GET", f"/object_info/{node}", style=style, timeout=timeout)
        info = self._http.json(response, self._where(style))
        with self._lock:
            self._info[node] = (time.monotonic(), info)
        return info

    def forget_info(self, *nodes: str) -> None:
        with self._lock:
            for node in nodes:
                self._info.pop(node, None)

    def list_checkpoints(
        self, *, style: str | None = None, timeout: float | None = None
    ) -> list[CheckpointInfo]:
        info = self.object_info("CheckpointLoaderSimple", style=style, max_age=0.0, timeout=timeout)
        names = combo_options(info, "CheckpointLoaderSimple", "ckpt_name")
        if names is None:
            raise BackendBadResponse(
                f"{capitalized(self._where(style))} did not list its checkpoints "
                "(/object_info/CheckpointLoaderSimple has no ckpt_name).",
                hint="Something other than ComfyUI may be listening on that URL.",
            )
        listed = [CheckpointInfo(name, name, None) for name in names]
        self._listed = (time.monotonic(), listed)
        return listed

    def find_checkpoint(self, name: str, *, style: str) -> CheckpointInfo:
        cached = self._listed
        if cached and time.monotonic() - cached[0] < _CHECKPOINT_CACHE_SECONDS:
            found = match_checkpoint(name, cached[1])
            if found is not None:
                return found
        # ComfyUI rescans its folders on every listing: a new file shows up without a refresh.
        available = self.list_checkpoints(style=style)
        found = match_checkpoint(name, available)
        if found is None:
            names = ", ".join(c.name for c in available) or "none"
            raise CheckpointMissing(
                f"Checkpoint '{name}' for the {style} style is not on ComfyUI backend "
                f"'{self.spec.name}'. That backend has: {names}.",
                hint=self._missing_hint(name, style),
            )
        return found

    def _missing_hint(self, name: str, style: str) -> str:
        return (
            f"Put {name} into ComfyUI's models/checkpoints folder, or point {self.spec.source} "
            f"at a backend that has it, or change the route with [routes.{style}] checkpoint "
            "in CHARFORGE_CONFIG."
        )

    def _checkpoint_refused(self, name: str, style: str) -> str:
        self._listed = None  # the list it was found in is out of date
        return self._missing_hint(name, style)

    def _check_name(self, value: str, asked: str, input_name: str, field: str, style: str) -> None:
        info = self.object_info("KSampler", style=style, max_age=_NAME_CACHE_SECONDS)
        names = combo_options(info, "KSampler", input_name)
        if names is None or value in names:
            return  # a ComfyUI without KSampler info validates the prompt itself
        shown = f"'{asked}'" if asked == value else f"'{asked}' (ComfyUI: '{value}')"
        raise InvalidInput(
            f"{field.capitalize()} {shown} is not known to ComfyUI backend '{self.spec.name}'. "
            f"Known: {', '.join(names)}.",
            field=field,
            hint=f"Pick one of the {field}s listed, or leave {field} out for the default.",
        )

    # -- generation ------------------------------------------------------------------------

    def graph(
        self,
        request: BackendRequest,
        seed: int,
        loras: dict[str, str] | None = None,
        conditioning: Conditioning | None = None,
    ) -> Graph:
        """The API-format graph for one image of ``request``."""
        graph = graph_for(
            self._template,
            request.params,
            request.checkpoint.title,
            seed,
            loras=loras,
            reference_image=conditioning.names[0] if conditioning else None,
        )
        return add_ipadapter(graph, conditioning) if conditioning else graph

    def lora_files(self, prompt: str, style: str) -> dict[str, str]:
        """The file LoraLoader lists for each ``<lora:name>`` tag (a subfolder or extension
        may be left out of the tag); LoraMissing naming what ComfyUI has otherwise, before
        anything is queued."""
        wanted = [name for name, _ in lora_tags(prompt)]
        if not wanted:
            return {}
        info = self.object_info("LoraLoader", style=style, max_age=0.0)
        listed = combo_options(info, "LoraLoader", "lora_name") or []
        found: dict[str, str] = {}
        for name in wanted:
            match = find_checkpoint_named(name, listed, lambda file: file)
            if match is None:
                raise LoraMissing(
                    f"LoRA '{name}' is not on ComfyUI backend '{self.spec.name}'. That backend "
                    f"has: {', '.join(listed) or 'none'}.",
                    field="prompt",
                    hint="Put the file into ComfyUI's models/loras folder, or fix the "
                    "<lora:name:weight> tag in the prompt or the character's description.",
                    extra={"loras": listed},
                )
            found[name] = match
        return found

    def generate(self, request: BackendRequest) -> BackendResult:
        p = request.params
        require_capabilities(
            self.spec, request.params, request.style, capabilities=self._capabilities
        )
        # Both are placeholders every workflow must have, like charforge's own graph.
        sampler, scheduler = comfy_sampler(p.sampler, p.scheduler)
        self._check_name(sampler, p.sampler, "sampler_name", "sampler", request.style)
        self._check_name(scheduler, p.scheduler, "scheduler", "scheduler", request.style)
        loras = self.lora_files(p.prompt, request.style) if self._template is None else {}
        conditioning, identity = self.identity.plan(request)
        seeds = seeds_for(p.seed, request.count, pick=secrets.randbelow)
        deadline = time.monotonic() + self.spec.timeout
        tracker = Tracker(request.on_progress, request.count)
        active = Active(request.task_id, request.cancelled or threading.Event())
        images: list[GeneratedImage] = []
        reported: list[str | None] = []
        prompt_ids: list[str] = []
        with self.prompts.tracking(active):
            for index, seed in enumerate(seeds):
                run = _Run(request, index, seed, loras, conditioning, identity)
                prompt_id, entry, graph = self._run(run, tracker, deadline, active)
                conditioning, identity = run.conditioning, run.identity
                data, checkpoint = self.prompts.collect(
                    entry, graph, request.style, self._checkpoint_inputs
                )
                images.append(GeneratedImage(data, seed))
                reported.append(checkpoint)
                prompt_ids.append(prompt_id)
                tracker.finished()
        # One image made with another model must not hide behind the others.
        odd = [c for c in reported if c != request.checkpoint.title]
        info: dict[str, Any] = {"prompt_ids": prompt_ids, "seeds": [image.seed for image in images]}
        if p.hires and self._template is None:
            upscale = hires_upscale(p.hires_upscaler)
            info["hires_upscaler_used"] = upscale.label
            info["hires_upscaler_asked"] = p.hires_upscaler
        return BackendResult(
            images=images,
            checkpoint=odd[0] if odd else reported[0],
            checkpoint_hash=None,  # ComfyUI reports none
            info=info,
            identity=identity,
        )

    def _run(
        self, run: _Run, tracker: Tracker, deadline: float, active: Active
    ) -> tuple[str, dict[str, Any], Graph]:
        """One image's graph queued and followed. A reference ComfyUI lost since it was
        uploaded is uploaded again; IPAdapter nodes gone since they were listed mean going
        without them (or refusing, when identity was asked for explicitly)."""
        style = run.request.style
        for attempt in range(3):
            graph = self.graph(run.request, run.seed, run.loras, run.conditioning)
            tracker.start(run.index, sampling_passes(graph))
            try:
                prompt_id, entry = self.prompts.run(graph, style, tracker, deadline, active)
            except InputImageMissing:
                if run.conditioning is None or attempt > 0:
                    raise
                count = len(run.conditioning.names)  # a workflow's: the first only
                references = run.request.references[:count]
                names = self.identity.upload(references, style, again=True)
                run.conditioning = replace(run.conditioning, names=names)
                continue
            except NodeMissing as exc:
                own = run.conditioning is not None and run.conditioning.preset is not None
                if not own or exc.class_type not in IPADAPTER_NODES:
                    raise  # a user's workflow cannot run without its own nodes
                self.identity.forget()  # it was listed: the list is out of date
                why = f"ComfyUI has no {exc.class_type} node (ComfyUI_IPAdapter_plus)"
                run.identity = self.identity.without(run.request, why)
                run.conditioning = None
                continue
            return prompt_id, entry, graph
        raise AssertionError("unreachable: the last attempt returns or raises")

    # -- control ---------------------------------------------------------------------------

    def interrupt(self, task_id: str) -> bool:
        return self.prompts.interrupt(task_id)

    def loaded_checkpoint(self) -> str | None:
        return None  # ComfyUI does not say; the pool remembers what it last ran

    def probe(self) -> ProbeResult:
        started = time.perf_counter()
        try:
            checkpoints = self.list_checkpoints(timeout=self._probe_timeout)
        except Exception as exc:  # any failure means "does not answer properly"
            message = getattr(exc, "message", None) or str(exc) or type(exc).__name__
            return ProbeResult(False, None, message)
        latency = (time.perf_counter() - started) * 1000
        try:
            self.identity.forget()  # the probe is when the nodes are asked about again
            why = self.identity.lacking("realistic", timeout=self._probe_timeout)
            method = None if why else self.identity.method("realistic")
        except Exception as exc:  # /object_info failing is not ComfyUI failing
            log.warning("could not ask %s about its IPAdapter nodes: %s", self.spec.name, exc)
            return ProbeResult(True, latency, None, checkpoints, None)
        lacking = frozenset({Capability.REFERENCE_IMAGE}) if why else frozenset()
        return ProbeResult(
            True, latency, None, checkpoints, None, lacking=lacking, identity_method=method
        )
