"""The content policy over real HTTP: every covered field, the ways a term is disguised, the
built-in category, and the admin routes; the A1111 stand-ins prove nothing restricted was sent."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import httpx
import pytest

from charforge.safety import fold
from charforge.simulator import A1111Simulator
from tests.api.test_generate import create, generate
from tests.conftest import Live

POLICY = """
[categories.weapons]
terms = ["zorblax", "plasma rifle"]
patterns = ['\\bblood ?bath\\w*']
"""

VARIANTS = [
    "zorblax",
    "ZorBLAX",
    "ｚｏｒｂｌａｘ",  # fullwidth
    "zor\u200bblax",  # zero-width space
    "zo\u0308rbla\u0301x",  # combining marks
]

Sims = tuple[A1111Simulator, A1111Simulator]


@pytest.fixture
def policy_file(tmp_path: Path) -> Path:
    path = tmp_path / "policy.toml"
    path.write_text(POLICY, encoding="utf-8")
    return path


@pytest.fixture
def guarded(live_factory: Any, sims: Sims, policy_file: Path) -> Live:
    realistic, anime = sims
    result: Live = live_factory(realistic.url, anime.url, content_policy=policy_file)
    return result


def _refused(response: httpx.Response, field: str, category: str) -> None:
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert (error["code"], error["field"], error["category"]) == (
        "restricted_content",
        field,
        category,
    )
    assert "zorblax" not in fold(response.text)  # the term list is never echoed


def _sent_prompts(sims: Sims) -> list[str]:
    return [str(body["prompt"]) for sim in sims for body in sim.txt2img_bodies()]


def test_prompt_variants_are_refused_and_nothing_reaches_a_backend(
    guarded: Live, sims: Sims
) -> None:
    user = guarded.user("alice")
    sakura = create(user, "Sakura")
    for variant in VARIANTS:
        _refused(generate(user, sakura, f"walking with a {variant}, sunset"), "prompt", "weapons")
    _refused(generate(user, sakura, "a Blood_Bath"), "prompt", "weapons")  # a pattern
    assert _sent_prompts(sims) == []
    # A longer word is another word; the negative prompt lists what must not appear.
    ok = generate(user, sakura, "a zorblaxian envoy", negativePrompt="zorblax, plasma rifle")
    assert ok.status_code == 200, ok.text
    sent = _sent_prompts(sims)
    assert len(sent) == 1 and "zorblaxian" in sent[0]
    negatives = [str(b["negative_prompt"]) for s in sims for b in s.txt2img_bodies()]
    assert negatives[0].startswith("zorblax")


def test_character_fields_are_checked_on_create_and_change(guarded: Live, sims: Sims) -> None:
    user = guarded.user("alice")
    for variant in VARIANTS:
        for field in ("name", "appearance", "description"):
            body = {"name": "Sakura", "appearance": "tall", field: f"the {variant} one"}
            _refused(user.post("/api/characters", json=body), field, "weapons")
    assert user.get("/api/characters").json() == []
    sakura = create(user, "Sakura", negativePrompt="zorblax")  # negative: not restricted
    for field in ("name", "appearance", "description"):
        changed = user.patch(f"/api/characters/{sakura['id']}", json={field: "ＺＯＲＢＬＡＸ"})
        _refused(changed, field, "weapons")
    stored = user.get(f"/api/characters/{sakura['id']}").json()
    assert (stored["name"], stored["appearance"]) == ("Sakura", "Sakura look")


def test_card_import_goes_through_the_same_checks(guarded: Live) -> None:
    user = guarded.user("alice")
    for field, card in (
        ("name", {"name": "Zor\u200bblax", "description": "a knight"}),
        ("description", {"name": "Ash", "description": "carries a plasma-rifle"}),
    ):
        body = json.dumps({"spec": "chara_card_v2", "spec_version": "2.0", "data": card})
        response = user.post(
            "/api/characters/import",
            content=body.encode(),
            headers={"Content-Type": "application/json"},
        )
        _refused(response, field, "weapons")
    assert user.get("/api/characters").json() == []


def test_builtin_category_is_always_on_and_checks_the_composed_prompt(
    live: Live, sims: Sims
) -> None:
    """No policy file at all: the built-in category still refuses, disguised or not, and a
    scene that is harmless alone is refused with a character whose appearance completes it."""
    user = live.user("alice")
    _refused(user.post("/api/characters", json={"name": "ｌｏ\u200bＬＩ"}), "name", "sexual_minors")
    plain = create(user, "Ash")
    _refused(generate(user, plain, "lolicon"), "prompt", "sexual_minors")
    young = create(user, "Kid", appearance="a child in a red coat")
    _refused(generate(user, young, "naked, on a beach"), "prompt", "sexual_minors")
    assert _sent_prompts(sims) == []
    assert generate(user, young, "on a beach, building a sandcastle").status_code == 200
    assert generate(user, plain, "naked marble statue").status_code == 200


def test_admins_read_and_reload_the_policy(guarded: Live, policy_file: Path) -> None:
    admin = guarded.user("root", admin=True)
    user = guarded.user("alice")
    assert user.get("/api/admin/content-policy").status_code == 403
    assert user.post("/api/admin/content-policy/reload").status_code == 403
    assert guarded.anonymous().get("/api/admin/content-policy").status_code == 401

    read = admin.get("/api/admin/content-policy")
    assert read.status_code == 200, read.text
    policy = read.json()
    assert policy["path"] == str(policy_file) and policy["loadedAt"].endswith("Z")
    by_name = {c["name"]: c for c in policy["categories"]}
    assert by_name["sexual_minors"]["builtin"] and by_name["sexual_minors"]["termCount"] > 5
    weapons = by_name["weapons"]
    assert (weapons["termCount"], weapons["patternCount"], weapons["builtin"]) == (2, 1, False)
    assert weapons["terms"] == ["zorblax", "plasma rifle"]

    sakura = create(user, "Sakura")
    policy_file.write_text('[categories.gadgets]\nterms = ["gizmo"]\n', encoding="utf-8")
    assert generate(user, sakura, "a gizmo").status_code == 200  # not before the reload
    reloaded = admin.post("/api/admin/content-policy/reload")
    assert reloaded.status_code == 200, reloaded.text
    assert [c["name"] for c in reloaded.json()["categories"]] == ["sexual_minors", "gadgets"]
    _refused(generate(user, sakura, "a GIZMO"), "prompt", "gadgets")
    assert generate(user, sakura, "a zorblax").status_code == 200  # that category is gone

    for broken, problem in (
        ("[categories.gadgets\n", "line 1"),
        ("[categories.sexual_minors]\nenabled = false\n", "cannot be switched off"),
        ('[categories.gadgets]\npatterns = ["(a+)+"]\n', "repeats a repeat"),
    ):
        policy_file.write_text(broken, encoding="utf-8")
        refused = admin.post("/api/admin/content-policy/reload")
        assert refused.status_code == 422, refused.text
        error = refused.json()["error"]
        assert error["field"] == "CHARFORGE_CONTENT_POLICY"
        assert problem in error["message"] and "previous policy stays" in error["message"]
    # The policy in force is still the last good one.
    _refused(generate(user, sakura, "a gizmo"), "prompt", "gadgets")
    assert [c["name"] for c in admin.get("/api/admin/content-policy").json()["categories"]] == [
        "sexual_minors",
        "gadgets",
    ]


def _csrf(html: str) -> str:
    found = re.search(r'name="csrf_token" value="([^"]+)"', html)
    assert found, html[:500]
    return found.group(1)


def test_pages_show_the_refusal_like_any_other_error(guarded: Live, sims: Sims) -> None:
    """The character form re-renders with the message; the Generate page's job submission
    answers the envelope its script shows next to the prompt field."""
    guarded.user("alice")
    page = guarded.anonymous()
    signed_in = page.post(
        "/login",
        data={
            "name": "alice",
            "password": "password-alice",
            "csrf_token": _csrf(page.get("/login").text),
        },
    )
    assert signed_in.status_code == 303, signed_in.text
    form = page.get("/characters/new")
    refused = page.post(
        "/characters/new",
        data={
            "csrf_token": _csrf(form.text),
            "name": "Ash",
            "appearance": "holds a ｚｏｒｂｌａｘ",
        },
    )
    assert refused.status_code == 422
    assert "content policy" in refused.text and "weapons" in refused.text
    assert "zorblax" not in fold(
        refused.text.replace("ｚｏｒｂｌａｘ", "")
    )  # only the user's own text
    made = page.post(
        "/characters/new",
        data={"csrf_token": _csrf(form.text), "name": "Ash", "appearance": "tall"},
    )
    assert made.status_code == 303, made.text
    character_id = made.headers["location"].rsplit("/", 1)[-1]
    job = page.post(
        "/generate-images/jobs",
        json={"prompt": "a plasma rifle", "characterId": character_id},
        headers={
            "X-CSRF-Token": _csrf(page.get("/generate-images").text),
            "Accept": "application/json",
        },
    )
    _refused(job, "prompt", "weapons")
    assert _sent_prompts(sims) == []
