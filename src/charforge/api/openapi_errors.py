"""Every answer an operation can give, in the OpenAPI document: FastAPI lists only the success
and its own 422, so the error statuses (and their one envelope) are added here, from what each
operation is: signed in or not, with ids in its path, with a body, running a generation."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel, ConfigDict


class ErrorBody(BaseModel):
    model_config = ConfigDict(extra="allow")  # validation adds details, failures jobId, ...
    code: str
    message: str
    field: str | None = None
    hint: str | None = None


class ErrorEnvelope(BaseModel):
    error: ErrorBody


_WHY = {
    "400": "The body cannot be parsed (not UTF-8 JSON, a broken multipart form)",
    "401": "No API token, or an unknown or revoked one",
    "403": "Signed in, but not allowed (an administrator's route, a permission)",
    "404": "No such id among yours",
    "409": "The request contradicts the stored state (style_mismatch, a duplicate, a finished job)",
    "413": "The body is over its limit",
    "422": "A field is missing, out of range or not allowed; `field` names it",
    "429": "A quota or throttle; Retry-After says when to try again",
    "500": "An internal error (nothing about it is shown)",
    "502": "The backend failed or answered badly",
    "503": "No backend has the checkpoint, or a needed service is down",
    "504": "The backend did not answer in time",
}
# Operations that run a generation (or cancel one): the backend's failures reach the client.
_GENERATION = ("/api/image-generation/generate", "/api/jobs")


def _statuses(path: str, method: str, op: dict[str, Any]) -> set[str]:
    found = {"500"}
    params = {p.get("in") for p in op.get("parameters", [])}
    signed_in = bool(op.get("security")) or path.startswith("/api/admin")
    if signed_in:
        found.add("401")
    if path.startswith("/api/admin"):
        found.add("403")
    if "path" in params:
        found.add("404")
    if "requestBody" in op or params:
        found.add("422")
    if "requestBody" in op:
        found |= {"400", "413"}
    if method in ("post", "patch") and signed_in:
        found.add("409")
    if path in _GENERATION and method == "post":
        found |= {"403", "404", "429", "502", "503", "504"}
    return found


def install_error_docs(app: FastAPI) -> None:
    def openapi() -> dict[str, Any]:
        if app.openapi_schema is not None:
            return app.openapi_schema
        schema = get_openapi(
            title=app.title,
            version=app.version,
            description=app.description,
            routes=app.routes,
        )
        components = schema.setdefault("components", {}).setdefault("schemas", {})
        components["ErrorEnvelope"] = ErrorEnvelope.model_json_schema(
            ref_template="#/components/schemas/{model}"
        )
        body_schema = components["ErrorEnvelope"].pop("$defs", {})
        components.update(body_schema)
        ref = {"$ref": "#/components/schemas/ErrorEnvelope"}
        for path, operations in schema.get("paths", {}).items():
            for method, op in operations.items():
                responses = op.setdefault("responses", {})
                for status in sorted(_statuses(path, method, op)):
                    if status == "422" and status in responses:
                        # FastAPI's own 422 schema is not what charforge answers.
                        responses[status]["content"] = {"application/json": {"schema": ref}}
                        continue
                    responses.setdefault(
                        status,
                        {
                            "description": _WHY[status],
                            "content": {"application/json": {"schema": ref}},
                        },
                    )
        app.openapi_schema = schema
        return schema

    app.openapi = openapi  # type: ignore[method-assign]
