"""Quotas (images per rolling 24 hours, active jobs) and the sign-in throttle, over real HTTP
with two users and an admin; the windows themselves on a fake clock."""

from __future__ import annotations

import re
import time
from datetime import timedelta
from typing import Any

import httpx
import pytest

from charforge.db.models import utcnow
from charforge.errors import LoginThrottled
from charforge.services import quotas, users
from tests.api.test_generate import create, generate
from tests.api.test_permissions import Sims, grant, no_generation, refused
from tests.conftest import Live


def submit_job(client: httpx.Client, character: dict[str, Any], **extra: Any) -> httpx.Response:
    return client.post(
        "/api/jobs", json={"prompt": "in a garden", "characterId": character["id"], **extra}
    )


def test_images_per_day_override_is_429_with_retry_after(live: Live, sims: Sims) -> None:
    root, alice, bob = live.user("root", admin=True), live.user("alice"), live.user("bob")
    a, b = create(alice, "Ann"), create(bob, "Ben")
    grant(root, "alice", imagesPerDay=2)
    assert generate(alice, a).status_code == 200
    # A batch that would overshoot is refused whole, before anything runs.
    batch = submit_job(alice, a, count=2)
    error = refused(batch, 429, "quota_exceeded")
    assert "CHARFORGE_QUOTA_IMAGES_PER_DAY" in error["hint"] and "2" in error["message"]
    assert generate(alice, a).status_code == 200
    sims[1].reset()
    third = generate(alice, a)
    refused(third, 429, "quota_exceeded")
    # The oldest image leaves the 24-hour window in a little under a day.
    assert 86_000 < int(third.headers["Retry-After"]) <= 86_400
    assert third.json()["error"]["retryAfter"] == int(third.headers["Retry-After"])
    no_generation(sims)
    assert generate(bob, b).status_code == 200  # bob's own count is untouched
    used = root.get("/api/admin/users/alice").json()["usage"]
    assert used == {"imagesToday": 2, "imagesPerDay": 2, "activeJobs": 0, "maxActiveJobs": None}
    grant(root, "alice", imagesPerDay=None)  # null: no limit
    assert generate(alice, a).status_code == 200


def test_global_quota_and_a_user_override(live_factory: Any, sims: Sims) -> None:
    live = live_factory(sims[0].url, sims[1].url, quota_images_per_day=1)
    root, alice, bob = live.user("root", admin=True), live.user("alice"), live.user("bob")
    a, b = create(alice, "Ann"), create(bob, "Ben")
    assert generate(alice, a).status_code == 200
    refused(generate(alice, a), 429, "quota_exceeded")
    grant(root, "alice", imagesPerDay=3)  # an override beats the default, either way
    assert generate(alice, a).status_code == 200
    assert generate(bob, b).status_code == 200
    refused(generate(bob, b), 429, "quota_exceeded")


def test_active_jobs_limit(live: Live, sims: Sims) -> None:
    root, alice = live.user("root", admin=True), live.user("alice")
    a = create(alice, "Ann")
    grant(root, "alice", maxActiveJobs=0)
    error = refused(submit_job(alice, a), 429, "too_many_jobs")
    assert "CHARFORGE_MAX_ACTIVE_JOBS_PER_USER" in error["hint"]
    grant(root, "alice", maxActiveJobs=1)
    sims[1].faults.delay_seconds = 30.0  # the first job stays running until cancelled
    first = submit_job(alice, a)
    assert first.status_code == 202, first.text
    second = submit_job(alice, a)
    refused(second, 429, "too_many_jobs")
    assert int(second.headers["Retry-After"]) >= 1
    assert root.get("/api/admin/users/alice").json()["usage"]["activeJobs"] == 1
    job_id = first.json()["id"]
    # Cancel once it runs (a cancel racing the claim is answered 409 by the jobs API).
    for _ in range(200):
        if alice.get(f"/api/jobs/{job_id}").json()["state"] == "running":
            break
        time.sleep(0.01)
    cancelled = alice.post(f"/api/jobs/{job_id}/cancel")
    assert cancelled.json().get("state") == "cancelled", cancelled.text
    sims[1].faults.delay_seconds = 0.0
    assert submit_job(alice, a).status_code == 202


def test_rolling_window_on_a_fake_clock(live: Live) -> None:
    live.user("alice")
    alice_client = live.client({"Authorization": f"Bearer {live.tokens['alice']}"})
    a = create(alice_client, "Ann")
    assert generate(alice_client, a).status_code == 200
    limits = quotas.Limits(images_per_day=1)
    with live.container.db.session() as session:
        alice = users.require_user(session, "alice")
        with pytest.raises(quotas.QuotaExceeded):
            quotas.check(session, alice, limits, 1)
        quotas.check(session, alice, limits, 1, now=utcnow() + timedelta(hours=24, seconds=1))


def signin(client: httpx.Client, name: str, password: str) -> httpx.Response:
    page = client.get("/login")
    token = re.search(r'name="csrf_token" value="([^"]+)"', page.text)
    assert token is not None
    return client.post(
        "/login",
        data={"name": name, "password": password, "csrf_token": token.group(1)},
        headers={"Accept": "text/html"},
    )


def _error_text(response: httpx.Response) -> str:
    found = re.search(r'<p class="error" role="alert">([^<]*)</p>', response.text)
    assert found is not None, response.text
    return found.group(1)


def test_sign_in_throttle_over_http_across_servers(live_factory: Any, sims: Sims) -> None:
    live = live_factory(sims[0].url, sims[1].url, login_attempts=3, login_window_seconds=600)
    live.user("alice")
    browser = live.anonymous()
    for _ in range(3):
        assert signin(browser, "alice", "wrong password").status_code == 401
    right = signin(browser, "alice", "password-alice")
    assert right.status_code == 429
    assert 590 <= int(right.headers["Retry-After"]) <= 600
    assert "Too many failed sign-ins" in _error_text(right)
    # An account that does not exist: the very same answer, so nothing is revealed.
    ghost = signin(browser, "ghost", "whatever")
    assert ghost.status_code == 429 and _error_text(ghost) == _error_text(right)
    # The failures live in the database: another server on it throttles too.
    other = live_factory(sims[0].url, sims[1].url, login_attempts=3, login_window_seconds=600)
    assert signin(other.anonymous(), "alice", "password-alice").status_code == 429


def test_throttle_scopes_window_and_no_enumeration_on_a_fake_clock(live: Live) -> None:
    live.user("alice")
    t0 = utcnow()

    def attempt(name: str, password: str, address: str, at: float = 0.0) -> bool:
        with live.container.db.session() as session:
            user = users.authenticate(
                session,
                name,
                password,
                address,
                attempts=2,
                window=60,
                now=t0 + timedelta(seconds=at),
            )
            return user is not None

    # Per account: failures from two addresses add up.
    assert not attempt("alice", "x", "10.0.0.1")
    assert not attempt("Alice", "x", "10.0.0.2")  # names fold: one account
    with pytest.raises(LoginThrottled) as caught:
        attempt("alice", "password-alice", "10.0.0.3", at=10)
    assert caught.value.retry_after == 50
    assert attempt("alice", "password-alice", "10.0.0.3", at=61)  # the window moved on
    # Per address: two accounts from one address trip it, whether they exist or not.
    assert not attempt("ghost", "x", "10.0.0.9", at=100)
    assert not attempt("nobody", "x", "10.0.0.9", at=101)
    with pytest.raises(LoginThrottled):
        attempt("alice", "password-alice", "10.0.0.9", at=102)
    # An unknown account is throttled exactly like a known one.
    for name in ("ghost2", "alice"):
        for at in (200, 201):
            assert not attempt(name, "x", f"10.1.0.{at}", at=at)
    with pytest.raises(LoginThrottled) as unknown:
        attempt("ghost2", "x", "10.2.0.1", at=202)
    with pytest.raises(LoginThrottled) as known:
        attempt("alice", "x", "10.2.0.2", at=202)
    assert unknown.value.to_envelope() == known.value.to_envelope()
    # A success clears its account's failures.
    assert not attempt("alice", "x", "10.3.0.1", at=400)
    assert attempt("alice", "password-alice", "10.3.0.2", at=401)
    assert not attempt("alice", "x", "10.3.0.3", at=402)
    assert attempt("alice", "password-alice", "10.3.0.4", at=403)


def test_account_page_shows_usage(live_factory: Any, sims: Sims) -> None:
    live = live_factory(sims[0].url, sims[1].url, max_active_jobs_per_user=4)
    root, alice = live.user("root", admin=True), live.user("alice")
    grant(root, "alice", imagesPerDay=5)
    assert generate(alice, create(alice, "Ann")).status_code == 200
    browser = live.anonymous()
    assert signin(browser, "alice", "password-alice").status_code in (200, 303)
    page = browser.get("/account")
    text = re.sub(r"\s+", " ", page.text)
    assert "Images today (last 24 hours): 1 of 5" in text
    assert "Active jobs: 0 of 4" in text
