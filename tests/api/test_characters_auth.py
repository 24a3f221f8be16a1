"""Characters CRUD, API auth, and isolation between users, over HTTP."""

from __future__ import annotations

from typing import Any

import httpx
import pytest

from charforge.services import users
from charforge.simulator import A1111Simulator
from tests.api.test_generate import create, generate
from tests.conftest import Live


def test_every_api_route_but_health_needs_a_token(live: Live) -> None:
    anon = live.anonymous()
    assert anon.get("/api/health").status_code == 200
    assert anon.get("/healthz").json()["status"] == "ok"
    for method, path in [
        ("GET", "/api/characters"),
        ("POST", "/api/characters"),
        ("GET", "/api/characters/x"),
        ("PATCH", "/api/characters/x"),
        ("DELETE", "/api/characters/x"),
        ("GET", "/api/characters/x/images"),
        ("GET", "/api/images/x"),
        ("GET", "/api/images/x/file"),
        ("GET", "/api/styles"),
        ("GET", "/api/jobs/x"),
        ("POST", "/api/image-generation/generate"),
    ]:
        response = anon.request(method, path, json={})
        assert response.status_code == 401, (method, path)
        assert response.json()["error"]["code"] == "unauthorized"
        assert "charforge tokens create" in response.json()["error"]["hint"]
        assert response.headers["www-authenticate"] == "Bearer"
    bad = live.client({"Authorization": "Bearer cf_not-a-real-token"})
    assert bad.get("/api/characters").status_code == 401
    basic = live.client({"Authorization": "Basic dXNlcjpwYXNz"})
    assert basic.get("/api/characters").status_code == 401


def test_revoked_token_stops_working(live: Live) -> None:
    client = live.user("alice")
    assert client.get("/api/characters").status_code == 200
    with live.container.db.session() as session:
        alice = users.require_user(session, "alice")
        token_id = users.list_tokens(session, alice)[0].id
        users.revoke_token(session, alice, token_id)
    assert client.get("/api/characters").status_code == 401


def test_tokens_are_stored_hashed(live: Live) -> None:
    live.user("alice")
    token = live.tokens["alice"]
    with live.container.db.session() as session:
        rows = users.list_tokens(session, users.require_user(session, "alice"))
        assert all(token not in (r.token_hash, r.prefix) for r in rows)
        assert rows[0].token_hash == users.hash_token(token)


def test_character_crud_in_camel_case(live: Live) -> None:
    client = live.user("alice")
    created = client.post(
        "/api/characters",
        json={
            "name": "Sakura",
            "description": "A cheerful swordswoman",
            "appearance": "pink hair, green eyes, red scarf",
            "artStyle": {"primaryStyle": "ANIME"},
        },
    )
    assert created.status_code == 201
    sakura = created.json()
    assert created.headers["location"] == f"/api/characters/{sakura['id']}"
    assert sakura["artStyle"] == {"primaryStyle": "anime"}
    assert sakura["imageGeneration"] == {
        "model": "diving.safetensors",
        "modelHash": None,
        "identityStrength": 0.6,
        "loras": [],
        "seed": None,
    }
    assert set(sakura) == {
        "id",
        "name",
        "description",
        "appearance",
        "negativePrompt",
        "artStyle",
        "imageGeneration",
        "referenceCount",
        "importedCard",
        "createdAt",
        "updatedAt",
    }
    assert sakura["createdAt"].endswith("Z")

    alex = create(client, "Alex", "realistic")
    listed = client.get("/api/characters").json()
    assert [c["name"] for c in listed] == ["Alex", "Sakura"]  # newest first
    assert alex["imageGeneration"]["model"] == "cyberrealistic.safetensors"

    patched = client.patch(
        f"/api/characters/{sakura['id']}", json={"appearance": "short pink hair"}
    )
    assert patched.status_code == 200
    assert patched.json()["appearance"] == "short pink hair"
    assert patched.json()["imageGeneration"]["model"] == "diving.safetensors"

    moved = client.patch(f"/api/characters/{sakura['id']}", json={"artStyle": "realistic"})
    assert moved.json()["imageGeneration"]["model"] == "cyberrealistic.safetensors"

    assert client.delete(f"/api/characters/{sakura['id']}").status_code == 204
    assert client.get(f"/api/characters/{sakura['id']}").status_code == 404
    assert [c["name"] for c in client.get("/api/characters").json()] == ["Alex"]


def test_character_with_string_style_and_own_model(live: Live) -> None:
    client = live.user("alice")
    mika = create(
        client, "Mika", None, artStyle="Cartoon", imageGeneration={"model": "other.safetensors"}
    )
    assert mika["artStyle"] == {"primaryStyle": "cartoon"}
    assert mika["imageGeneration"]["model"] == "other.safetensors"


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"name": ""}, "name"),
        ({}, "name"),
        ({"name": "x" * 101}, "name"),
        ({"name": "A", "artStyle": {"primaryStyle": "watercolor"}}, "artStyle.primaryStyle"),
        ({"name": "A", "appearance": "x" * 2001}, "appearance"),
        ({"name": "A", "colour": "red"}, "colour"),
    ],
)
def test_bad_character_input_is_a_clear_422(live: Live, body: dict[str, Any], field: str) -> None:
    client = live.user("alice")
    response = client.post("/api/characters", json=body)
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert error["field"] == field, error
    if "artStyle" in body:
        assert "anime, cartoon, fantasy, realistic" in error["message"]


def test_second_user_sees_and_touches_nothing_of_the_first(
    live: Live, sims: tuple[A1111Simulator, A1111Simulator]
) -> None:
    alice = live.user("alice")
    bob = live.user("bob")
    sakura = create(alice, "Sakura", "anime")
    image = generate(alice, sakura).json()["images"][0]
    job_id = generate(alice, sakura).json()["jobId"]

    assert bob.get("/api/characters").json() == []
    for method, path, body in [
        ("GET", f"/api/characters/{sakura['id']}", None),
        ("PATCH", f"/api/characters/{sakura['id']}", {"name": "Mine"}),
        ("DELETE", f"/api/characters/{sakura['id']}", None),
        ("GET", f"/api/characters/{sakura['id']}/images", None),
        ("GET", f"/api/images/{image['id']}", None),
        ("GET", f"/api/images/{image['id']}/file", None),
        ("DELETE", f"/api/images/{image['id']}", None),
        ("GET", f"/api/jobs/{job_id}", None),
    ]:
        response = bob.request(method, path, json=body)
        assert response.status_code == 404, (method, path, response.text)
        assert response.json()["error"]["code"] == "not_found"
        assert "Sakura" not in response.text
    stolen = generate(bob, sakura)
    assert stolen.status_code == 404
    assert len(sims[1].txt2img_bodies()) == 2  # only alice's two

    # Alice's things are intact.
    assert alice.get(f"/api/characters/{sakura['id']}").json()["name"] == "Sakura"
    assert alice.get(f"/api/images/{image['id']}/file").status_code == 200


def test_unknown_route_and_method_use_the_envelope(live: Live) -> None:
    client = live.user("alice")
    missing = client.get("/api/nothing-here")
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "not_found"
    wrong = client.put("/api/characters")
    assert wrong.status_code == 405 and wrong.json()["error"]["code"] == "method_not_allowed"


def test_styles_say_what_each_style_uses_and_whether_it_answers(
    live_factory: Any, sims: tuple[A1111Simulator, A1111Simulator]
) -> None:
    from tests.helpers import free_port

    live = live_factory(f"http://127.0.0.1:{free_port()}", sims[1].url)
    client = live.user("alice")
    styles = {s["style"]: s for s in client.get("/api/styles").json()}
    assert list(styles) == ["anime", "cartoon", "fantasy", "realistic"]
    anime = styles["anime"]
    assert anime["indicator"] == "🟠 Using Anime Style (diving.safetensors)"
    assert (
        anime["note"] == "Images will be generated using the same model as the original character"
    )
    assert (anime["label"], anime["emoji"], anime["checkpoint"]) == (
        "Anime",
        "🟠",
        "diving.safetensors",
    )
    assert anime["backend"] == "anime-cartoon-fantasy"
    assert anime["available"] is True and anime["backends"][0]["checkpointPresent"] is True
    realistic = styles["realistic"]
    assert realistic["checkpoint"] == "cyberrealistic.safetensors"
    assert realistic["available"] is False
    assert realistic["backends"][0]["error"]
    assert len({s["emoji"] for s in styles.values()}) == 4


def test_image_history_is_newest_first_and_paged(
    live: Live, sims: tuple[A1111Simulator, A1111Simulator]
) -> None:
    client = live.user("alice")
    sakura = create(client, "Sakura", "anime")
    made = [generate(client, sakura, f"scene {i}").json()["images"][0]["id"] for i in range(5)]

    first = client.get(f"/api/characters/{sakura['id']}/images", params={"limit": 2}).json()
    second = client.get(
        f"/api/characters/{sakura['id']}/images", params={"limit": 2, "cursor": first["nextCursor"]}
    ).json()
    third = client.get(
        f"/api/characters/{sakura['id']}/images",
        params={"limit": 2, "cursor": second["nextCursor"]},
    ).json()
    seen = [i["id"] for page in (first, second, third) for i in page["items"]]
    assert seen == list(reversed(made))
    assert third["nextCursor"] is None

    detail = client.get(f"/api/images/{made[0]}").json()
    assert detail["prompt"].startswith("scene 0")
    assert detail["model"] == "diving.safetensors" and detail["artStyle"] == "anime"
    assert detail["backend"] == "anime-cartoon-fantasy" and detail["modelHash"]
    assert detail["parameters"]["steps"] == 25 and detail["parameters"]["hires"] is True
    assert "Seed: " in detail["infotext"]

    bad = client.get(f"/api/characters/{sakura['id']}/images", params={"cursor": "garbage!"})
    assert bad.status_code == 422 and bad.json()["error"]["field"] == "cursor"
    too_many = client.get(f"/api/characters/{sakura['id']}/images", params={"limit": 1000})
    assert too_many.status_code == 422 and too_many.json()["error"]["field"] == "limit"


def test_deleting_an_image_and_a_character_removes_the_files(
    live: Live, sims: tuple[A1111Simulator, A1111Simulator]
) -> None:
    client = live.user("alice")
    sakura = create(client, "Sakura", "anime")
    ids = [generate(client, sakura).json()["images"][0]["id"] for _ in range(2)]
    store = live.container.store
    with live.container.db.session() as session:
        from charforge.db.models import Image

        paths = [store.path(session.get(Image, i).file_path) for i in ids]  # type: ignore[union-attr]
    assert all(p.exists() for p in paths)
    assert client.delete(f"/api/images/{ids[0]}").status_code == 204
    assert not paths[0].exists() and client.get(f"/api/images/{ids[0]}").status_code == 404
    assert client.delete(f"/api/characters/{sakura['id']}").status_code == 204
    assert not paths[1].exists()


def test_job_endpoint_reports_a_finished_job(
    live: Live, sims: tuple[A1111Simulator, A1111Simulator]
) -> None:
    client = live.user("alice")
    sakura = create(client, "Sakura", "anime")
    result = generate(client, sakura, "by the sea").json()
    job = client.get(f"/api/jobs/{result['jobId']}").json()
    assert job["state"] == "succeeded" and job["attempts"] == 1
    assert job["prompt"] == "by the sea" and job["backend"] == "anime-cartoon-fantasy"
    assert job["images"] == result["images"]
    assert isinstance(httpx.get(f"{live.url}/openapi.json").json()["paths"], dict)
