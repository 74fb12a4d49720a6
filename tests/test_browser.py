"""The app in headless Chromium: open the Compare page, run the tiny model, and keep a screenshot.

The server (`app_url`), the browser and `screenshot` are fixtures in conftest.py, shared with test_browser_pages."""

import pytest
from conftest import finished_run

pytestmark = [pytest.mark.slow, pytest.mark.browser]


def _choose(page, label: str, option: str) -> None:
    page.get_by_role("combobox", name=label).click()
    page.get_by_role("option", name=option, exact=True).click()


def test_home_page_explains_the_tool(browser, app_url, screenshot):
    page = browser.new_page(viewport={"width": 1400, "height": 900})
    page.goto(app_url)
    page.get_by_text("Why does a language model need").wait_for(timeout=60_000)
    screenshot(page, "home.png")
    assert "Traceback" not in page.content()
    page.close()


def test_compare_page_runs_tiny_side_by_side(browser, app_url, screenshot):
    page = browser.new_page(viewport={"width": 1500, "height": 1000})
    page.goto(f"{app_url}/Compare")
    page.get_by_role("button", name="Run").wait_for(timeout=60_000)
    _choose(page, "Model", "tiny")
    page.get_by_role("button", name="Run").click()
    finished_run(page, 180_000)
    page.get_by_text("Where each answer leaves full KV").first.wait_for(timeout=60_000)
    content = page.content()
    assert "Traceback" not in content
    for method in ("zigzag", "pyramid", "uniform"):
        assert page.locator(".zz-head", has_text=method).count() == 1
    assert "tiny on cpu" in content
    screenshot(page, "compare_tiny.png")
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


def test_every_page_opens_populated_offline_without_loading_a_model(browser, screenshot):
    """A fresh app: home, Compare, Uncertainty, Budgets, Runs and Benchmarks open with no request to another host
    (no web fonts, icons or scripts from the network); the model pages show the bundled results, and no model is
    loaded by opening them."""
    from conftest import serving_app

    with serving_app() as url:
        page = browser.new_page(viewport={"width": 1280, "height": 720})
        outside = []
        page.on("request", lambda request: None if request.url.startswith((url, "data:", "blob:"))
                else outside.append(request.url))
        for path, text in [("", "Why does a language model need"), ("/Compare", "Answers side by side"),
                           ("/Uncertainty", "Which prompt text each layer attends to"),
                           ("/Budgets", "Tokens kept per layer"), ("/Runs", "Stored runs"), ("/Benchmarks", "Every result")]:
            page.goto(f"{url}{path}")
            page.get_by_text(text).first.wait_for(timeout=60_000)
            page.wait_for_load_state("networkidle")
            assert "Traceback" not in page.content()
            if path in ("/Compare", "/Uncertainty", "/Budgets"):
                assert page.get_by_text("Bundled result").count() >= 1
                assert page.get_by_text("The model loads on first use, here.").count() == 1  # nothing loaded
            if path in ("", "/Compare", "/Benchmarks"):
                page.wait_for_timeout(1500)
                screenshot(page, f"cold{path.replace('/', '_') or '_home'}.png")
        assert outside == []
        page.close()


def test_a_link_opened_in_a_fresh_browser_reproduces_the_comparison(browser, app_url, screenshot):
    page = browser.new_page(viewport={"width": 1280, "height": 720})
    page.goto(f"{app_url}/Compare")
    page.get_by_role("button", name="Run").wait_for(timeout=60_000)
    _choose(page, "Model", "tiny")
    tokens = page.get_by_role("spinbutton", name="Max new tokens")
    tokens.fill("6")
    tokens.press("Enter")
    page.get_by_role("button", name="Run").click()
    finished_run(page, 180_000)
    page.wait_for_function("window.location.search.includes('run=1')", timeout=30_000)
    page.wait_for_function("document.querySelectorAll('.zz-out').length >= 5", timeout=60_000)
    link = page.url
    answers = page.locator(".zz-out").all_text_contents()
    fresh = browser.new_context(viewport={"width": 1280, "height": 720})
    other = fresh.new_page()
    other.goto(link)
    finished_run(other, 180_000)  # no Run pressed: the link runs it
    other.wait_for_function(f"document.querySelectorAll('.zz-out').length >= {len(answers)}", timeout=60_000)
    assert other.locator(".zz-out").all_text_contents() == answers
    assert "tiny on cpu" in other.content() and "Traceback" not in other.content()
    other.get_by_role("button", name="comparison as CSV").wait_for(timeout=60_000)
    other.get_by_text("Where each answer leaves full KV").first.wait_for(timeout=60_000)
    screenshot(other, "compare_from_link.png")
    fresh.close()
    page.close()


def test_the_app_latency_benchmark_measures_in_the_browser(tmp_path):
    import json
    import subprocess
    import sys
    from pathlib import Path

    out = tmp_path / "latency.json"
    root = Path(__file__).resolve().parents[1]
    done = subprocess.run([sys.executable, str(root / "benchmarks" / "app_latency.py"), "--model", "tiny",
                           "--samples", "2", "--out", str(out)], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    record = json.loads(out.read_text())
    for key in ("cold_start_s", "page_switch_s", "slider_ms", "first_row_s", "run_s", "full_rerun_ms"):
        assert record[key] > 0, key
    assert record["first_row_s"] <= record["run_s"] and set(record["meets"]) == set(record["goals"])
