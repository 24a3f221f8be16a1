"""The Generate page as a job: queue place and sampling steps live, cancel, errors inline."""

from __future__ import annotations

import re
import time
from typing import Any

import httpx
from playwright.sync_api import expect
from sqlalchemy import func, select

from charforge.db import images as image_rows
from charforge.db.models import Image, Job
from charforge.services import users
from charforge.simulator import A1111Simulator
from tests.web.conftest import shot
from tests.web.test_pages import first_run, new_character, sign_in

STEP_TEXT = re.compile(r"^Generating… Step \d+/25 \(\d+%\)$")

# Every text the progress line shows, with whether the result was hidden then, in order.
RECORD_PROGRESS = """() => {
  window.progressLog = [];
  const progress = document.getElementById("progress");
  const result = document.getElementById("result");
  new MutationObserver(() => window.progressLog.push(
    { text: progress.textContent, resultHidden: result.hidden }
  )).observe(progress, { childList: true, characterData: true, subtree: true });
}"""


def requests_of(page: Any) -> list[str]:
    seen: list[str] = []
    page.on("request", lambda request: seen.append(f"{request.method} {request.url}"))
    return seen


def submitted_job(page: Any) -> str:
    """Click Generate and return the id of the job the page submitted."""
    with page.expect_response(
        lambda r: r.url.endswith("/generate-images/jobs") and r.request.method == "POST"
    ) as info:
        page.get_by_role("button", name="Generate").click()
    response = info.value
    assert response.status == 202, response.text()
    job_id = response.json()["id"]
    assert response.headers["location"] == f"/generate-images/jobs/{job_id}"
    return str(job_id)


def image_count(container: Any) -> int:
    with container.db.session() as session:
        return int(session.scalar(select(func.count()).select_from(Image)) or 0)


def test_steps_show_live_before_the_image(
    web: Any, new_page: Any, sims: tuple[A1111Simulator, A1111Simulator]
) -> None:
    server, container = web
    page = new_page(width=390)  # a phone
    seen = requests_of(page)
    first_run(page, server.url)
    alex = new_character(page, server.url, "Alex", "realistic")
    page.goto(f"{server.url}/generate-images?characterId={alex}")
    page.get_by_label("Prompt", exact=True).fill("Alex reading in a library")
    page.evaluate(RECORD_PROGRESS)
    sims[0].faults.delay_seconds = 3.0

    job_id = submitted_job(page)
    progress = page.locator("#progress")
    expect(progress).to_have_text(STEP_TEXT, timeout=15000)
    expect(page.get_by_role("button", name="Generate")).to_be_disabled()
    expect(page.get_by_role("button", name="Cancel")).to_be_visible()
    expect(page.locator("#progress-bar")).to_be_visible()
    shot(page, "11-generating-steps-phone")

    expect(page.locator("#result")).to_be_visible(timeout=20000)
    expect(progress).to_have_text(re.compile(r"^Done in \d+ s$"))
    expect(page.locator("#result-caption")).to_contain_text("cyberrealistic.safetensors")
    expect(page.get_by_role("button", name="Generate")).to_be_enabled()
    expect(page.get_by_role("button", name="Cancel")).to_be_hidden()
    expect(page.locator("#result-heading")).to_be_focused()
    image = page.locator("#result-image")
    expect(image).to_have_attribute("src", re.compile(r"^/images/[^/]+/file$"))
    page.wait_for_function("document.getElementById('result-image').naturalWidth > 0")
    expect(page.locator("#progress-status")).to_have_text(re.compile(r"^Done in \d+ s$"))
    shot(page, "12-generated-by-job-phone")

    log = page.evaluate("window.progressLog")
    texts = [entry["text"] for entry in log]
    steps = [i for i, entry in enumerate(log) if STEP_TEXT.match(entry["text"])]
    done = next(i for i, text in enumerate(texts) if text.startswith("Done in"))
    assert steps and steps[0] < done, texts
    assert all(log[i]["resultHidden"] for i in steps), log
    assert all(entry["resultHidden"] for entry in log[:done]), log

    # The page followed the job; it did not wait on the blocking endpoint.
    assert f"GET {server.url}/generate-images/jobs/{job_id}/events" in seen
    assert not any(url.endswith("/generate-images/run") for url in seen)
    with container.db.session() as session:
        images = image_rows.images_of_job(session, job_id)
        assert [f"/images/{i.id}/file" for i in images] == [image.get_attribute("src")]


def test_a_second_job_shows_its_place_in_the_queue_and_several_images(
    web: Any, new_page: Any, sims: tuple[A1111Simulator, A1111Simulator]
) -> None:
    server, _ = web
    first = new_page()
    first_run(first, server.url)
    alex = new_character(first, server.url, "Alex", "realistic")
    second = first.context.new_page()
    for page in (first, second):
        page.goto(f"{server.url}/generate-images?characterId={alex}")
        page.get_by_label("Prompt", exact=True).fill("Alex at the harbour")
    sims[0].faults.delay_seconds = 3.0
    submitted_job(first)
    expect(first.locator("#progress")).to_have_text(STEP_TEXT, timeout=15000)

    second.get_by_text("Advanced settings").click()
    second.get_by_label("Number of images").fill("2")
    submitted_job(second)
    expect(second.locator("#progress")).to_have_text("Queued — 0 ahead")
    expect(second.locator("#progress-status")).to_have_text("Queued — 0 ahead")
    expect(first.locator("#result")).to_be_visible(timeout=20000)
    expect(second.locator("#progress")).to_have_text(STEP_TEXT, timeout=15000)
    expect(second.locator("#result")).to_be_visible(timeout=20000)
    expect(second.locator("#result-heading")).to_have_text("Results (2 images)")
    expect(second.locator("#result-more img")).to_have_count(1)


def test_cancel_a_running_generation(
    web: Any, new_page: Any, sims: tuple[A1111Simulator, A1111Simulator]
) -> None:
    server, container = web
    page = new_page()
    first_run(page, server.url)
    alex = new_character(page, server.url, "Alex", "realistic")
    page.goto(f"{server.url}/generate-images?characterId={alex}")
    page.get_by_label("Prompt", exact=True).fill("Alex on a very slow day")
    sims[0].faults.delay_seconds = 30.0  # /interrupt cuts it short

    job_id = submitted_job(page)
    progress = page.locator("#progress")
    expect(progress).to_have_text(STEP_TEXT, timeout=15000)  # really running on the GPU
    cancel = page.get_by_role("button", name="Cancel")
    cancel.click()
    expect(progress).to_have_text("Cancelled", timeout=10000)
    expect(page.locator("#progress-status")).to_have_text("Cancelled")
    expect(cancel).to_be_hidden()
    generate = page.get_by_role("button", name="Generate")
    expect(generate).to_be_enabled()
    expect(generate).to_be_focused()
    expect(page.locator("#result")).to_be_hidden()
    expect(page.locator("#form-error")).to_be_hidden()
    shot(page, "13-cancelled")

    # The backend was told to stop, and the runner stored nothing after it did.
    assert any(r.path == "/sdapi/v1/interrupt" for r in sims[0].requests)
    deadline = time.monotonic() + 10
    while _generating(sims[0]):
        assert time.monotonic() < deadline, "the simulator is still generating"
        time.sleep(0.1)
    time.sleep(1.0)  # a runner that wrongly stored its images would have done so by now
    with container.db.session() as session:
        job = session.get(Job, job_id)
        assert job is not None and job.state == "cancelled"
        assert list(image_rows.images_of_job(session, job_id)) == []
    assert image_count(container) == 0
    page.goto(f"{server.url}/characters/{alex}/images")
    expect(page.locator("ul.thumbs img")).to_have_count(0)


def _generating(sim: A1111Simulator) -> bool:
    state = httpx.get(sim.url + "/sdapi/v1/progress", timeout=5).json()["state"]
    return bool(state["job_count"])


def test_validation_errors_still_mark_the_field_and_submit_nothing(
    web: Any, new_page: Any, sims: tuple[A1111Simulator, A1111Simulator]
) -> None:
    server, container = web
    page = new_page(width=390)
    first_run(page, server.url)
    sakura = new_character(page, server.url, "Sakura", "anime")
    page.goto(f"{server.url}/generate-images?characterId={sakura}")
    page.get_by_label("Prompt", exact=True).fill("Sakura in the rain")
    page.get_by_text("Advanced settings").click()
    page.get_by_label("Width").fill("500")
    generate = page.get_by_role("button", name="Generate")
    with page.expect_response(lambda r: r.url.endswith("/generate-images/jobs")) as info:
        generate.click()
    assert info.value.status == 422
    alert = page.locator("#form-error")
    expect(alert).to_contain_text("multiple of 8")
    expect(page.get_by_label("Width")).to_have_attribute("aria-invalid", "true")
    expect(page.get_by_label("Width")).to_have_attribute("aria-describedby", "form-error")
    expect(page.locator("#progress")).to_have_text("")
    expect(generate).to_be_enabled()
    expect(generate).to_be_focused()
    expect(page.get_by_role("button", name="Cancel")).to_be_hidden()
    expect(page.get_by_label("Prompt", exact=True)).to_have_value("Sakura in the rain")

    page.get_by_label("Width").fill("512")
    page.get_by_label("Number of images").fill("17")
    generate.click()
    expect(page.get_by_label("Number of images")).to_have_attribute("aria-invalid", "true")
    expect(page.get_by_label("Width")).not_to_have_attribute("aria-invalid", "true")
    with container.db.session() as session:
        assert session.scalar(select(func.count()).select_from(Job)) == 0
    shot(page, "14-job-validation-phone")

    page.get_by_label("Number of images").fill("1")
    generate.click()
    expect(page.locator("#result")).to_be_visible(timeout=20000)
    expect(alert).to_be_hidden()
    expect(page.locator("[aria-invalid]")).to_have_count(0)


def test_job_endpoints_need_the_session_csrf_and_the_owner(
    web: Any, new_page: Any, sims: tuple[A1111Simulator, A1111Simulator]
) -> None:
    server, container = web
    base = server.url
    ada = new_page()
    first_run(ada, base)
    sakura = new_character(ada, base, "Sakura", "anime")
    ada.goto(f"{base}/generate-images?characterId={sakura}")
    ada.get_by_label("Prompt", exact=True).fill("tea ceremony")
    job_id = submitted_job(ada)
    expect(ada.locator("#result")).to_be_visible(timeout=20000)
    job_url = f"{base}/generate-images/jobs/{job_id}"

    mine = ada.request.get(job_url)
    assert mine.status == 200 and mine.json()["state"] == "succeeded"
    events = ada.request.get(job_url + "/events")
    assert events.status == 200
    assert events.headers["content-type"].startswith("text/event-stream")
    assert "event: done" in events.text() and job_id in events.text()
    no_csrf = ada.request.post(
        f"{base}/generate-images/jobs", data={"characterId": sakura, "prompt": "forged"}
    )
    assert no_csrf.status == 403 and no_csrf.json()["error"]["code"] == "csrf_failed"
    assert ada.request.post(job_url + "/cancel").status == 403
    csrf = ada.locator("#generate-form").get_attribute("data-csrf")
    finished = ada.request.post(job_url + "/cancel", headers={"X-CSRF-Token": csrf})
    assert finished.status == 409  # it has already succeeded

    with container.db.session() as session:
        users.create_user(session, "bob", "bob-password")
    bob = new_page()
    sign_in(bob, base, "bob", "bob-password")
    bob.goto(base + "/characters/new")
    bob_csrf = bob.locator("#main input[name=csrf_token]").get_attribute("value")
    for response in (
        bob.request.get(job_url),
        bob.request.get(job_url + "/events"),
        bob.request.post(job_url + "/cancel", headers={"X-CSRF-Token": bob_csrf}),
    ):
        assert response.status == 404
        assert "tea ceremony" not in response.text()
    bob_submit = bob.request.post(
        f"{base}/generate-images/jobs",
        data={"characterId": sakura, "prompt": "borrowed"},
        headers={"X-CSRF-Token": bob_csrf},
    )
    assert bob_submit.status == 404

    anonymous = new_page()
    for response in (
        anonymous.request.get(job_url),
        anonymous.request.get(job_url + "/events"),
        anonymous.request.post(job_url + "/cancel"),
    ):
        assert response.status == 401
    with container.db.session() as session:
        job = session.get(Job, job_id)
        assert job is not None and job.state == "succeeded"
        assert len(image_rows.images_of_job(session, job_id)) == 1
