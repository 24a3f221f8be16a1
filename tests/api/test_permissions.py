"""Per-user permissions over real HTTP: two users and an admin, managed through the admin API
and the CLI, every change read back from the audit log."""

from __future__ import annotations

from typing import Any

import httpx
import pytest

from charforge.simulator import A1111Simulator
from tests.api.test_generate import create, generate
from tests.conftest import Live
from tests.test_cli import cli_env, run  # noqa: F401 - cli_env is a fixture used below

Sims = tuple[A1111Simulator, A1111Simulator]


def grant(admin: httpx.Client, name: str, **perms: Any) -> dict[str, Any]:
    response = admin.patch(f"/api/admin/users/{name}", json={"permissions": perms})
    assert response.status_code == 200, response.text
    return dict(response.json())


def refused(response: httpx.Response, status: int, code: str) -> dict[str, Any]:
    assert response.status_code == status, response.text
    error: dict[str, Any] = response.json()["error"]
    assert error["code"] == code
    return error


def no_generation(sims: Sims) -> None:
    assert sims[0].txt2img_bodies() == [] and sims[1].txt2img_bodies() == []


def test_non_admins_cannot_reach_admin_routes(live: Live) -> None:
    alice = live.user("alice")
    live.user("root", admin=True)
    for method, path in [
        ("GET", "/api/admin/users"),
        ("GET", "/api/admin/users/root"),
        ("PATCH", "/api/admin/users/alice"),
        ("GET", "/api/admin/audit"),
    ]:
        body = {"permissions": {"nsfw": True}} if method == "PATCH" else None
        refused(alice.request(method, path, json=body), 403, "forbidden")
        refused(live.anonymous().request(method, path, json=body), 401, "unauthorized")
    # Nothing changed, nothing audited.
    root = live.client({"Authorization": f"Bearer {live.tokens['root']}"})
    assert root.get("/api/admin/users/alice").json()["permissions"]["nsfw"] is False
    assert root.get("/api/admin/audit").json()["items"] == []


def test_nsfw_needs_the_permission_and_only_for_that_user(live: Live, sims: Sims) -> None:
    root, alice, bob = live.user("root", admin=True), live.user("alice"), live.user("bob")
    a, b = create(alice, "Ann"), create(bob, "Ben")
    error = refused(generate(alice, a, nsfw=True), 403, "forbidden")
    assert error["field"] == "nsfw" and "administrator" in error["hint"]
    no_generation(sims)
    assert generate(alice, a).status_code == 200  # without nsfw: allowed

    after = grant(root, "alice", nsfw=True)
    assert after["permissions"]["nsfw"] is True
    assert generate(alice, a, nsfw=True).status_code == 200
    refused(generate(bob, b, nsfw=True), 403, "forbidden")  # bob was not granted it
    assert generate(root, create(root, "Root"), nsfw=True).status_code == 200  # admins may


def test_style_and_checkpoint_allow_lists(live: Live, sims: Sims) -> None:
    root, alice = live.user("root", admin=True), live.user("alice")
    anime, real = create(alice, "Ann", "anime"), create(alice, "Rea", "realistic")
    grant(root, "alice", styles=["Anime"])  # stored folded: styles are case-insensitive
    error = refused(generate(alice, real), 403, "forbidden")
    assert "'realistic'" in error["message"] and error["field"] == "artStyle"
    # Style transfer renders on the target's route: its style is checked too.
    transfer = generate(alice, anime, artStyle="realistic", styleTransfer=True)
    assert "'realistic'" in refused(transfer, 403, "forbidden")["message"]
    no_generation(sims)
    assert generate(alice, anime).status_code == 200

    grant(root, "alice", checkpoints=["other.safetensors"])
    error = refused(generate(alice, anime), 403, "forbidden")
    assert "diving.safetensors" in error["message"] and error["field"] == "model"
    grant(root, "alice", checkpoints=["diving.safetensors"], styles=None)  # null: every style
    assert generate(alice, anime).status_code == 200
    assert "cyberrealistic" in refused(generate(alice, real), 403, "forbidden")["message"]


@pytest.mark.parametrize(
    ("permissions", "field"),
    [
        ({"admin": True}, "admin"),
        ({"nsfw": "yes"}, "nsfw"),
        ({"nsfw": None}, "nsfw"),
        ({"styles": "anime"}, "styles"),
        ({"styles": [""]}, "styles"),
        ({"imagesPerDay": -1}, "imagesPerDay"),
        ({"maxActiveJobs": 10**7}, "maxActiveJobs"),
    ],
)
def test_bad_patches_are_422_naming_the_key(
    live: Live, permissions: dict[str, Any], field: str
) -> None:
    root = live.user("root", admin=True)
    live.user("alice")
    response = root.patch("/api/admin/users/alice", json={"permissions": permissions})
    error = refused(response, 422, "validation_error")
    assert field in (error["field"] or ""), error
    assert root.get("/api/admin/audit").json()["items"] == []


def test_unknown_user_and_unknown_body_keys(live: Live) -> None:
    root = live.user("root", admin=True)
    refused(root.get("/api/admin/users/nobody"), 404, "not_found")
    refused(root.patch("/api/admin/users/nobody", json={"permissions": {}}), 404, "not_found")
    live.user("alice")
    refused(root.patch("/api/admin/users/alice", json={"isAdmin": True}), 422, "validation_error")


def test_absent_keys_stay_and_the_audit_log_reads_back(live: Live) -> None:
    root = live.user("root", admin=True)
    live.user("alice")
    grant(root, "alice", nsfw=True, imagesPerDay=5)
    after = grant(root, "alice", styles=["anime"])
    assert after["permissions"] == {
        "nsfw": True,
        "styles": ["anime"],
        "checkpoints": None,
        "imagesPerDay": 5,
        "maxActiveJobs": None,
    }
    listed = root.get("/api/admin/users").json()["items"]
    assert [u["name"] for u in listed] == ["root", "alice"]

    first = root.get("/api/admin/audit", params={"limit": 1})
    assert first.status_code == 200
    newest = first.json()["items"]
    assert len(newest) == 1 and first.json()["nextCursor"]
    entry = newest[0]
    assert entry["actor"] == "root" and entry["action"] == "permissions.update"
    assert entry["target"] == "user:alice"
    assert entry["before"]["styles"] is None and entry["after"]["styles"] == ["anime"]
    older = root.get(
        "/api/admin/audit", params={"limit": 5, "cursor": first.json()["nextCursor"]}
    ).json()
    assert len(older["items"]) == 1 and older["nextCursor"] is None
    assert older["items"][0]["before"]["nsfw"] is False
    assert older["items"][0]["after"]["nsfw"] is True
    assert older["items"][0]["after"]["imagesPerDay"] == 5
    refused(root.get("/api/admin/audit", params={"cursor": "x"}), 422, "validation_error")


def test_cli_sets_permissions_audited_as_cli(
    cli_env: dict[str, str],  # noqa: F811 - the fixture
    live_factory: Any,
    sims: Sims,
) -> None:
    live = live_factory(sims[0].url, sims[1].url)  # the same database as the CLI
    root = live.user("root", admin=True)
    alice = live.user("alice")
    done = run(
        ["users", "set", "alice", "--nsfw", "--styles", "anime, fantasy", "--images-per-day", "3"],
        cli_env,
    )
    assert done.returncode == 0, done.stderr
    perms = root.get("/api/admin/users/alice").json()["permissions"]
    assert perms["nsfw"] is True and perms["styles"] == ["anime", "fantasy"]
    assert perms["imagesPerDay"] == 3
    assert generate(alice, create(alice, "Ann"), nsfw=True).status_code == 200
    entry = root.get("/api/admin/audit").json()["items"][0]
    assert entry["actor"] == "cli" and entry["target"] == "user:alice"

    cleared = run(["users", "set", "alice", "--all-styles", "--no-image-limit"], cli_env)
    assert cleared.returncode == 0, cleared.stderr
    perms = root.get("/api/admin/users/alice").json()["permissions"]
    assert perms["styles"] is None and perms["imagesPerDay"] is None and perms["nsfw"] is True
    both = run(["users", "set", "alice", "--styles", "anime", "--all-styles"], cli_env)
    assert both.returncode != 0 and "not both" in both.stderr + both.stdout
    missing = run(["users", "set", "nobody", "--nsfw"], cli_env)
    assert missing.returncode != 0 and "nobody" in missing.stderr + missing.stdout
