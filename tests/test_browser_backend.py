"""The app in headless Chromium against a model server started by the test (ZIGZAG_VIZ_BACKEND and
ZIGZAG_VIZ_TOKEN): the sidebar says where the model runs, the Compare page runs on the server with its
progress, and Cancel stops the server's job and leaves the page usable; Cancel also stops an in-process run."""

import re
import time

import httpx
import pytest
from conftest import finished_run, serving_app

pytestmark = [pytest.mark.slow, pytest.mark.browser]


@pytest.fixture(scope="module")
def remote_app(served):
    url, token_file, _ = served
    token = token_file.read_text().strip()
    with serving_app(ZIGZAG_VIZ_BACKEND=url, ZIGZAG_VIZ_TOKEN=token) as app:
        yield app, url, token


def _jobs_on_server(url: str, token: str) -> int:
    return httpx.get(f"{url}/models", headers={"Authorization": f"Bearer {token}"}, timeout=10).json()["models"][0]["jobs"]


def test_compare_page_runs_on_the_server_and_cancel_stops_its_job(browser, remote_app, screenshot):
    app, url, token = remote_app
    page = browser.new_page(viewport={"width": 1500, "height": 1000})
    page.goto(f"{app}/Compare")
    page.get_by_role("button", name="Run").wait_for(timeout=60_000)
    page.get_by_text("tiny on cpu · float32").wait_for(timeout=30_000)
    page.get_by_role("button", name="Run").click()
    finished_run(page, 180_000)
    content = page.content()
    assert "Traceback" not in content and f"in {url}" not in content  # the status box closed when done
    for method in ("zigzag", "pyramid", "uniform"):
        assert page.locator(".zz-head", has_text=method).count() == 1
    screenshot(page, "compare_on_server.png")

    tokens = page.get_by_role("spinbutton", name="Max new tokens")
    tokens.fill("256")
    tokens.press("Enter")
    page.get_by_role("button", name="Run").click()
    page.get_by_text("compress and decode").first.wait_for(timeout=120_000)
    assert _jobs_on_server(url, token) == 1
    page.get_by_role("button", name="Cancel").click()
    page.get_by_text("Run cancelled").wait_for(timeout=60_000)
    deadline = time.monotonic() + 30
    while _jobs_on_server(url, token) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert _jobs_on_server(url, token) == 0
    assert page.get_by_text("Answers side by side").count() == 1  # the last results stay
    assert "Traceback" not in page.content()
    page.close()


def test_cancel_stops_an_in_process_run_and_the_next_run_works(browser, app_url):
    page = browser.new_page(viewport={"width": 1500, "height": 1000})
    page.goto(f"{app_url}/Compare")
    page.get_by_role("button", name="Run").wait_for(timeout=60_000)
    page.get_by_role("combobox", name="Model").click()
    page.get_by_role("option", name="tiny", exact=True).click()
    tokens = page.get_by_role("spinbutton", name="Max new tokens")
    tokens.fill("256")
    tokens.press("Enter")
    page.get_by_role("button", name="Run").click()
    page.get_by_text("compress and decode").first.wait_for(timeout=120_000)
    page.get_by_role("button", name="Cancel").click()
    page.get_by_text("Run cancelled").wait_for(timeout=60_000)
    assert page.get_by_text(re.compile(r"tiny on cpu · \d+ prompt tokens")).count() == 0  # nothing of the cancelled run
    tokens.fill("4")
    tokens.press("Enter")
    page.get_by_role("button", name="Run").click()  # the model's lock was released by the cancelled run
    finished_run(page, 120_000)
    assert "Traceback" not in page.content()
    page.close()


def test_five_sessions_run_at_once_each_sees_it_is_queued_and_all_finish(browser, app_url, screenshot):
    """Five browser sessions press Run on one in-process model at once: they take turns, a waiting page says how
    many runs are ahead of it, and every page gets its answers (no deadlock, nobody waits forever)."""
    contexts = [browser.new_context(viewport={"width": 1280, "height": 900}) for _ in range(5)]
    pages = [context.new_page() for context in contexts]
    for index, page in enumerate(pages):
        page.goto(f"{app_url}/Compare")
        page.get_by_role("button", name="Run").wait_for(timeout=60_000)
        page.get_by_role("combobox", name="Model").click()
        page.get_by_role("option", name="tiny", exact=True).click()
        tokens = page.get_by_role("spinbutton", name="Max new tokens")
        tokens.fill(str(200 + index))  # long enough to queue; a run of its own each: the row cache serves none
        tokens.press("Enter")
        page.get_by_role("button", name="Run").wait_for(timeout=60_000)
    for page in pages:
        page.get_by_role("button", name="Run").click()
    deadline = time.monotonic() + 120
    while not any(page.get_by_text("run(s) ahead on tiny in this app").count() for page in pages):
        assert time.monotonic() < deadline, "no page said it was waiting"
        pages[0].wait_for_timeout(100)
    waiting = next(page for page in pages if page.get_by_text("run(s) ahead on tiny in this app").count())
    screenshot(waiting, "compare_five_sessions_waiting.png")
    for page in pages:
        finished_run(page, 300_000)
        assert "Traceback" not in page.content()
    for context in contexts:
        context.close()
