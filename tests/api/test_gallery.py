"""The gallery over real HTTP, on SQLite and PostgreSQL: search and filters, favourites and
notes, keyset pages that never skip or repeat, bulk deletion; all owner-scoped."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
from sqlalchemy import select, update

from charforge.db.models import Image
from tests.api.test_generate import create
from tests.api.test_permissions import refused
from tests.conftest import Live
from tests.jobs.conftest import submit, wait_final


def make(client: httpx.Client, character: dict[str, Any], prompt: str, count: int = 1) -> list[str]:
    """Ids of ``count`` new images (newest first, as the gallery lists them)."""
    job = wait_final(client, submit(client, character["id"], prompt=prompt, count=count)["id"])
    assert job["state"] == "succeeded", job
    return [i["id"] for i in reversed(job["images"])]


def ids(response: httpx.Response) -> list[str]:
    assert response.status_code == 200, response.text
    return [i["id"] for i in response.json()["items"]]


def set_rows(live: Live, image_ids: list[str], **values: Any) -> None:
    with live.container.db.session() as session:
        session.execute(update(Image).where(Image.id.in_(image_ids)).values(**values))


def test_search_and_filters(live: Live) -> None:
    alice, bob = live.user("alice"), live.user("bob")
    sakura, alex = create(alice, "Sakura"), create(alice, "Alex", "realistic")
    garden = make(alice, sakura, "in a garden", count=3)
    beach = make(alice, sakura, "At the BEACH, 100% sun_light")
    umlaut = make(alice, sakura, "ÄRGER im Café")
    mountain = make(alice, alex, "on a mountain")
    make(bob, create(bob, "Bobby"), "at the beach")  # never in alice's answers
    everything = mountain + umlaut + beach + garden

    assert ids(alice.get("/api/images", params={"limit": 100})) == everything
    assert ids(alice.get("/api/images", params={"characterId": alex["id"]})) == mountain

    def found(**params: Any) -> list[str]:
        return ids(alice.get("/api/images", params={"limit": 100, **params}))

    # q: a case-insensitive substring of the prompt; % and _ are plain characters.
    assert found(q="beach") == beach
    assert found(q=" Beach ") == beach
    assert found(q="100% sun_") == beach
    assert found(q="0%_") == []
    assert found(q="ärger im café") == umlaut  # beyond ASCII, on SQLite too
    assert found(q="garden", characterId=alex["id"]) == []

    # favourites, art style, checkpoint
    alice.patch(f"/api/images/{garden[1]}", json={"favorite": True}).raise_for_status()
    assert found(favorite="true") == [garden[1]]
    assert found(favorite="false") == [i for i in everything if i != garden[1]]
    assert found(style="realistic") == mountain
    assert found(style="Anime") == umlaut + beach + garden
    assert found(model="cyberrealistic.safetensors") == mountain
    assert found(model="cyberrealistic") == mountain
    assert found(model="cyber") == []

    # dates: a day is included whole; a date and time is exact, in UTC unless it says so
    today = datetime.now(UTC).date()
    assert found(**{"from": today.isoformat()}) == everything
    assert found(to=today.isoformat()) == everything
    assert found(to=(today - timedelta(days=1)).isoformat()) == []
    set_rows(live, garden, created_at=datetime(2024, 5, 31, 23, 30))
    garden = sorted(garden, reverse=True)  # one time for all three: the id decides
    everything = mountain + umlaut + beach + garden
    assert found(**{"from": "2024-05-31", "to": "2024-05-31"}) == garden
    assert found(**{"from": "2024-06-01T01:30:00+02:00"}) == everything  # 23:30 UTC
    assert found(**{"from": "2024-06-01T01:30:01+02:00"}) == mountain + umlaut + beach
    assert found(to="2024-05-31T23:29:59Z") == []
    assert found(to="2024-05-31T23:30:00Z") == garden
    assert found(**{"from": "2024-06-01T00:00:00Z"}) == mountain + umlaut + beach

    # minScore: the consistency score kept as JSON on the image
    set_rows(live, [beach[0]], consistency={"score": 0.91, "method": "face"})
    set_rows(live, [umlaut[0]], consistency={"score": 0.42, "method": "face"})
    set_rows(live, [mountain[0]], consistency={"score": None, "reason": "no face"})
    assert found(minScore="0.5") == beach
    assert found(minScore="0.4") == umlaut + beach
    assert found(minScore="0") == umlaut + beach

    # bad values: 422 naming the parameter
    for params, field in (
        ({"style": "sepia"}, "style"),
        ({"from": "2024-13-01"}, "from"),
        ({"to": "yesterday"}, "to"),
        ({"from": "2024-06-02", "to": "2024-06-01"}, "to"),
        ({"minScore": "2"}, "minScore"),
        ({"minScore": "high"}, "minScore"),
        ({"favorite": "perhaps"}, "favorite"),
        ({"limit": "0"}, "limit"),
        ({"limit": "101"}, "limit"),
        ({"cursor": "not-a-cursor"}, "cursor"),
        ({"q": "x" * 201}, "q"),
    ):
        error = refused(alice.get("/api/images", params=params), 422, "validation_error")
        assert error["field"] == field, (params, error)
    # Another user's character is one that does not exist.
    error = refused(alice.get("/api/images", params={"characterId": "nope"}), 404, "not_found")
    assert error["field"] == "characterId"
    bobs = bob.get("/api/images").json()["items"][0]["characterId"]
    refused(alice.get("/api/images", params={"characterId": bobs}), 404, "not_found")


def test_pages_never_skip_or_repeat(live: Live) -> None:
    alice = live.user("alice")
    sakura = create(alice, "Sakura")
    made = make(alice, sakura, "in a garden", count=9) + make(alice, sakura, "at sea", count=8)
    # Ties on the time: the id decides, so a page boundary inside them loses nothing.
    set_rows(live, made[3:12], created_at=datetime(2024, 1, 1, 12, 0, 0))
    everything = ids(alice.get("/api/images", params={"limit": 100}))
    assert sorted(everything) == sorted(made) and len(everything) == 17
    for params in ({}, {"characterId": sakura["id"]}, {"q": "garden"}, {"favorite": "false"}):
        whole = ids(alice.get("/api/images", params={"limit": 100, **params}))
        seen: list[str] = []
        cursor: str | None = None
        pages = 0
        while True:
            query = {"limit": 4, **params, **({"cursor": cursor} if cursor else {})}
            page = alice.get("/api/images", params=query).json()
            seen += [i["id"] for i in page["items"]]
            cursor = page["nextCursor"]
            pages += 1
            if pages == 2:  # a new image meanwhile: newer than every page, so in none
                make(alice, sakura, "in a garden, later")
            if cursor is None:
                break
        assert seen == whole, params
        assert len(set(seen)) == len(seen)
    # The character's history pages the same way.
    history = alice.get(f"/api/characters/{sakura['id']}/images", params={"limit": 100})
    assert ids(history) == ids(alice.get("/api/images", params={"limit": 100}))


def test_favourite_and_note(live: Live) -> None:
    alice, bob = live.user("alice"), live.user("bob")
    (image,) = make(alice, create(alice, "Sakura"), "in a garden")
    url = f"/api/images/{image}"
    fresh = alice.get(url).json()
    assert fresh["favorite"] is False and fresh["note"] is None

    marked = alice.patch(url, json={"favorite": True, "note": "  the keeper  "})
    assert marked.status_code == 200, marked.text
    assert marked.json()["favorite"] is True and marked.json()["note"] == "the keeper"
    assert alice.get(url).json()["note"] == "the keeper"
    # Only what is sent changes.
    assert alice.patch(url, json={"favorite": False}).json()["note"] == "the keeper"
    assert alice.patch(url, json={"note": "x" * 2000}).json()["favorite"] is False
    assert alice.patch(url, json={"note": None}).json()["note"] is None
    alice.patch(url, json={"note": "again"}).raise_for_status()
    assert alice.patch(url, json={"note": ""}).json()["note"] is None
    assert alice.patch(url, json={}).status_code == 200

    for body, field in (
        ({"note": "x" * 2001}, "note"),
        ({"favourite": True}, "favourite"),
        ({"favorite": True, "stars": 5}, "stars"),
        ({"favorite": [1]}, "favorite"),
        ({"note": 7}, "note"),
    ):
        error = refused(alice.patch(url, json=body), 422, "validation_error")
        assert error["field"] == field, (body, error)

    refused(bob.patch(url, json={"favorite": True, "note": "mine"}), 404, "not_found")
    refused(alice.patch("/api/images/nope", json={"favorite": True}), 404, "not_found")
    after = alice.get(url).json()
    assert after["favorite"] is False and after["note"] is None


def test_bulk_delete(live: Live) -> None:
    alice, bob = live.user("alice"), live.user("bob")
    mine = make(alice, create(alice, "Sakura"), "in a garden", count=3)
    (theirs,) = make(bob, create(bob, "Bobby"), "at the beach")
    root = live.container.settings.data_dir
    with live.container.db.session() as session:
        rows = session.scalars(select(Image).where(Image.id.in_([*mine, theirs]))).all()
        files = {row.id: root / row.file_path for row in rows}
    assert all(f.is_file() for f in files.values())

    answer = alice.post(
        "/api/images/delete", json={"ids": [mine[0], theirs, mine[2], "nope", mine[0]]}
    )
    assert answer.status_code == 200, answer.text
    assert answer.json() == {"deleted": [mine[0], mine[2]], "notFound": [theirs, "nope"]}
    assert not files[mine[0]].exists() and not files[mine[2]].exists()
    assert files[mine[1]].is_file() and files[theirs].is_file()
    assert ids(alice.get("/api/images")) == [mine[1]]
    assert bob.get(f"/api/images/{theirs}/file").status_code == 200

    # Nothing of the caller's among them: 404, as for one image that is not yours.
    error = refused(alice.post("/api/images/delete", json={"ids": [theirs]}), 404, "not_found")
    assert error["notFound"] == [theirs]
    refused(alice.post("/api/images/delete", json={"ids": [mine[0]]}), 404, "not_found")
    for body, field in (
        ({"ids": []}, "ids"),
        ({"ids": [f"id-{n}" for n in range(201)]}, "ids"),
        ({"ids": mine[1]}, "ids"),
        ({"ids": [""]}, "ids[0]"),
        ({"ids": [mine[1]], "all": True}, "all"),
        ({}, "ids"),
    ):
        error = refused(alice.post("/api/images/delete", json=body), 422, "validation_error")
        assert error["field"] == field, (body, error)
    assert ids(alice.get("/api/images")) == [mine[1]]
    assert ids(bob.get("/api/images")) == [theirs]
