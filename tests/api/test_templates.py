"""Prompt templates over real HTTP: built-in ones read-only, a user's own private, slots and
braces checked, and a generation from a template proven by what the A1111 stand-in received."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import pytest

from charforge.simulator import A1111Simulator
from tests.api.test_generate import create, generate
from tests.conftest import Live

Sims = tuple[A1111Simulator, A1111Simulator]
URL = "/api/prompt-templates"
BUILTIN_IDS = ("builtin-outfit-change", "builtin-new-environment", "builtin-action-scene")


def make(client: httpx.Client, **fields: Any) -> dict[str, Any]:
    body = {"name": "Ballroom", "prompt": "{character} wearing {outfit} at {place}", **fields}
    response = client.post(URL, json=body)
    assert response.status_code == 201, response.text
    assert response.headers["location"] == f"{URL}/{response.json()['id']}"
    return dict(response.json())


def refused(response: httpx.Response, status: int, field: str | None) -> dict[str, Any]:
    assert response.status_code == status, response.text
    error: dict[str, Any] = response.json()["error"]
    assert error["field"] == field, error
    return error


def with_template(
    client: httpx.Client, character: dict[str, Any], template_id: str, **extra: Any
) -> httpx.Response:
    body = {"characterId": character["id"], "templateId": template_id, **extra}
    return client.post("/api/image-generation/generate", json=body)


def test_builtin_templates_are_there_for_everyone_and_read_only(live: Live) -> None:
    client = live.user("alice")
    items = client.get(URL).json()["items"]
    builtins = {t["id"]: t for t in items if t["builtin"]}
    assert set(BUILTIN_IDS) <= set(builtins)
    outfit = builtins["builtin-outfit-change"]
    assert outfit["name"] == "Outfit change"
    assert outfit["slots"] == ["character", "outfit"]
    assert builtins["builtin-new-environment"]["params"] == {"width": 768, "height": 512}
    assert client.get(f"{URL}/builtin-action-scene").json()["slots"] == [
        "character",
        "action",
        "background",
    ]
    error = refused(client.patch(f"{URL}/builtin-outfit-change", json={"name": "x"}), 403, None)
    assert "built-in" in error["message"] and "Copy" in error["hint"]
    refused(client.delete(f"{URL}/builtin-outfit-change"), 403, None)
    assert client.get(f"{URL}/builtin-nope").status_code == 404
    # Copying one, as the hint says, gives a template of one's own under the same name.
    copy = make(client, name=outfit["name"], prompt=outfit["prompt"])
    assert copy["builtin"] is False and copy["slots"] == outfit["slots"]


def test_a_users_templates_are_private_named_uniquely_and_editable(live: Live) -> None:
    alice, bob = live.user("alice"), live.user("bob")
    mine = make(alice, negativePrompt="blurry", params={"steps": 12, "sampler": "Euler a"})
    assert mine["slots"] == ["character", "outfit", "place"]
    assert mine["params"] == {"steps": 12, "sampler": "Euler a"}
    assert (mine["builtin"], mine["negativePrompt"]) == (False, "blurry")
    path = f"{URL}/{mine['id']}"

    refused(alice.post(URL, json={"name": "Ballroom", "prompt": "x"}), 409, "name")
    for response in (
        bob.get(path),
        bob.patch(path, json={"name": "mine now"}),
        bob.delete(path),
    ):
        refused(response, 404, None)
    assert mine["id"] not in {t["id"] for t in bob.get(URL).json()["items"]}
    bob_own = make(bob)  # the same name is bob's to use too
    assert bob_own["id"] != mine["id"]

    changed = alice.patch(path, json={"prompt": "{character} in {outfit}", "params": {"steps": 9}})
    assert changed.status_code == 200, changed.text
    body = changed.json()
    assert body["slots"] == ["character", "outfit"] and body["params"] == {"steps": 9}
    assert body["name"] == "Ballroom" and body["negativePrompt"] == "blurry"  # untouched
    assert body["updatedAt"] >= mine["updatedAt"]
    other = make(alice, name="Other")
    refused(alice.patch(f"{URL}/{other['id']}", json={"name": "Ballroom"}), 409, "name")
    assert alice.delete(path).status_code == 204
    assert alice.get(path).status_code == 404
    assert bob.get(f"{URL}/{bob_own['id']}").status_code == 200


@pytest.mark.parametrize(
    ("fields", "field", "words"),
    [
        ({"prompt": "{character} in {outfit"}, "prompt", "opens no slot"),
        ({"prompt": "a } here"}, "prompt", "closes no slot"),
        ({"prompt": "{Outfit} dress"}, "prompt", "not a slot name"),
        ({"prompt": "{out fit}"}, "prompt", "not a slot name"),
        ({"prompt": ""}, "prompt", "1 to"),
        ({"name": "  "}, "name", "1 to"),
        ({"params": {"stepz": 10}}, "params.stepz", "not a known field"),
        ({"params": {"steps": 500}}, "params.steps", "less than or equal to 150"),
        ({"params": {"hiresScale": 9}}, "params.hiresScale", "4"),
        ({"params": {"width": 500}}, "params.width", "multiple of 8"),
        ({"slots": ["x"]}, "slots", "not a known field"),
    ],
)
def test_a_template_that_cannot_work_is_refused_naming_the_field(
    live: Live, fields: dict[str, Any], field: str, words: str
) -> None:
    client = live.user("alice")
    body = {"name": "T", "prompt": "{character} at {place}", **fields}
    error = refused(client.post(URL, json=body), 422, field)
    assert words in error["message"] + " " + str(error.get("details")), error


def test_literal_braces_are_written_doubled(live: Live) -> None:
    client = live.user("alice")
    made = make(client, name="Braces", prompt="{{not a slot}} {character} {{ {mood} }}")
    assert made["slots"] == ["character", "mood"]


def test_a_generation_from_a_template_is_what_the_webui_receives(live: Live, sims: Sims) -> None:
    client = live.user("alice")
    sakura = create(client, "Sakura")  # appearance "Sakura look"
    template = make(
        client,
        prompt="{character} wearing {outfit} at {place}, {{studio}} light, {appearance}",
        negativePrompt="blurry",
        params={"steps": 12, "sampler": "Euler a", "width": 640, "hiresScale": 1.25},
    )
    response = with_template(
        client,
        sakura,
        template["id"],
        variables={"outfit": "a red evening dress", "place": "a ballroom"},
        negativePrompt="text",
        steps=9,  # the request's own settings win over the template's
    )
    assert response.status_code == 200, response.text
    sent = sims[1].txt2img_bodies()[-1]
    assert sent["prompt"] == (
        "Sakura wearing a red evening dress at a ballroom, {studio} light, Sakura look"
    )
    assert sent["negative_prompt"].startswith("text, blurry")
    assert (sent["steps"], sent["sampler_name"], sent["width"]) == (9, "Euler a", 640)
    assert sent["hr_scale"] == 1.25
    image = client.get(f"/api/images/{response.json()['images'][0]['id']}").json()
    assert image["prompt"].startswith("Sakura wearing a red evening dress")
    job = client.get(f"/api/jobs/{response.json()['jobId']}").json()
    assert job["prompt"] == sent["prompt"]  # {appearance} holds it: not added twice


def test_a_builtin_template_generates_with_its_one_variable(live: Live, sims: Sims) -> None:
    client = live.user("alice")
    sakura = create(client, "Sakura")
    response = with_template(
        client, sakura, "builtin-outfit-change", variables={"outfit": "red evening dress"}
    )
    assert response.status_code == 200, response.text
    sent = sims[1].txt2img_bodies()[-1]["prompt"]
    assert sent.startswith("Sakura wearing red evening dress, elegant pose")
    environment = with_template(
        client,
        sakura,
        "builtin-new-environment",
        variables={"place": "on a mountain peak", "lighting": "golden hour lighting"},
        hires=False,
    )
    assert environment.status_code == 200, environment.text
    assert sims[1].txt2img_bodies()[-1]["width"] == 768  # the template's landscape size


@pytest.mark.parametrize(
    ("extra", "status", "field", "words"),
    [
        ({"variables": {"outfit": "dress"}}, 422, "variables.place", "needs a value for {place}"),
        ({"variables": {"outfit": "dress", "place": " "}}, 422, "variables.place", "{place}"),
        (
            {"variables": {"outfit": "dress", "place": "hall", "mood": "calm"}},
            422,
            "variables.mood",
            "has no slot {mood}",
        ),
        (
            {"variables": {"outfti": "dress", "place": "hall"}},
            422,
            "variables.outfti",
            "Did you mean outfit?",
        ),
        (
            {"variables": {"outfit": "dress", "place": "hall", "character": "Bob"}},
            422,
            "variables.character",
            "filled from the character",
        ),
        ({"variables": {"outfit": 3, "place": "hall"}}, 422, "variables.outfit", "string"),
        (
            {"variables": {"outfit": "dress", "place": "hall"}, "prompt": "a garden"},
            422,
            "prompt",
            "either a prompt or a templateId",
        ),
    ],
)
def test_missing_empty_extra_and_misspelt_variables_are_refused(
    live: Live, sims: Sims, extra: dict[str, Any], status: int, field: str, words: str
) -> None:
    client = live.user("alice")
    sakura = create(client, "Sakura")
    template = make(client)
    error = refused(with_template(client, sakura, template["id"], **extra), status, field)
    assert words in error["message"] + " " + (error["hint"] or "") + str(error.get("details"))
    assert sims[1].txt2img_bodies() == []


def test_a_prompt_or_a_template_is_required_and_variables_need_a_template(
    live: Live, sims: Sims
) -> None:
    alice, bob = live.user("alice"), live.user("bob")
    sakura = create(alice, "Sakura")
    generate_url = "/api/image-generation/generate"
    refused(alice.post(generate_url, json={"characterId": sakura["id"]}), 422, "prompt")
    refused(generate(alice, sakura, prompt=""), 422, "prompt")
    refused(generate(alice, sakura, variables={"outfit": "dress"}), 422, "variables")
    refused(with_template(alice, sakura, "no-such-template"), 404, "templateId")
    # Another user's template is answered as one that does not exist.
    hidden = make(bob)
    refused(
        with_template(alice, sakura, hidden["id"], variables={"outfit": "a", "place": "b"}),
        404,
        "templateId",
    )
    assert sims[1].txt2img_bodies() == []


POLICY = """
[categories.weapons]
terms = ["zorblax"]
"""


def test_a_restricted_word_in_a_variable_is_refused_naming_it(
    live_factory: Any, sims: Sims, tmp_path: Path
) -> None:
    policy = tmp_path / "policy.toml"
    policy.write_text(POLICY, encoding="utf-8")
    live: Live = live_factory(sims[0].url, sims[1].url, content_policy=policy)
    client = live.user("alice")
    sakura = create(client, "Sakura")
    template = make(client)
    response = with_template(
        client, sakura, template["id"], variables={"outfit": "a ZORBLAX costume", "place": "hall"}
    )
    error = refused(response, 422, "variables.outfit")
    assert (error["code"], error["category"]) == ("restricted_content", "weapons")
    assert "zorblax" not in response.text.lower()
    # In the template itself: refused when it is saved.
    saved = client.post(URL, json={"name": "Bad", "prompt": "{character} with a zorblax"})
    assert refused(saved, 422, "prompt")["code"] == "restricted_content"
    assert sims[1].txt2img_bodies() == []


def test_jobs_take_templates_too(live: Live, sims: Sims) -> None:
    client = live.user("alice")
    sakura = create(client, "Sakura")
    response = client.post(
        "/api/jobs",
        json={
            "characterId": sakura["id"],
            "templateId": "builtin-action-scene",
            "variables": {"action": "casting a spell", "background": "mystical forest"},
        },
    )
    assert response.status_code == 202, response.text
    assert response.json()["prompt"].startswith("Sakura casting a spell, mystical forest")
