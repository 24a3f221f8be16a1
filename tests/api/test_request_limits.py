"""Requests cannot hurt the server: bodies bounded before they are read, text a database cannot
hold refused by field, the character's name checked, CSP on pages, nosniff on answers."""

from __future__ import annotations

import json
import tracemalloc
from collections.abc import Iterator
from typing import Any

import httpx

from charforge.api.limits import UPLOAD_MAX_BYTES
from charforge.simulator import A1111Simulator
from charforge.web.app import DOCS_CSP, PAGE_CSP
from tests.api.test_generate import create, generate
from tests.conftest import Live
from tests.jobs.conftest import wait_final

MB = 1024 * 1024


def _json_stream(total: int, chunk: int = 64 * 1024) -> Iterator[bytes]:
    """A JSON object of ``total`` bytes, made as it is sent (httpx sends it chunked)."""
    yield b'{"name": "x", "appearance": "'
    sent = 0
    while sent < total:
        yield b"a" * chunk
        sent += chunk
    yield b'"}'


def _post_measured(
    client: httpx.Client, url: str, **kwargs: Any
) -> tuple[httpx.Response | None, int]:
    """The answer (None: the server closed before the client had sent everything) and the
    peak of memory allocated meanwhile, the in-process server's included."""
    tracemalloc.start()
    try:
        try:
            response: httpx.Response | None = client.post(url, **kwargs)
        except (httpx.WriteError, httpx.RemoteProtocolError, httpx.ReadError):
            response = None
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    return response, peak


def _assert_too_large(response: httpx.Response, limit: int, setting: str | None) -> None:
    assert response.status_code == 413, response.text
    error = response.json()["error"]
    assert error["code"] == "payload_too_large"
    assert error["limit"] == limit
    assert str(limit) in error["message"]
    assert error.get("setting") == setting
    if setting:
        assert setting in error["hint"]
    assert response.headers["x-content-type-options"] == "nosniff"


def test_json_body_over_the_limit_by_its_length(live: Live) -> None:
    alice = live.user("alice")
    body = json.dumps({"name": "Big", "appearance": "a" * (2 * MB)}).encode()
    response = alice.post(
        "/api/characters", content=body, headers={"content-type": "application/json"}
    )
    _assert_too_large(response, MB, "CHARFORGE_MAX_JSON_BYTES")
    # 20 MB made as they are sent, with their length declared: the server's peak stays far
    # below (what it holds is uvicorn's read buffer, never the body).
    total = sum(len(c) for c in _json_stream(20 * MB))
    response, peak = _post_measured(
        alice,
        "/api/characters",
        content=_json_stream(20 * MB),
        headers={"content-type": "application/json", "content-length": str(total)},
    )
    if response is not None:  # the server may close before the client has sent it all
        assert response.request.headers["content-length"] == str(total)
        _assert_too_large(response, MB, "CHARFORGE_MAX_JSON_BYTES")
    assert peak < 4 * MB, peak
    assert alice.get("/api/characters").json() == []


def test_chunked_json_body_over_the_limit_stops_at_the_limit(live: Live) -> None:
    alice = live.user("alice")
    response, peak = _post_measured(
        alice,
        "/api/characters",
        content=_json_stream(20 * MB),
        headers={"content-type": "application/json"},
    )
    assert response is not None
    assert "content-length" not in response.request.headers  # really sent chunked
    _assert_too_large(response, MB, "CHARFORGE_MAX_JSON_BYTES")
    # 20 MB were offered; the server held at most the 1 MB limit and a chunk or two.
    assert peak < 4 * MB, peak
    assert alice.get("/api/characters").json() == []


def test_a_body_just_under_the_limit_is_read_and_validated(live: Live) -> None:
    alice = live.user("alice")
    body = json.dumps({"name": "Big", "appearance": "a" * (MB - 100)})
    response = alice.post(
        "/api/characters", content=body, headers={"content-type": "application/json"}
    )
    assert response.status_code == 422, response.text  # the field's own limit, not 413
    assert response.json()["error"]["field"] == "appearance"


def test_the_json_limit_follows_its_setting(
    live_factory: Any, sims: tuple[A1111Simulator, A1111Simulator]
) -> None:
    live = live_factory(sims[0].url, sims[1].url, max_json_bytes=4096)
    alice = live.user("alice")
    response = alice.post("/api/characters", json={"name": "Mid", "appearance": "a" * 5000})
    _assert_too_large(response, 4096, "CHARFORGE_MAX_JSON_BYTES")


def test_uploads_have_the_upload_limit(live: Live) -> None:
    alice = live.user("alice")
    character = create(alice, "Ann")

    size = UPLOAD_MAX_BYTES + 1

    def lazily() -> Iterator[bytes]:
        yield b"\0" * (size % MB)
        for _ in range(size // MB):
            yield b"\0" * MB

    headers = {"content-type": "multipart/form-data; boundary=x", "content-length": str(size)}
    # Declared too large: answered from the length, before the body is read.
    response, peak = _post_measured(
        alice, f"/api/characters/{character['id']}/references", content=lazily(), headers=headers
    )
    if response is not None:  # the server may close before the client has sent it all
        _assert_too_large(response, UPLOAD_MAX_BYTES, None)
    assert peak < 6 * MB, peak
    # Streamed too large without a length: cut off at the limit.
    head = b'--x\r\nContent-Disposition: form-data; name="file"; filename="a.png"\r\n\r\n'
    stream = iter([head, *(b"\0" * MB for _ in range(UPLOAD_MAX_BYTES // MB + 2))])
    response, peak = _post_measured(
        alice,
        f"/api/characters/{character['id']}/references",
        content=stream,
        headers={"content-type": "multipart/form-data; boundary=x"},
    )
    assert response is not None
    _assert_too_large(response, UPLOAD_MAX_BYTES, None)
    assert alice.get(f"/api/characters/{character['id']}/references").json()["items"] == []


# A lone surrogate can only come as a JSON escape: raw bytes are sent, as an attacker would.
SURROGATE = "\\ud800"


# Each field of a character; one server for all (a server costs more than a request).
CHARACTER_BODIES = [
    ('{"name": "Ann%s", "appearance": "red hair"}', "name"),
    ('{"name": "Ann", "appearance": "red %s hair"}', "appearance"),
    (
        '{"name": "Ann", "appearance": "x", "artStyle": {"primaryStyle": "a%s"}}',
        "artStyle.primaryStyle",
    ),
    ('{"name": "Ann", "appearance": "x", "description": "%s"}', "description"),
]


def test_lone_surrogate_in_a_character_is_a_422(live: Live) -> None:
    alice = live.user("alice")
    for template, field in CHARACTER_BODIES:
        response = alice.post(
            "/api/characters",
            content=(template % SURROGATE).encode(),
            headers={"content-type": "application/json"},
        )
        assert response.status_code == 422, response.text
        error = response.json()["error"]
        assert error["code"] == "validation_error"
        assert error["field"] == field
        assert "surrogate" in error["message"]
    assert alice.get("/api/characters").json() == []


def test_invalid_text_in_a_prompt_reaches_no_backend(
    live: Live, sims: tuple[A1111Simulator, A1111Simulator]
) -> None:
    alice = live.user("alice")
    character = create(alice, "Ann")
    for text in (SURROGATE, "\\u0000", "\\udfff\\ud800"):
        raw = json.dumps({"prompt": "in a garden PLACE", "characterId": character["id"]})
        response = alice.post(
            "/api/image-generation/generate",
            content=raw.replace("PLACE", text).encode(),
            headers={"content-type": "application/json"},
        )
        assert response.status_code == 422, response.text
        assert response.json()["error"]["field"] == "prompt"
    assert all(sim.txt2img_bodies() == [] for sim in sims)


def test_nul_in_a_name_is_a_422_on_every_database(live: Live) -> None:
    alice = live.user("alice")
    response = alice.post(
        "/api/characters",
        content=b'{"name": "A\\u0000nn", "appearance": "x"}',
        headers={"content-type": "application/json"},
    )
    assert response.status_code == 422, response.text
    assert response.json()["error"]["field"] == "name"
    assert "NUL" in response.json()["error"]["message"]


def test_nul_in_a_query_or_a_page_form_is_a_422(live: Live) -> None:
    alice = live.user("alice")
    response = alice.get("/api/characters", params={"cursor": "a\0b"})
    assert response.status_code == 422, response.text
    assert response.json()["error"]["field"] == "cursor"
    response = live.anonymous().post(
        "/login", data={"username": "ali\0ce", "password": "x"}, follow_redirects=False
    )
    assert response.status_code == 422, response.text
    assert response.json()["error"]["field"] == "username"


def test_an_escaped_backslash_before_u_is_not_taken_for_a_surrogate(live: Live) -> None:
    alice = live.user("alice")
    response = alice.post(
        "/api/characters",
        content=b'{"name": "Ann", "appearance": "path C:\\\\ud800 x"}',
        headers={"content-type": "application/json"},
    )
    assert response.status_code == 201, response.text
    assert response.json()["appearance"] == "path C:\\ud800 x"


def test_character_name_is_bounded_and_must_be_the_characters(
    live: Live, sims: tuple[A1111Simulator, A1111Simulator]
) -> None:
    alice = live.user("alice")
    character = create(alice, "Ann")
    too_long = generate(alice, {**character, "name": "A" * 101})
    assert too_long.status_code == 422, too_long.text
    assert too_long.json()["error"]["field"] == "characterName"
    assert "100" in too_long.json()["error"]["message"]  # the bound, before the name check
    other = generate(alice, {**character, "name": "Bob"})
    assert other.status_code == 422, other.text
    error = other.json()["error"]
    assert error["field"] == "characterName"
    assert "Bob" in error["message"] and "Ann" in error["message"]
    assert all(sim.txt2img_bodies() == [] for sim in sims)
    assert generate(alice, character).status_code == 200


def test_nosniff_on_api_answers(live: Live) -> None:
    alice = live.user("alice")
    for response in (
        alice.get("/api/health"),
        alice.get("/api/characters"),
        alice.get("/api/characters/nope"),
        live.anonymous().get("/api/characters"),
    ):
        assert response.headers["x-content-type-options"] == "nosniff", response.url
        assert "content-security-policy" not in response.headers


def test_csp_on_pages_and_a_relaxed_one_on_docs(live: Live) -> None:
    browser = live.client({"accept": "text/html"})
    login = browser.get("/login")  # the first-run setup page while there is no user
    login = browser.get(login.headers["location"]) if login.is_redirect else login
    assert login.status_code == 200
    assert login.headers["content-security-policy"] == PAGE_CSP
    assert "<script>" not in login.text and " style=" not in login.text
    missing = browser.get("/no-such-page")
    assert missing.status_code == 404
    assert missing.headers["content-security-policy"] == PAGE_CSP
    docs = browser.get("/docs")
    assert docs.headers["content-security-policy"] == DOCS_CSP
    assert "frame-ancestors 'none'" in PAGE_CSP and "'unsafe-inline'" not in PAGE_CSP


def test_a_page_form_over_the_limit_gets_a_page(live: Live) -> None:
    """A browser that posts a form too large (or with a NUL in it) is shown an error page it
    can read, under the page policy, not the API's JSON."""
    browser = live.client({"Accept": "text/html,application/xhtml+xml"})
    form = {"name": "x", "appearance": "a" * (MB + 10)}
    response = browser.post("/characters/new", data=form)
    assert response.status_code == 413
    assert response.headers["content-type"].startswith("text/html")
    assert response.headers["content-security-policy"] == PAGE_CSP
    assert (
        "larger than 1048576 bytes" in response.text and "CHARFORGE_MAX_JSON_BYTES" in response.text
    )
    response = browser.post("/characters/new", data={"name": "x\x00y"})
    assert response.status_code == 422 and response.headers["content-type"].startswith("text/html")
    assert "NUL" in response.text
    # An API client posting the same gets the JSON envelope, as before.
    api = live.client({"Accept": "application/json"})
    assert api.post("/characters/new", data=form).json()["error"]["code"] == "payload_too_large"


def test_a_job_whose_images_cannot_fit_one_answer_is_refused_before_it_is_queued(
    live_factory: Any, sims: tuple[A1111Simulator, A1111Simulator]
) -> None:
    """A1111 sends every image of a job in one answer; with the cap at 8 MiB, 16 images of
    512x768 could not come back, so the job is a 422 naming how many fit, not a 502 later."""
    live = live_factory(sims[0].url, sims[1].url, backend_max_response_bytes=8 * MB)
    alice = live.user("alice")
    character = create(alice, "Ann")
    body = {"prompt": "at the beach", "characterId": character["id"]}
    refused = alice.post("/api/jobs", json={**body, "count": 16})
    assert refused.status_code == 422, refused.text
    error = refused.json()["error"]
    assert error["field"] == "count" and error["setting"] == "CHARFORGE_BACKEND_MAX_RESPONSE_BYTES"
    fitting = error["limit"]
    assert 1 <= fitting < 16 and f"at most {fitting}" in error["hint"]
    assert sims[1].txt2img_bodies() == []
    # As many as it says fit do come back under the real cap.
    accepted = alice.post("/api/jobs", json={**body, "count": fitting})
    assert accepted.status_code == 202, accepted.text
    job = wait_final(alice, accepted.json()["id"], timeout=120)
    assert job["state"] == "succeeded" and len(job["images"]) == fitting, job
