"""Two users against every route of the app's route table, old and new (issue 12).

alice owns one of everything (a character, a finished job with its image, a reference image, an
API token); bob owns the same. Read at run time from the app's routes, every route is called:

- by bob with alice's ids in every slot naming an owned resource (path and body; mixed with
  bob's own where a route names two): refused with 404 (403 on admin-only routes), never
  2xx, 3xx or 500, answered exactly as for an id that does not exist, and nothing of alice's
  in the answer. GET routes answer bob's own ids with a 2xx, so the 404s mean "not yours";
- by bob on routes naming nothing owned: no 500, none of alice's data in the answer;
- anonymously: 401 (API) or a redirect to sign-in (pages), unless allow-listed as public.

Afterwards alice's things are all still there, unchanged. A route the sweep cannot fill (an
unknown path parameter, an id in a body it does not know, a non-public route it cannot
classify) fails the sweep: see tests/api/route_sweep.py.
"""

from __future__ import annotations

import difflib
import hashlib
import re
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from fastapi import FastAPI

from charforge.api.app import create_app
from charforge.container import Container, build_container
from charforge.db.models import new_id
from charforge.services import audit, permissions, users
from charforge.simulator import A1111Simulator
from tests.api import route_sweep as rs
from tests.conftest import Live, make_settings
from tests.jobs.conftest import submit, wait_final
from tests.photos import astronaut_png, kafka_png, transformed

HTML = {"Accept": "text/html"}
_CSRF = re.compile(r'name="csrf_token" value="([^"]+)"')


@dataclass
class Person:
    """A user's clients (API token, signed-in browser session) and the ids of what they own."""

    name: str
    api: httpx.Client
    web: httpx.Client
    csrf: str
    ids: dict[rs.Kind, str]
    # Strings only this person's data holds, by what they are (for the leak check).
    secrets: dict[str, str] = field(default_factory=dict)
    files: list[bytes] = field(default_factory=list)


def csrf_of(client: httpx.Client, path: str) -> str:
    page = client.get(path, headers=HTML)
    match = _CSRF.search(page.text)
    assert match, (path, page.status_code, page.text[:300])
    return match.group(1)


def person(live: Live, name: str, photo: bytes) -> Person:
    api = live.user(name)
    marker = f"{name}-{uuid.uuid4().hex[:10]}"
    created = api.post(
        "/api/characters",
        json={
            "name": f"Name-{marker}",
            "description": f"description-{marker}",
            "appearance": f"appearance-{marker}",
            "negativePrompt": f"negative-{marker}",
            "artStyle": {"primaryStyle": "anime"},
        },
    )
    assert created.status_code == 201, created.text
    character = created.json()
    job = wait_final(api, submit(api, character["id"], prompt=f"prompt-{marker}")["id"])
    assert job["state"] == "succeeded", job
    image_id = job["images"][0]["id"]
    batch = api.post(
        "/api/batches",
        json={"characterId": character["id"], "items": [{"prompt": f"batch-{marker}"}]},
    )
    assert batch.status_code == 202, batch.text
    added = api.post(
        f"/api/characters/{character['id']}/references", files={"file": ("face.png", photo)}
    )
    assert added.status_code == 201, added.text
    reference = added.json()
    template = api.post(
        "/api/prompt-templates",
        json={"name": f"template-{marker}", "prompt": f"{{character}} in template-{marker}"},
    )
    assert template.status_code == 201, template.text
    preset = api.post("/api/presets", json={"name": f"preset-{marker}", "params": {"steps": 7}})
    assert preset.status_code == 201, preset.text
    with live.container.db.session() as session:
        token = users.list_tokens(session, users.require_user(session, name))[0]
        token_id, token_prefix = token.id, token.prefix
    web = live.anonymous()
    signed_in = web.post(
        "/login",
        data={
            "name": name,
            "password": "password-" + name,
            "csrf_token": csrf_of(web, "/login"),
            "next": "/characters",
        },
    )
    assert signed_in.status_code == 303, signed_in.text
    ids: dict[rs.Kind, str] = {
        "character": character["id"],
        "reference": reference["id"],
        "image": image_id,
        "job": job["id"],
        "batch": batch.json()["id"],
        "token": str(token_id),
        "user": name,
        "template": template.json()["id"],
        "preset": preset.json()["id"],
    }
    secrets = {
        **{f"{name}'s {k} id": v for k, v in ids.items() if k not in ("token", "user")},
        f"{name}'s user name": name,
        f"{name}'s token": live.tokens[name],
        f"{name}'s token prefix": token_prefix,
        f"{name}'s character name": character["name"],
        f"{name}'s description": character["description"],
        f"{name}'s appearance": character["appearance"],
        f"{name}'s negative prompt": character["negativePrompt"],
        f"{name}'s prompt": f"prompt-{marker}",
        f"{name}'s reference sha256": reference["sha256"],
        f"{name}'s template": f"template-{marker}",
        f"{name}'s preset": f"preset-{marker}",
    }
    files = [api.get(f"/api/images/{image_id}/file").content, api.get(reference["url"]).content]
    return Person(name, api, web, csrf_of(web, "/account"), ids, secrets, files)


def fake_ids() -> dict[rs.Kind, str]:
    """Ids of the same shape that name nothing."""
    return {
        "character": new_id(),
        "reference": new_id(),
        "image": new_id(),
        "job": new_id(),
        "batch": new_id(),
        "token": "987654321",
        "user": f"nobody-{uuid.uuid4().hex[:8]}",
        "template": new_id(),
        "preset": new_id(),
    }


def leaks(response: httpx.Response, alice: Person, call: rs.Call) -> list[str]:
    """What of alice's is in the answer (body or headers) that the caller did not send."""
    blob = (
        response.content
        + b"\n"
        + b"\n".join(f"{k}: {v}".encode() for k, v in response.headers.items())
    )
    found = [
        what
        for what, secret in alice.secrets.items()
        if secret not in call.sent and secret.encode() in blob
    ]
    found += ["one of alice's files"] * any(f in response.content for f in alice.files)
    return found


def send(client: httpx.Client, call: rs.Call) -> httpx.Response:
    return client.request(
        call.method,
        call.url,
        json=call.json_body,
        data=call.data,
        files=call.files,
        content=call.content,
        headers=call.headers,
    )


_TOKENS = re.compile(r"[\w-]+|[^\w-]")


def same_but_ids(
    a: httpx.Response, a_values: dict[rs.Kind, str], b: httpx.Response, b_values: dict[rs.Kind, str]
) -> bool:
    """The two answers differ only where one names an id and the other the same kind's id."""
    a_tokens, b_tokens = _TOKENS.findall(a.text), _TOKENS.findall(b.text)
    matcher = difflib.SequenceMatcher(a=a_tokens, b=b_tokens, autojunk=False)
    for op, a1, a2, b1, b2 in matcher.get_opcodes():
        if op != "equal" and _placeholders("".join(a_tokens[a1:a2]), a_values) != _placeholders(
            "".join(b_tokens[b1:b2]), b_values
        ):
            return False
    return True


def _placeholders(text: str, values: dict[rs.Kind, str]) -> str:
    for kind, value in sorted(values.items(), key=lambda kv: -len(kv[1])):
        text = text.replace(value, f"<{kind}>")
    return text


def app_of(live: Live) -> FastAPI:
    """The served app's route table: live_factory serves create_app(container); the same call
    on the same container gives the same routes (nothing is started or closed by it)."""
    app: FastAPI = create_app(live.container, manage_lifecycle=False)
    return app


def snapshot(live: Live, alice: Person) -> dict[str, Any]:
    """Everything of alice's, as she reads it (and what only the database shows)."""
    api, ids = alice.api, alice.ids
    character = f"/api/characters/{ids['character']}"

    def read(path: str) -> Any:
        response = api.get(path)
        assert response.status_code == 200, (path, response.text)
        if response.headers["content-type"].startswith("application/json"):
            return response.json()
        return hashlib.sha256(response.content).hexdigest()

    out = {
        path: read(path)
        for path in (
            "/api/characters",
            character,
            f"{character}/references",
            f"{character}/references/{ids['reference']}",
            f"{character}/references/{ids['reference']}/file",
            f"{character}/images",
            f"/api/images/{ids['image']}",
            f"/api/images/{ids['image']}/file",
            f"/api/jobs/{ids['job']}",
            "/api/jobs",
            f"/api/batches/{ids['batch']}",
            "/api/prompt-templates",
            f"/api/prompt-templates/{ids['template']}",
            "/api/presets",
            f"/api/presets/{ids['preset']}",
        )
    }
    with live.container.db.session() as session:
        user = users.require_user(session, alice.name)
        out["tokens"] = [(t.id, t.revoked_at) for t in users.list_tokens(session, user)]
        out["permissions"] = permissions.view(user)
        out["audit"] = [e.id for e in audit.page(session, 200, None)[0]]
    return out


@dataclass
class Sweep:
    alice: Person
    bob: Person
    anonymous: httpx.Client
    anonymous_csrf: str
    photo: bytes
    failures: list[str] = field(default_factory=list)
    refused_422: list[str] = field(default_factory=list)
    calls: int = 0

    def fail(self, endpoint: rs.Endpoint, call: rs.Call, who: str, why: str) -> None:
        self.failures.append(f"{endpoint} as {who} ({call.method} {call.url}): {why}")

    def check_leaks(
        self, endpoint: rs.Endpoint, call: rs.Call, who: str, r: httpx.Response
    ) -> None:
        found = leaks(r, self.alice, call)
        if found:
            self.fail(endpoint, call, who, f"{r.status_code} shows {', '.join(found)}")
        if r.status_code >= 500:
            self.fail(endpoint, call, who, f"{r.status_code}: {r.text[:300]}")

    def bob_client(self, endpoint: rs.Endpoint) -> httpx.Client:
        return self.bob.api if endpoint.path.startswith("/api/") else self.bob.web

    def values(self, owners: dict[rs.Kind, rs.Owner]) -> dict[rs.Kind, str]:
        people = {"alice": self.alice, "bob": self.bob}
        base = dict(self.alice.ids)  # query slots: always alice's
        base.update({kind: people[owner].ids[kind] for kind, owner in owners.items()})
        return base

    def run(self, endpoint: rs.Endpoint) -> None:
        for body in endpoint.bodies:
            if endpoint.access == "public":
                self.public(endpoint, body)
            else:
                self.anonymously(endpoint, body)
                self.as_bob(endpoint, body)

    def call(self, client: httpx.Client, call: rs.Call) -> httpx.Response:
        self.calls += 1
        return send(client, call)

    def public(self, endpoint: rs.Endpoint, body: rs.Body) -> None:
        call = rs.build(endpoint, body, self.alice.ids, csrf=self.anonymous_csrf, photo=self.photo)
        self.check_leaks(endpoint, call, "anonymous", self.call(self.anonymous, call))
        if endpoint.method == "GET":  # bob's session must outlive the sweep: no POST /logout
            mine = rs.build(endpoint, body, self.alice.ids, csrf=self.bob.csrf, photo=self.photo)
            self.check_leaks(endpoint, mine, "bob", self.call(self.bob_client(endpoint), mine))

    def anonymously(self, endpoint: rs.Endpoint, body: rs.Body) -> None:
        call = rs.build(endpoint, body, self.alice.ids, csrf=self.anonymous_csrf, photo=self.photo)
        r = self.call(self.anonymous, call)
        self.check_leaks(endpoint, call, "anonymous", r)
        if endpoint.path.startswith("/api/"):
            ok = r.status_code == 401 and r.json()["error"]["code"] == "unauthorized"
        else:  # pages redirect to sign-in; the pages' script endpoints answer 401
            location = r.headers.get("location", "")
            ok = (r.status_code == 303 and location.startswith("/login")) or r.status_code == 401
        if not ok:
            self.fail(
                endpoint,
                call,
                "anonymous",
                f"{r.status_code}, wanted 401 or a redirect to sign-in (a route meant for "
                "everyone goes in route_sweep.PUBLIC_ROUTES)",
            )

    def as_bob(self, endpoint: rs.Endpoint, body: rs.Body) -> None:
        client = self.bob_client(endpoint)
        kinds = {kind for _, kind in endpoint.path_params} | body.kinds()
        for owners in rs.assignments(kinds):
            call = rs.build(
                endpoint, body, self.values(owners), csrf=self.bob.csrf, photo=self.photo
            )
            r = self.call(client, call)
            self.check_leaks(endpoint, call, "bob", r)
            status = r.status_code
            if r.headers.get("location", "").startswith("/login"):
                self.fail(endpoint, call, "bob", "bob's session was lost: the sweep is void")
            elif endpoint.access == "admin":
                if status not in (403, 404):
                    self.fail(endpoint, call, "bob", f"{status} on an admin route, wanted 403")
            elif owners:
                if status == 422:
                    self.refused_422.append(f"{endpoint} {owners}: {r.text[:200]}")
                elif status != 404:
                    self.fail(endpoint, call, "bob", f"{status} with {owners}: {r.text[:200]}")
                    continue
                self.same_as_missing(endpoint, body, owners, call, r)
            elif status in (401, 403):
                self.fail(endpoint, call, "bob", f"{status}: bob is signed in: {r.text[:200]}")
        if kinds and endpoint.method == "GET" and endpoint.access != "admin":
            # The control: with bob's own ids the same route answers, so the 404s above are
            # about whose ids they are (not a mistyped route or a broken session).
            values = {kind: self.bob.ids[kind] for kind in kinds}
            own = rs.build(endpoint, body, self.values({}) | values, csrf=None, photo=self.photo)
            r = self.call(client, own)
            if not 200 <= r.status_code < 300:
                self.fail(
                    endpoint, own, "bob", f"{r.status_code} for bob's own ids: {r.text[:200]}"
                )

    def same_as_missing(
        self,
        endpoint: rs.Endpoint,
        body: rs.Body,
        owners: dict[rs.Kind, rs.Owner],
        call: rs.Call,
        r: httpx.Response,
    ) -> None:
        """alice's ids must be answered as ids that name nothing (no existence oracle)."""
        missing = fake_ids()
        values = self.values(owners)
        twin_values = dict(values)
        for kind, owner in owners.items():
            if owner == "alice":
                twin_values[kind] = missing[kind]
        twin = rs.build(endpoint, body, twin_values, csrf=self.bob.csrf, photo=self.photo)
        t = self.call(self.bob_client(endpoint), twin)
        if t.status_code != r.status_code or not same_but_ids(r, values, t, twin_values):
            self.fail(
                endpoint,
                call,
                "bob",
                f"alice's ids answer {r.status_code} {r.text[:200]!r}, ids that name nothing "
                f"{t.status_code} {t.text[:200]!r}",
            )


def test_the_sweep_knows_every_route(
    tmp_path: Path, sims: tuple[A1111Simulator, A1111Simulator]
) -> None:
    """Fails, naming the route, when a route is added that the sweep cannot fill."""
    settings = make_settings(
        tmp_path / "data", f"sqlite:///{tmp_path / 'plan.db'}", sims[0].url, sims[1].url
    )
    container: Container = build_container(settings)
    try:
        endpoints, problems = rs.plan(create_app(container, manage_lifecycle=False))
    finally:
        container.close()
    assert not problems, "\n".join(problems)
    by_access = {
        a: [e for e in endpoints if e.access == a] for a in ("public", "admin", "api", "page")
    }
    assert all(by_access.values()), {a: len(e) for a, e in by_access.items()}
    # The sweep reads the real table: the oldest owned routes are in it.
    paths = {str(e) for e in endpoints}
    assert {"GET /api/characters/{character_id}", "GET /images/{image_id}/file"} <= paths


def test_bob_cannot_reach_anything_of_alices_on_any_route(live: Live) -> None:
    started = time.monotonic()
    endpoints, problems = rs.plan(app_of(live))
    assert not problems, "\n".join(problems)
    alice = person(live, "alice", astronaut_png())
    bob = person(live, "bob", kafka_png())
    anonymous = live.anonymous()
    sweep = Sweep(
        alice,
        bob,
        anonymous,
        csrf_of(anonymous, "/login"),
        # A face that neither has yet: a missing owner check would add it (201), not 409.
        transformed(astronaut_png(), mirror=True),
    )
    before = snapshot(live, alice)
    # Public routes last: POST /logout ends the anonymous session the others use.
    for endpoint in sorted(endpoints, key=lambda e: (e.access == "public", e.method != "GET")):
        sweep.run(endpoint)
    assert not sweep.failures, f"{len(sweep.failures)} failure(s):\n" + "\n".join(sweep.failures)
    after = snapshot(live, alice)
    assert after == before, "alice's data changed; 422s before the owner check:\n" + "\n".join(
        sweep.refused_422
    )
    # bob's session lasted the whole sweep (a lost one would have made every page a redirect).
    assert bob.web.get("/account", headers=HTML).status_code == 200
    counts = {a: sum(e.access == a for e in endpoints) for a in ("api", "page", "admin", "public")}
    owned = sum(bool(e.path_params) for e in endpoints)
    print(
        f"{len(endpoints)} endpoints {counts}, {owned} with an owned path parameter; "
        f"{sweep.calls} calls in {time.monotonic() - started:.1f}s; 422 before the owner "
        f"check: {sweep.refused_422}"
    )
