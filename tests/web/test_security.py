"""Regressions from the web security review, over plain HTTP with a cookie jar."""

from __future__ import annotations

import concurrent.futures
import re
from pathlib import Path
from typing import Any

import httpx
import pytest
from pydantic import SecretStr

from charforge.config import Settings
from charforge.db import repositories as repo
from charforge.simulator import A1111Simulator
from charforge.web.session import SECRET_KEY_MIN, secret_key

HTML = {"Accept": "text/html"}


def csrf_of(client: httpx.Client, path: str) -> str:
    page = client.get(path, headers=HTML)
    match = re.search(r'name="csrf_token" value="([^"]+)"', page.text)
    assert match, page.text[:500]
    return match.group(1)


def setup_admin(client: httpx.Client, name: str = "ada", password: str = "correct horse") -> Any:
    return client.post(
        "/setup",
        data={
            "name": name,
            "password": password,
            "confirm": password,
            "csrf_token": csrf_of(client, "/setup"),
        },
        headers=HTML,
    )


def test_a_short_or_empty_secret_key_is_never_used(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="at least 32"):
        secret_key(Settings(data_dir=tmp_path, secret_key=SecretStr("")))
    (tmp_path / "secret_key").write_text("")  # e.g. left by a crash while it was written
    key = secret_key(Settings(data_dir=tmp_path))
    assert len(key) >= SECRET_KEY_MIN
    assert secret_key(Settings(data_dir=tmp_path)) == key  # stable across starts
    assert (tmp_path / "secret_key").stat().st_mode & 0o077 == 0


def test_racing_setup_makes_exactly_one_admin(
    web: Any, sims: tuple[A1111Simulator, A1111Simulator]
) -> None:
    server, container = web
    clients = [httpx.Client(base_url=server.url, timeout=30) for _ in range(4)]
    try:
        tokens = [csrf_of(c, "/setup") for c in clients]
        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            list(
                pool.map(
                    lambda pair: pair[0].post(
                        "/setup",
                        data={
                            "name": f"user{pair[1][:4]}",
                            "password": "long enough",
                            "confirm": "long enough",
                            "csrf_token": pair[1],
                        },
                    ),
                    zip(clients, tokens, strict=True),
                )
            )
    finally:
        for c in clients:
            c.close()
    with container.db.session() as session:
        assert repo.count_users(session) == 1


def test_sign_out_ends_a_copied_session(
    web: Any, sims: tuple[A1111Simulator, A1111Simulator]
) -> None:
    server, _ = web
    with httpx.Client(base_url=server.url, timeout=30) as browser:
        setup_admin(browser)
        stolen = dict(browser.cookies)
        assert browser.get("/account", headers=HTML).status_code == 200
        browser.post("/logout", data={"csrf_token": csrf_of(browser, "/account")})
    with httpx.Client(base_url=server.url, cookies=stolen, timeout=30) as thief:
        replay = thief.get("/account", headers=HTML)
        assert replay.status_code == 303 and replay.headers["location"].startswith("/login")


def test_pages_are_not_framed_sniffed_or_cached(
    web: Any, sims: tuple[A1111Simulator, A1111Simulator]
) -> None:
    server, _ = web
    with httpx.Client(base_url=server.url, timeout=30) as browser:
        setup_admin(browser)
        page = browser.get("/account", headers=HTML)
    assert page.headers["x-frame-options"] == "DENY"
    assert page.headers["x-content-type-options"] == "nosniff"
    assert page.headers["cache-control"] == "no-store"


def test_odd_csrf_tokens_and_anonymous_json_posts_are_refused_cleanly(
    web: Any, sims: tuple[A1111Simulator, A1111Simulator]
) -> None:
    server, _ = web
    with httpx.Client(base_url=server.url, timeout=30) as browser:
        setup_admin(browser)
        odd = browser.post("/logout", data={"csrf_token": "é"})
        assert odd.status_code == 403
        header = browser.post(
            "/generate-images/run",
            json={"prompt": "x", "characterId": "y"},
            headers={"X-CSRF-Token": b"\xe9"},
        )
        assert header.status_code == 403 and header.json()["error"]["code"] == "csrf_failed"
    with httpx.Client(base_url=server.url, timeout=30) as anonymous:
        response = anonymous.post("/generate-images/run", json={"steps": "not a number"})
        assert response.status_code == 401  # refused before the body is even looked at


def test_browsers_get_html_error_pages(
    web: Any, sims: tuple[A1111Simulator, A1111Simulator]
) -> None:
    server, _ = web
    with httpx.Client(base_url=server.url, timeout=30) as browser:
        setup_admin(browser)
        missing = browser.get("/no/such/page", headers=HTML)
        assert missing.status_code == 404 and "<h1>Not found</h1>" in missing.text
        bad = browser.get("/images/x/file?download=maybe", headers=HTML)
        assert bad.status_code == 422 and "text/html" in bad.headers["content-type"]
        api = browser.get("/api/nothing", headers=HTML)
        assert api.status_code == 404 and api.json()["error"]["code"] == "not_found"


def test_changing_the_style_on_the_edit_page_moves_the_checkpoint(
    web: Any, sims: tuple[A1111Simulator, A1111Simulator]
) -> None:
    server, _ = web
    with httpx.Client(base_url=server.url, timeout=30) as browser:
        setup_admin(browser)
        created = browser.post(
            "/characters/new",
            data={
                "csrf_token": csrf_of(browser, "/characters/new"),
                "name": "Kai",
                "art_style": "anime",
            },
        )
        character_id = created.headers["location"].rsplit("/", 1)[-1]
        form = browser.get(f"/characters/{character_id}/edit", headers=HTML).text
        model_value = re.search(r'id="model" name="model" value="([^"]*)"', form)
        assert model_value and model_value.group(1) == ""  # the style's own: not shown as custom
        browser.post(
            f"/characters/{character_id}/edit",
            data={
                "csrf_token": csrf_of(browser, f"/characters/{character_id}/edit"),
                "name": "Kai",
                "art_style": "realistic",
                "model": "",
            },
        )
        page = browser.get(f"/characters/{character_id}", headers=HTML).text
        assert "🔵 Using Realistic Style (cyberrealistic.safetensors)" in page
