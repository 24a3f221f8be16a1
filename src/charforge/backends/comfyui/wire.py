"""What ComfyUI answers, read into charforge's terms: a refused prompt (``POST /prompt``'s
400), a failed run (``execution_error`` / ``execution_interrupted``), and a history entry's
saved image and the checkpoint that ran (read in ComfyUI's server.py and execution.py).

- a 400 is ``{"error": {type, message, details, extra_info}, "node_errors": {node_id:
  {"errors": [{type, message, details, extra_info: {input_name, received_value}}],
  "class_type"}}}``: an unknown checkpoint is a ``value_not_in_list`` error on ``ckpt_name``,
  an unknown node class the graph-wide ``invalid_prompt`` "Cannot execute because node X does
  not exist.", and a ``LoadImage`` file missing from the input folder a
  ``custom_validation_failed`` "Invalid image file: NAME" (its ``VALIDATE_INPUTS`` replaces
  the combo check);
- the history entry's ``prompt`` is ``[number, prompt_id, graph, extra_data, outputs]``: the
  graph that ran, so the checkpoint reported is read from there; a failed one has ``status:
  {status_str: "error", messages: [[event, data], ...]}``.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from typing import Any

from charforge.backends.comfyui.client import short
from charforge.backends.comfyui.graph import Graph, checkpoints_in
from charforge.backends.transport import capitalized, out_of_memory
from charforge.errors import BackendBadResponse, BackendError, BackendRejected, CheckpointMissing

_NO_SUCH_NODE = re.compile(r"node (\S+) does not exist")
_INVALID_IMAGE = re.compile(r"Invalid image file: (.+)$")


class NodeMissing(BackendRejected):
    """ComfyUI refused the graph: it has no node class ``class_type`` (a node pack missing)."""

    def __init__(self, message: str, class_type: str, **kwargs: Any) -> None:
        super().__init__(message, **kwargs)
        self.class_type = class_type


class InputImageMissing(BackendRejected):
    """ComfyUI refused the graph: ``LoadImage`` names files its input folder does not have."""

    def __init__(self, message: str, names: list[str], **kwargs: Any) -> None:
        super().__init__(message, **kwargs)
        self.names = names


def validation_errors(body: Any) -> Iterator[tuple[str, dict[str, Any]]]:
    """``(node_id, error)`` from a 400's ``node_errors``; each error has the node's class_type."""
    node_errors = body.get("node_errors") if isinstance(body, dict) else None
    for node_id, info in (node_errors if isinstance(node_errors, dict) else {}).items():
        errors = info.get("errors") if isinstance(info, dict) else None
        for error in errors if isinstance(errors, list) else []:
            if isinstance(error, dict):
                yield str(node_id), {"class_type": info.get("class_type"), **error}


def refusal(
    body: Any,
    graph: Graph,
    *,
    where: str,
    backend: str,
    style: str,
    checkpoint_refused: Callable[[str, str], str],
) -> BackendError:
    """ComfyUI's 400 as the error a user can act on. ``checkpoint_refused(name, style)`` is
    told of a checkpoint ComfyUI does not have, and answers the hint."""
    problems: list[str] = []
    images: list[str] = []
    for node_id, error in validation_errors(body):
        extra = error.get("extra_info")
        extra = extra if isinstance(extra, dict) else {}
        name = extra.get("input_name")
        if error.get("type") == "value_not_in_list" and name == "ckpt_name":
            checkpoint = str(extra.get("received_value", "?"))
            return CheckpointMissing(
                f"Checkpoint '{checkpoint}' for the {style} style is not on ComfyUI backend "
                f"'{backend}': ComfyUI refused the prompt "
                f"({short(error.get('details', ''))}).",
                hint=checkpoint_refused(checkpoint, style),
            )
        class_type = error.get("class_type") or graph.get(node_id, {}).get("class_type")
        detail = error.get("details")
        missing = _INVALID_IMAGE.search(str(detail or ""))
        if class_type == "LoadImage" and missing is not None:
            images.append(missing.group(1).strip())
        what = f"{class_type} (node {node_id})" + (f" input {name}" if name else "")
        problems.append(
            f"{what}: {error.get('message', 'invalid')}" + (f" ({detail})" if detail else "")
        )
    unknown = None
    if not problems:  # a graph-wide error: unknown node type, no output node
        top = body.get("error") if isinstance(body, dict) else body
        if isinstance(top, dict):
            detail = top.get("details")
            top = str(top.get("message", "invalid prompt")) + (f": {detail}" if detail else "")
        problems.append(str(top))
        unknown = _NO_SUCH_NODE.search(str(top))
    message = f"{capitalized(where)} refused the prompt: {short('; '.join(problems), 600)}"
    hint = (
        "This is ComfyUI's own validation message: a missing model or LoRA file goes "
        "into ComfyUI's models folder; a custom workflow may need its nodes installed."
    )
    # The same graph is refused the same way every time.
    if unknown is not None:
        return NodeMissing(message, unknown.group(1), hint=hint, retriable=False)
    if images and len(images) == len(problems):
        return InputImageMissing(message, images, hint=hint, retriable=False)
    return BackendRejected(message, hint=hint, retriable=False)


def failure(kind: str, data: dict[str, Any], where: str) -> BackendRejected:
    """An ``execution_error`` or ``execution_interrupted`` event's data as an error."""
    node = f"node {data.get('node_id', '?')} ({data.get('node_type', '?')})"
    if kind == "execution_interrupted":
        return BackendRejected(
            f"The generation on {where} was interrupted at {node}.",
            hint="Someone or something interrupted ComfyUI; the job is tried again.",
            retriable=True,
        )
    exception = f"{data.get('exception_type', 'error')}: {data.get('exception_message', '')}"
    # Out of GPU memory passes, or another backend has more; any other node error would
    # fail the same way again.
    oom = out_of_memory(exception)
    return BackendRejected(
        f"{capitalized(where)} failed while running {node}: {short(exception)}",
        hint=(
            "ComfyUI ran out of GPU memory: lower width/height or turn hires off."
            if oom
            else "This is ComfyUI's own error; its console shows the traceback."
        ),
        retriable=oom,
    )


def raise_if_failed(entry: dict[str, Any], where: str) -> None:
    """A history entry of a failed prompt (seen when polling) raises what the websocket
    would have said: its status keeps the execution_error / _interrupted message."""
    status = entry.get("status")
    if not isinstance(status, dict) or status.get("status_str") != "error":
        return
    for message in status.get("messages") or []:
        kind, data = message if isinstance(message, list) and len(message) == 2 else (0, 0)
        if kind in ("execution_error", "execution_interrupted") and isinstance(data, dict):
            raise failure(kind, data, where)
    raise BackendRejected(f"{capitalized(where)} reported an error without details.")


def _images(output: Any) -> list[Any]:
    images = output.get("images") if isinstance(output, dict) else None
    return images if isinstance(images, list) else []


def saved_image(entry: dict[str, Any], graph: Graph, where: str) -> tuple[dict[str, Any], Graph]:
    """The first output file of a finished prompt's history entry (a SaveImage node's
    first), and the graph that ran."""
    raise_if_failed(entry, where)
    item = entry.get("prompt")
    ran = item[2] if isinstance(item, list) and len(item) > 2 else None
    ran_graph: Graph = ran if isinstance(ran, dict) else {}
    outputs = entry.get("outputs") if isinstance(entry.get("outputs"), dict) else {}
    assert isinstance(outputs, dict)
    saves = [
        node_id
        for node_id, node in (ran_graph or graph).items()
        if isinstance(node, dict) and node.get("class_type") == "SaveImage"
    ]
    files = [
        image
        for node_id in saves + sorted(set(outputs) - set(saves))  # SaveImage first
        for image in _images(outputs.get(node_id))
        if isinstance(image, dict) and image.get("type", "output") == "output"
    ]
    if not files:
        raise BackendBadResponse(f"{capitalized(where)} finished the prompt but saved no image.")
    return files[0], ran_graph


def ran_checkpoint(ran: Graph, checkpoint_inputs: list[tuple[str, str]]) -> str | None:
    """The checkpoint the graph that ran loaded: where its template names it, else any."""
    for node_id, name in checkpoint_inputs:
        node = ran.get(node_id)
        inputs = node.get("inputs") if isinstance(node, dict) else None
        value = inputs.get(name) if isinstance(inputs, dict) else None
        if isinstance(value, str):
            return value
    found = checkpoints_in(ran)
    return found[0] if found else None
