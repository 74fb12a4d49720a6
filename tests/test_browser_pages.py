"""The Uncertainty and Budgets pages in headless Chromium on the embedded SmolLM2, with full-page screenshots.

The server (`app_url`), the browser and `screenshot` are fixtures in conftest.py, shared with test_browser."""

import csv
import json
from pathlib import Path

import pandas as pd
import pytest
from conftest import finished_run, wait_for_plots_to_fit
from playwright.sync_api import expect

from zigzag_viz.evaluation.prompts import EXAMPLES

pytestmark = [pytest.mark.slow, pytest.mark.browser]

PLOTS = "[data-testid=stPlotlyChart] .js-plotly-plot .main-svg"
METHODS = ["full", "zigzag", "pyramid", "uniform", "adakv"]  # the Compare page's default methods, in its order


def _wait_for_plots(page, count: int, timeout_ms: int) -> None:
    """Until at least `count` Plotly charts have drawn their SVG."""
    page.wait_for_function(
        "([selector, count]) => new Set([...document.querySelectorAll(selector)].map(e => e.closest('.js-plotly-plot')))"
        ".size >= count",
        arg=[PLOTS, count], timeout=timeout_ms,
    )


def _idle(page, timeout_ms: int = 120_000) -> None:
    """Until the app's script is not running, as Streamlit records it on the app root. Call it after waiting for
    something the run draws, so that the run has started."""
    page.locator("[data-testid=stApp][data-test-script-state=notRunning]").wait_for(state="attached", timeout=timeout_ms)


def test_uncertainty_page_on_smollm2(browser, app_url, screenshot):
    page = browser.new_page(viewport={"width": 1500, "height": 1000})
    page.goto(f"{app_url}/Uncertainty")
    page.get_by_role("button", name="Analyze").wait_for(timeout=60_000)
    page.get_by_role("button", name="Analyze").click()
    page.get_by_text("Which prompt text each layer attends to").wait_for(timeout=240_000)
    _wait_for_plots(page, 4, 60_000)
    content = page.content()
    assert "Traceback" not in content
    assert "smollm2 on cpu" in content and "30 layers" in content

    # hovering the token map names the layer, the token range and the prompt text there
    heatmap = page.locator("[data-testid=stPlotlyChart]").nth(2).locator(".nsewdrag").first
    heatmap.scroll_into_view_if_needed()
    box = heatmap.bounding_box()
    page.mouse.move(box["x"] + box["width"] * 0.3, box["y"] + box["height"] * 0.5)
    hover = page.locator(".hoverlayer .hovertext").first
    hover.wait_for(timeout=10_000)
    assert "layer" in hover.text_content() and "tokens" in hover.text_content() and "share" in hover.text_content()
    page.mouse.move(5, 5)

    page.get_by_role("button", name="Compare models").click()
    page.get_by_text("The zig-zag differs by model").first.wait_for(timeout=400_000)
    _wait_for_plots(page, 5, 60_000)
    _idle(page)
    assert "Traceback" not in page.content()
    screenshot(page, "uncertainty_smollm2.png")
    page.close()


def test_budgets_page_on_smollm2(browser, app_url, screenshot):
    page = browser.new_page(viewport={"width": 1500, "height": 1000})
    page.goto(f"{app_url}/Budgets")
    page.get_by_role("button", name="Analyze").wait_for(timeout=60_000)
    page.get_by_role("button", name="Analyze").click()
    page.get_by_text("Tokens kept per layer").first.wait_for(timeout=240_000)
    _wait_for_plots(page, 2, 60_000)
    assert "window w = 32" in page.content()

    # a slider moves: only the fragment reruns, and the budgets are drawn again
    bars = page.locator("[data-testid=stPlotlyChart] text.bartext")
    assert "20%" in bars.all_text_contents()  # KV bytes of each method as a share of full, at the default 0.2
    thumb = page.get_by_role("slider", name="Kept fraction")
    _idle(page)
    for percent in range(21, 31):  # one step at a time, each redrawn before the next (keys pressed mid-redraw are dropped)
        thumb.focus()
        thumb.press("ArrowRight")
        page.wait_for_function(
            f"() => [...document.querySelectorAll('[data-testid=stPlotlyChart] text.bartext')].some(t => t.textContent === '{percent}%')",
            timeout=60_000,
        )
    assert thumb.input_value() == "0.3"
    _idle(page)
    _wait_for_plots(page, 2, 60_000)
    assert "Traceback" not in page.content()
    screenshot(page, "budgets_smollm2.png")
    page.close()


def test_compare_page_on_smollm2_with_four_methods(browser, app_url, screenshot, tmp_path):
    """Full KV against four methods on SmolLM2 in context mode: answers, metrics, curves, the kept-token map with
    the pass key marked, and the JSON export; then the same result on a phone-sized screen (rows, not columns)."""
    page = browser.new_page(viewport={"width": 1500, "height": 1000}, accept_downloads=True)
    page.goto(f"{app_url}/Compare")
    page.get_by_role("button", name="Run").wait_for(timeout=60_000)
    page.get_by_text("context: compress the context").click()
    # once the radio shows it, Run sends context mode along with the other widget values
    expect(page.get_by_role("radio", name="context: compress the context")).to_be_checked()
    page.get_by_role("button", name="Run").click()
    finished_run(page, 300_000)
    _wait_for_plots(page, 1, 60_000)
    content = page.content()
    assert "Traceback" not in content and "smollm2 on cpu" in content and "context mode" in content
    assert page.locator(".zz-head").all_text_contents() == METHODS
    example = next(iter(EXAMPLES.values()))()  # the prompt the page opens with
    assert example.answer in page.locator(".zz-out").first.text_content()  # full KV's answer
    screenshot(page, "compare_smollm2.png")

    tab = page.get_by_role("tab", name="Kept-token map")
    tab.click()
    page.get_by_text("still holding the known answer").wait_for(state="visible", timeout=30_000)
    page.get_by_text("Which prompt tokens each layer kept").first.wait_for(state="visible", timeout=30_000)
    with page.expect_download() as download:
        page.get_by_role("button", name="Whole comparison as JSON").click()
    assert download.value.suggested_filename == "comparison.json"
    whole = json.loads(Path(download.value.path()).read_text())
    assert whole["mode"] == "context" and [row["method"] for row in whole["results"]] == METHODS
    with page.expect_download() as table_download:
        page.get_by_role("button", name="comparison as CSV").click()
    assert table_download.value.suggested_filename == "comparison.csv"
    with open(table_download.value.path(), newline="") as table:
        rows = list(csv.DictReader(table))
    assert rows[0]["method"] == "full" and sorted(row["method"] for row in rows) == sorted(METHODS)
    kl = [float(row["KL nats"]) for row in rows[1:]]
    assert kl == sorted(kl) and all(0 < float(row["KV share"]) <= 1 for row in rows)  # by KL; shares, not percents
    assert tab.get_attribute("aria-selected") == "true"  # a download does not rerun the page
    screenshot(page, "compare_smollm2_kept_map.png")

    with page.expect_download() as html_download:
        page.get_by_role("button", name="Whole comparison as one HTML page").click()
    assert html_download.value.suggested_filename == "comparison.html"
    saved = tmp_path / "comparison.html"
    html_download.value.save_as(saved)
    offline = browser.new_context(viewport={"width": 1280, "height": 720}, offline=True)
    report = offline.new_page()
    fetched = []
    report.on("request", lambda request: fetched.append(request.url))
    report.goto(saved.as_uri())
    report.wait_for_function("document.querySelectorAll('.js-plotly-plot .main-svg').length >= 4", timeout=60_000)
    assert report.get_by_text("Answers side by side").count() == 1 and example.answer in report.content()
    assert [url for url in fetched if not url.startswith(("file:", "data:", "blob:"))] == []
    screenshot(report, "compare_exported_html.png")
    offline.close()

    page.set_viewport_size({"width": 420, "height": 900})
    wait_for_plots_to_fit(page)
    heads = page.locator(".zz-head")
    first, second = heads.nth(0).bounding_box(), heads.nth(1).bounding_box()
    assert second["y"] > first["y"] + first["height"]  # stacked: one answer under the other
    screenshot(page, "compare_smollm2_narrow.png")
    page.close()


def test_runs_page_draws_a_stored_sweep(browser, tiny, tmp_path, screenshot):
    from conftest import serving_app

    from zigzag_viz.evaluation.store import RunStore
    from zigzag_viz.evaluation.sweep import SweepSettings, run_sweep

    settings = SweepSettings(model="tiny", tasks=("passkey", "vt"), lengths=(160, 224), depths=(0.2, 0.5, 0.8),
                             samples=1, budgets=(0.3, 0.6), methods=("full", "uniform", "zigzag", "streaming"),
                             modes=("aware",), families=("prose/digits5/plain",), window=16, max_new_tokens=4).check()
    whole = RunStore.open(tmp_path / "runs" / "tiny-grid", settings.to_json())
    run_sweep(tiny, settings, whole)
    # a run still being written: its first shard now, the others while the page is open
    live = RunStore.open(tmp_path / "runs" / "writing-now", settings.to_json())
    shards = whole.shards()
    total, first_rows = len(whole.frame()), len(pd.read_parquet(shards[0]))
    (live.folder / shards[0].name).write_bytes(shards[0].read_bytes())
    live.update(status="running", rows_done=first_rows, rows_total=total)
    with serving_app(ZIGZAG_VIZ_RUNS=str(tmp_path / "runs")) as url:
        page = browser.new_page(viewport={"width": 1440, "height": 900})
        page.goto(f"{url}/Runs")
        page.get_by_text("Where the needle is lost").wait_for(timeout=60_000)
        _wait_for_plots(page, 3, 60_000)
        _idle(page)
        assert "Traceback" not in page.content()
        screenshot(page, "runs.png")

        page.get_by_role("combobox", name="Run").click()
        page.get_by_role("option", name="writing-now", exact=True).click()
        page.get_by_text(f"running · {first_rows} of {total} rows").wait_for(timeout=60_000)
        assert page.get_by_text("refreshing every 5 s").count() == 1
        for shard in shards[1:]:
            (live.folder / shard.name).write_bytes(shard.read_bytes())
        live.update(status="complete", rows_done=total)
        page.get_by_text(f"complete · {total} of {total} rows").wait_for(timeout=30_000)  # no reload
        assert "Traceback" not in page.content()
        page.close()
