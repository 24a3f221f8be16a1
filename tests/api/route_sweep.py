"""The app's route table as the calls tests/api/test_owner_sweep.py makes, read at run time.

Every route is classified as public (an explicit allow-list), admin-only, API or page. Every
path parameter, and every body or query field whose name says it holds an id, must name a kind
of owned resource listed here; a route this module cannot fill is reported as a problem (the
sweep fails with it), never skipped, so a new route cannot go unswept.
"""

from __future__ import annotations

import itertools
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Literal

from fastapi import FastAPI, params
from fastapi.routing import APIRoute, iter_route_contexts
from pydantic import BaseModel, TypeAdapter
from starlette.routing import Mount, Route

Kind = Literal[
    "character", "reference", "image", "job", "batch", "token", "user", "template", "preset"
]
Access = Literal["public", "admin", "api", "page"]
Owner = Literal["alice", "bob"]
BodyKind = Literal["none", "json", "form", "multipart", "raw"]

# Routes anyone may call, signed in or not. (HEAD, which Starlette adds to every GET of its
# own routes, is not swept: it is the GET without a body.)
PUBLIC_ROUTES: frozenset[tuple[str, str]] = frozenset(
    {
        ("GET", "/openapi.json"),
        ("GET", "/docs"),
        ("GET", "/docs/oauth2-redirect"),
        ("GET", "/redoc"),
        ("GET", "/api/health"),
        ("GET", "/healthz"),
        ("GET", "/readyz"),
        ("GET", "/metrics"),
        ("GET", "/"),
        ("GET", "/setup"),
        ("POST", "/setup"),
        ("GET", "/login"),
        ("POST", "/login"),
        ("POST", "/logout"),
    }
)
PUBLIC_MOUNTS: frozenset[str] = frozenset({"/static"})
# Administrators only: anyone else signed in gets 403 (or 404).
ADMIN_PATHS: frozenset[str] = frozenset({"/api/admin", "/admin"})
ADMIN_PREFIXES: tuple[str, ...] = ("/api/admin/", "/admin/")

# Which owned resource each path parameter names.
PATH_PARAMS: dict[str, Kind] = {
    "character_id": "character",
    "ref_id": "reference",
    "reference_id": "reference",
    "image_id": "image",
    "job_id": "job",
    "batch_id": "batch",
    "token_id": "token",
    "name": "user",  # /api/admin/users/{name}, /admin/users/{name}
    "template_id": "template",  # a user's own prompt template (built-in ones are everyone's)
    "preset_id": "preset",
}
# Which owned resource each JSON or form body field names (at any depth).
BODY_FIELDS: dict[str, Kind] = {
    "characterId": "character",
    "character_id": "character",  # page forms
    "imageId": "image",
    "templateId": "template",  # generate bodies and batch items: a prompt template
    "references": "reference",  # identity.references: ids of the character's references
    "ids": "image",  # POST /api/images/delete: the images to delete
}
# Query parameters naming an owned resource; filled with alice's ids (answers may be 2xx, as a
# filter or a preselection: they must not show any of alice's data).
QUERY_FIELDS: dict[str, Kind] = {"characterId": "character"}
# A field with such a name holds an id: it must be in BODY_FIELDS or QUERY_FIELDS.
ID_LIKE = re.compile(r"(^ids?$|_id$|Id$|_ids$|Ids$)")
# Values that make a body look like a real one (used where the schema has the field).
PLAUSIBLE: dict[str, str] = {
    "name": "Sweep by bob",
    "prompt": "a sweep",
    "appearance": "sweep look",
    "art_style": "anime",
    "label": "sweep",
}
HOW_TO_TEACH = (
    "Teach tests/api/route_sweep.py about it: a public route goes in PUBLIC_ROUTES, a path "
    "parameter naming an owned resource in PATH_PARAMS (and the resource in the sweep's "
    "fixtures), an id in a body or query in BODY_FIELDS / QUERY_FIELDS."
)

_PARAM = re.compile(r"{([^}:]+)(?::[^}]*)?}")
_RAW_TYPES = ("image/", "application/octet-stream")


@dataclass(frozen=True)
class Body:
    """One way to send the route a body: ``schema`` is a JSON schema with its ``$defs``."""

    kind: BodyKind
    schema: dict[str, Any] | None = None
    content_type: str = ""
    files: tuple[str, ...] = ()  # multipart: the fields that carry a file

    def kinds(self) -> set[Kind]:
        return set(_owned_fields(self.schema).values()) if self.schema else set()


@dataclass(frozen=True)
class Endpoint:
    method: str
    path: str
    access: Access
    path_params: tuple[tuple[str, Kind], ...] = ()
    query: tuple[tuple[str, Kind], ...] = ()
    bodies: tuple[Body, ...] = (Body("none"),)

    def __str__(self) -> str:
        return f"{self.method} {self.path}"


@dataclass
class Call:
    """One request: where, with what, and the text of everything it sent (a value the caller
    sent may come back in the answer without leaking anything)."""

    method: str
    url: str
    json_body: Any = None
    data: dict[str, str] | None = None
    files: dict[str, tuple[str, bytes, str]] | None = None
    content: bytes | None = None
    headers: dict[str, str] | None = None

    @property
    def sent(self) -> str:
        return " ".join([self.url, json.dumps(self.json_body), json.dumps(self.data)])


def plan(app: FastAPI) -> tuple[list[Endpoint], list[str]]:
    """Every (method, route) of the app, and the problems: routes the sweep cannot fill."""
    endpoints: list[Endpoint] = []
    problems: list[str] = []
    for context in iter_route_contexts(app.routes):
        route = context.original_route
        path = context.path or ""
        if isinstance(route, Mount):
            if path not in PUBLIC_MOUNTS:
                problems.append(f"mount {path}: not a known public mount. {HOW_TO_TEACH}")
            continue
        if isinstance(route, APIRoute):
            methods = sorted(context.methods or route.methods or [])
        elif isinstance(route, Route):
            methods = sorted(route.methods or [])
        else:
            problems.append(f"{type(route).__name__} {path}: not an HTTP route. {HOW_TO_TEACH}")
            continue
        for method in methods:
            if method == "HEAD":
                continue
            one, found = _endpoint(method, path, route)
            problems += found
            if one is not None:
                endpoints.append(one)
    return endpoints, problems


def _access(method: str, path: str) -> Access:
    if (method, path) in PUBLIC_ROUTES:
        return "public"
    if path in ADMIN_PATHS or path.startswith(ADMIN_PREFIXES):
        return "admin"
    return "api" if path.startswith("/api/") else "page"


def _endpoint(method: str, path: str, route: Any) -> tuple[Endpoint | None, list[str]]:
    where = f"{method} {path}"
    access = _access(method, path)
    if not isinstance(route, APIRoute):
        if access != "public":
            return None, [f"{where}: a plain Starlette route that is not public. {HOW_TO_TEACH}"]
        return Endpoint(method, path, access), []
    problems: list[str] = []
    path_params: list[tuple[str, Kind]] = []
    for name in _PARAM.findall(path):
        if name in PATH_PARAMS:
            path_params.append((name, PATH_PARAMS[name]))
        else:
            problems.append(f"{where}: path parameter {{{name}}} is not known. {HOW_TO_TEACH}")
    query: list[tuple[str, Kind]] = []
    for param in route.dependant.query_params:
        if param.alias in QUERY_FIELDS:
            query.append((param.alias, QUERY_FIELDS[param.alias]))
        elif ID_LIKE.search(param.alias):
            problems.append(f"{where}: query parameter {param.alias} is an id. {HOW_TO_TEACH}")
        elif param.field_info.is_required():
            problems.append(f"{where}: query parameter {param.alias} is required. {HOW_TO_TEACH}")
    bodies, found = _bodies(method, access, route)
    problems += [f"{where}: {p}" for p in found]
    for body in bodies:
        if body.schema is not None:
            problems += [f"{where}: {p}" for p in _unknown_ids(body.schema)]
    if access == "public" and (path_params or any(b.kinds() for b in bodies)):
        problems.append(f"{where}: a public route names an owned resource; is it public?")
    endpoint = Endpoint(method, path, access, tuple(path_params), tuple(query), tuple(bodies))
    return (endpoint if not problems else None), problems


def _bodies(method: str, access: Access, route: APIRoute) -> tuple[list[Body], list[str]]:
    body_params = route.dependant.body_params
    extra = ((route.openapi_extra or {}).get("requestBody") or {}).get("content") or {}
    if body_params:
        forms = [isinstance(p.field_info, params.Form) for p in body_params]
        if any(isinstance(p.field_info, params.File) for p in body_params):
            return [], ["a File parameter: the sweep sends no declared files yet."]
        if all(forms):
            return [Body("form", _params_schema(body_params, flatten=True))], []
        if not any(forms):
            return [Body("json", _params_schema(body_params, flatten=False))], []
        return [], ["a body mixing form and JSON parameters."]
    if extra:
        bodies: list[Body] = []
        problems: list[str] = []
        for content_type, media in extra.items():
            schema = media.get("schema") or {}
            if content_type == "application/json":
                bodies.append(Body("json", schema))
            elif content_type == "multipart/form-data":
                props = schema.get("properties") or {}
                files = tuple(n for n, s in props.items() if s.get("format") == "binary")
                rest = {n: s for n, s in props.items() if n not in files}
                required = [n for n in schema.get("required", []) if n in rest]
                form = {"type": "object", "properties": rest, "required": required}
                bodies.append(Body("multipart", form, files=files))
            elif content_type.startswith(_RAW_TYPES):
                bodies.append(Body("raw", content_type=content_type))
            else:
                problems.append(f"request content type {content_type} is not known.")
        return bodies, problems
    if access == "page" and method in ("POST", "PUT", "PATCH"):
        # Pages that read their form themselves (uploads): a form with a picture in 'file'.
        return [Body("multipart", {"type": "object", "properties": {}}, files=("file",))], []
    return [Body("none")], []


def _params_schema(body_params: list[Any], *, flatten: bool) -> dict[str, Any]:
    if len(body_params) == 1:
        param = body_params[0]
        annotation = param.field_info.annotation
        model = isinstance(annotation, type) and issubclass(annotation, BaseModel)
        embed = bool(getattr(param.field_info, "embed", False))
        if (flatten and model) or (not flatten and not embed):
            return TypeAdapter(annotation).json_schema(by_alias=True)
    properties: dict[str, Any] = {}
    defs: dict[str, Any] = {}
    for param in body_params:
        schema = TypeAdapter(param.field_info.annotation).json_schema(by_alias=True)
        defs.update(schema.pop("$defs", {}))
        properties[param.alias] = schema
    required = [p.alias for p in body_params if p.field_info.is_required()]
    return {"type": "object", "properties": properties, "required": required, "$defs": defs}


def _walk(
    schema: dict[str, Any], defs: dict[str, Any], seen: frozenset[str] = frozenset()
) -> Iterator[tuple[str, dict[str, Any]]]:
    """Every (property name, its schema) at any depth."""
    ref = schema.get("$ref")
    if isinstance(ref, str):
        name = ref.rsplit("/", 1)[-1]
        if name not in seen:
            yield from _walk(defs.get(name, {}), defs, seen | {name})
        return
    for option in schema.get("anyOf", []) + schema.get("oneOf", []) + schema.get("allOf", []):
        yield from _walk(option, defs, seen)
    if isinstance(schema.get("items"), dict):
        yield from _walk(schema["items"], defs, seen)
    for name, sub in (schema.get("properties") or {}).items():
        yield name, sub
        yield from _walk(sub, defs, seen)


def _owned_fields(schema: dict[str, Any]) -> dict[str, Kind]:
    defs = schema.get("$defs", {})
    return {name: BODY_FIELDS[name] for name, _ in _walk(schema, defs) if name in BODY_FIELDS}


def _unknown_ids(schema: dict[str, Any]) -> list[str]:
    defs = schema.get("$defs", {})
    return [
        f"body field {name} is an id. {HOW_TO_TEACH}"
        for name, _ in _walk(schema, defs)
        if name not in BODY_FIELDS and ID_LIKE.search(name)
    ]


def assignments(kinds: set[Kind]) -> list[dict[Kind, Owner]]:
    """Whose id goes in each slot: every mix with at least one of alice's, all-alice first."""
    order = sorted(kinds)
    out: list[dict[Kind, Owner]] = []
    both: tuple[Owner, Owner] = ("alice", "bob")
    for owners in itertools.product(both, repeat=len(order)):
        if order and "alice" not in owners:
            continue
        out.append(dict(zip(order, owners, strict=True)))
    return out


def fill(schema: dict[str, Any], defs: dict[str, Any], values: dict[Kind, str]) -> Any:
    """A small valid-looking instance: required fields, plausible ones, and every field (at any
    depth) that names an owned resource, set to ``values``."""
    ref = schema.get("$ref")
    if isinstance(ref, str):
        return fill(defs.get(ref.rsplit("/", 1)[-1], {}), defs, values)
    options = schema.get("anyOf") or schema.get("oneOf") or schema.get("allOf")
    if options:
        chosen = [o for o in options if o.get("type") != "null"] or options
        owned = [o for o in chosen if _owned_in(o, defs)]
        return fill((owned or chosen)[0], defs, values)
    if "enum" in schema:
        return schema["enum"][0]
    if "const" in schema:
        return schema["const"]
    kind = schema.get("type")
    if kind == "object" or "properties" in schema:
        out: dict[str, Any] = {}
        required = set(schema.get("required", []))
        for name, sub in (schema.get("properties") or {}).items():
            if name in BODY_FIELDS:
                value = values[BODY_FIELDS[name]]
                out[name] = [value] if _is_array(sub, defs) else value
            elif name in PLAUSIBLE and _takes_string(sub, defs):
                out[name] = PLAUSIBLE[name]
            elif name in required or _owned_in(sub, defs):
                out[name] = fill(sub, defs, values)
        return out
    if kind == "array":
        items = schema.get("items") or {"type": "string"}
        return [fill(items, defs, values) for _ in range(int(schema.get("minItems", 0)))]
    if kind == "string":
        text = "sweep-value"
        text = text * (1 + int(schema.get("minLength", 0)) // len(text))
        return text[: int(schema.get("maxLength", len(text)))]
    if kind == "integer":
        return int(schema.get("minimum", 1))
    if kind == "number":
        return float(schema.get("minimum", 1.0))
    if kind == "boolean":
        return False
    return None


def _resolve(schema: dict[str, Any], defs: dict[str, Any]) -> dict[str, Any]:
    ref = schema.get("$ref")
    if isinstance(ref, str):
        return _resolve(defs.get(ref.rsplit("/", 1)[-1], {}), defs)
    return schema


def _types(schema: dict[str, Any], defs: dict[str, Any]) -> set[str]:
    schema = _resolve(schema, defs)
    options = schema.get("anyOf") or schema.get("oneOf") or [schema]
    return {str(_resolve(o, defs).get("type")) for o in options}


def _is_array(schema: dict[str, Any], defs: dict[str, Any]) -> bool:
    return "array" in _types(schema, defs)


def _takes_string(schema: dict[str, Any], defs: dict[str, Any]) -> bool:
    return "string" in _types(schema, defs)


def _owned_in(schema: dict[str, Any], defs: dict[str, Any]) -> bool:
    return any(name in BODY_FIELDS for name, _ in _walk(schema, defs))


def build(
    endpoint: Endpoint,
    body: Body,
    values: dict[Kind, str],
    *,
    csrf: str | None,
    photo: bytes,
) -> Call:
    """The request for ``endpoint`` with ``values`` in every owned slot (path, query, body).
    Pages get the session's CSRF token (form field and header), as their own forms send it."""
    url = endpoint.path
    for name, kind in endpoint.path_params:
        url = re.sub(r"{" + re.escape(name) + r"(:[^}]*)?}", values[kind], url)
    if endpoint.query:
        url += "?" + "&".join(f"{name}={values[kind]}" for name, kind in endpoint.query)
    page = endpoint.access == "page" or (
        endpoint.access in ("admin", "public") and not endpoint.path.startswith("/api/")
    )
    headers = {"Accept": "text/html"} if page else {}
    if page and csrf is not None and endpoint.method != "GET":
        headers["X-CSRF-Token"] = csrf
    call = Call(endpoint.method, url, headers=headers)
    defs = (body.schema or {}).get("$defs", {})
    if body.kind == "json":
        call.json_body = fill(body.schema or {}, defs, values)
        headers["Accept"] = "application/json"
    elif body.kind in ("form", "multipart"):
        filled = fill(body.schema or {}, defs, values)
        data = {k: _form_value(v) for k, v in filled.items() if k not in body.files}
        if page and csrf is not None:
            data["csrf_token"] = csrf
        call.data = data
        if body.kind == "multipart":
            call.files = dict.fromkeys(body.files, ("face.png", photo, "image/png"))
    elif body.kind == "raw":
        call.content = photo
        headers["Content-Type"] = body.content_type
    return call


def _form_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else ""
    if isinstance(value, list):
        return ",".join(str(v) for v in value)
    return "" if value is None else str(value)
