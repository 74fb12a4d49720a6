"""The app in headless Chromium: open the Compare page, run the tiny model, and keep a screenshot."""

import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.browser]

ROOT = Path(__file__).resolve().parents[1]
ARTIFACTS = ROOT / "tests" / "artifacts"
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
    "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage",
]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def app_url():
    port = _free_port()
    env = dict(os.environ, ZIGZAG_VIZ_DEVICE="cpu", TQDM_DISABLE="1", TRANSFORMERS_VERBOSITY="error")
    server = subprocess.Popen(
        [sys.executable, "-m", "streamlit", "run", "app.py", "--server.headless", "true", "--server.port", str(port),
         "--server.address", "127.0.0.1", "--browser.gatherUsageStats", "false"],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 60
    while time.time() < deadline:
        try:
            if urllib.request.urlopen(f"{url}/_stcore/health", timeout=2).status == 200:
                break
        except OSError:
            time.sleep(0.5)
    else:
        server.kill()
        pytest.fail("streamlit did not start: " + (server.stdout.read() if server.stdout else ""))
    yield url
    server.terminate()
    server.wait(timeout=20)


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    assert Path(CHROMIUM).exists(), "Debian chromium is missing: `make test` installs it"
    with sync_playwright() as playwright:
        instance = playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        yield instance
        instance.close()


def _screenshot(page, name: str) -> None:
    """The whole page: Streamlit scrolls inside its own container, so the viewport grows to the content first."""
    height = page.evaluate("() => document.querySelector('[data-testid=stMain]')?.scrollHeight || 1000")
    page.set_viewport_size({"width": page.viewport_size["width"], "height": min(int(height) + 100, 6000)})
    time.sleep(1.5)  # let Plotly redraw at the new size
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / name))


def _choose(page, label: str, option: str) -> None:
    page.get_by_role("combobox", name=label).click()
    page.get_by_role("option", name=option, exact=True).click()


def test_home_page_explains_the_tool(browser, app_url):
    page = browser.new_page(viewport={"width": 1400, "height": 900})
    page.goto(app_url)
    page.get_by_text("Why does a language model need").wait_for(timeout=60_000)
    _screenshot(page, "home.png")
    assert "Traceback" not in page.content()
    page.close()


def test_compare_page_runs_tiny_side_by_side(browser, app_url):
    page = browser.new_page(viewport={"width": 1500, "height": 1000})
    page.goto(f"{app_url}/Compare")
    page.get_by_role("button", name="Run").wait_for(timeout=60_000)
    _choose(page, "Model", "tiny")
    page.get_by_role("button", name="Run").click()
    page.get_by_text("Answers side by side").wait_for(timeout=180_000)
    page.get_by_text("Where each answer leaves full KV").first.wait_for(timeout=60_000)
    content = page.content()
    assert "Traceback" not in content
    for method in ("zigzag", "pyramid", "uniform"):
        assert page.locator(".zz-head", has_text=method).count() == 1
    assert "tiny on cpu" in content
    _screenshot(page, "compare_tiny.png")
    page.close()


def test_compare_page_reports_bad_input_without_a_traceback(browser, app_url):
    page = browser.new_page(viewport={"width": 1400, "height": 900})
    page.goto(f"{app_url}/Compare")
    page.get_by_role("button", name="Run").wait_for(timeout=60_000)
    _choose(page, "Model", "tiny")
    prompt = page.get_by_role("textbox", name="Prompt text")
    prompt.fill("too short for this budget")
    prompt.press("Control+Enter")
    page.get_by_role("button", name="Run").click()
    page.get_by_text("below the always-kept window").wait_for(timeout=120_000)
    assert "Traceback" not in page.content()
    page.close()
