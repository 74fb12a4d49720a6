"""Presentation mode and saved comparisons in headless Chromium: the five story steps from a fresh app (bundled
results, no model loaded, nothing fetched from another host, at projector and phone size), and a comparison
saved with equal bytes reopened from its link in a new browser."""

import pytest
from conftest import finished_run, serving_app

pytestmark = [pytest.mark.slow, pytest.mark.browser]

STEPS = [  # (title, what the step's own data says)
    ("Layers differ in uncertainty", "LMBA runs from"),
    ("The budgets that follow", "Measured on smollm2, mean task score"),
    ("What compression does to the answer", "Closest to full KV at 20% of its bytes"),
    ("Why: which prompt tokens each layer kept", "Share of (layer, KV head) slots still holding"),
    ("How often: the sweep", "Measured on smollm2, mean task score at 20% kept"),
]


def test_presentation_mode_steps_through_the_story_on_bundled_results(browser, screenshot):
    with serving_app() as url:
        page = browser.new_page(viewport={"width": 1280, "height": 720})
        outside = []
        page.on("request", lambda request: None if request.url.startswith((url, "data:", "blob:"))
                else outside.append(request.url))
        page.goto(url)
        page.get_by_text("Present the story").click()
        for index, (title, data) in enumerate(STEPS, start=1):
            page.get_by_text(f"Step {index} of 5").wait_for(timeout=60_000)
            page.get_by_text(title, exact=True).wait_for(timeout=60_000)
            page.get_by_text(data).first.wait_for(timeout=60_000)
            assert f"step=" in page.url and "present=1" in page.url  # the address reproduces the step
            assert not page.locator("[data-testid=stSidebar]").is_visible()  # controls hidden
            assert page.get_by_role("button", name="Run").count() == 0 or not page.get_by_role("button", name="Run").is_visible()
            assert "Traceback" not in page.content()
            screenshot(page, f"story_{index}.png")
            if index < len(STEPS):
                page.get_by_role("link", name="Next →").first.click()
        assert page.get_by_role("link", name="Next →").count() == 0  # the last step
        page.get_by_role("link", name="← Back").first.click()
        page.get_by_text("Step 4 of 5").wait_for(timeout=60_000)

        phone = browser.new_page(viewport={"width": 420, "height": 900})
        phone.goto(f"{url}/Compare?present=1&step=answers")
        phone.get_by_text("Step 3 of 5").wait_for(timeout=60_000)
        phone.get_by_text("Answers side by side").wait_for(timeout=60_000)
        screenshot(phone, "story_3_phone.png")
        phone.get_by_role("link", name="Leave presentation mode").first.click()
        phone.get_by_role("button", name="Run").wait_for(timeout=60_000)  # the controls are back
        assert phone.get_by_text("Step 3 of 5").count() == 0
        assert outside == []
        phone.close()
        page.close()


def test_a_saved_comparison_at_equal_bytes_reopens_from_its_link_in_a_new_browser(browser, tmp_path, screenshot):
    with serving_app(ZIGZAG_VIZ_RUNS=str(tmp_path / "runs")) as url:
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        page.goto(f"{url}/Compare?model=tiny&tokens=5&methods=full%2Cuniform%2Ckivi%2Cthink&kept=0.3&match=1")
        page.get_by_role("button", name="Run").click()
        finished_run(page, 180_000)
        page.wait_for_function("document.querySelectorAll('.zz-out').length >= 4", timeout=60_000)
        assert page.get_by_text("uniform+think", exact=True).count() >= 1  # brought to equal bytes
        assert page.get_by_text("at kept fraction").count() >= 1
        answers = page.locator(".zz-out").all_text_contents()
        page.get_by_text("Save this comparison into the run store").click()
        name = page.get_by_role("textbox", name="Run name")
        name.fill("equal-bytes")  # committed with the click, which would otherwise close the expander first
        page.get_by_role("button", name="Save", exact=True).click()
        page.get_by_text("Saved as").wait_for(timeout=60_000)
        page.wait_for_function("window.location.search.includes('saved=equal-bytes')", timeout=30_000)
        link = page.url
        assert (tmp_path / "runs" / "equal-bytes" / "view.json.gz").exists()

        fresh = browser.new_context(viewport={"width": 1280, "height": 900})
        other = fresh.new_page()
        other.goto(link)
        other.wait_for_function(f"document.querySelectorAll('.zz-out').length >= {len(answers)}", timeout=60_000)
        assert other.locator(".zz-out").all_text_contents() == answers
        assert other.get_by_text("Stale").count() == 0 and "Traceback" not in other.content()
        assert other.get_by_role("switch", name="Match bytes").is_checked()
        screenshot(other, "compare_saved_reopened.png")
        other.get_by_text("Saved comparisons (1)").click()  # listed in the sidebar too, and opens from there
        other.locator(".st-key-open_saved button").click()
        other.wait_for_function(f"document.querySelectorAll('.zz-out').length >= {len(answers)}", timeout=60_000)
        assert other.locator(".zz-out").all_text_contents() == answers
        fresh.close()
        page.close()
