"""Bundled results: every page opens populated from files in the package, without loading a model, says so, and
follows the model and mode until the user runs something of their own."""

from pathlib import Path

import pytest
from streamlit.testing.v1 import AppTest

from zigzag_viz.evaluation.prompts import example_prompt
from zigzag_viz.presentation import bundled, ui

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture()
def no_model(monkeypatch):
    def refuse(*_args, **_kwargs):
        raise AssertionError("a page loaded a model to open")

    monkeypatch.setattr(ui, "load_model", refuse)
    ui.cached_model.clear()


def _page(name: str) -> AppTest:
    at = AppTest.from_file(str(ROOT / "pages" / name), default_timeout=120)
    at.run()
    assert not at.exception and not at.error, [e.value for e in at.error]
    return at


@pytest.mark.parametrize("model", bundled.BUNDLED_MODELS)
def test_every_bundled_result_reads_back_for_every_model(model):
    made, analysis = bundled.bundled_analysis(model, example_prompt().text, bundled.SETTINGS["window"])
    assert made["model"] == model and analysis.model == model and analysis.n_tokens > 500
    for mode in bundled.BUNDLED_MODES:
        made, shown, options = bundled.bundled_comparison(model, mode)
        methods = [row.method for row in shown.comparison.results]
        assert methods == bundled.BUNDLED_METHODS.split(",") and shown.comparison.mode == mode
        assert options.mode == mode and options.methods == bundled.BUNDLED_METHODS
    assert bundled.bundled_analysis(model, "another prompt", 32) is None


def test_a_committed_study_becomes_a_run_with_its_status_and_every_row(tmp_path):
    import pandas as pd

    from zigzag_viz.evaluation.store import RunStore, summary

    study = ROOT / "benchmarks" / "results" / "quality_gemma3.parquet"
    folder = bundled.bundle_study(study, "gemma3", tmp_path / "quality-gemma3")
    store = RunStore(folder)
    manifest = store.manifest()
    rows = pd.read_parquet(study)
    assert manifest["status"] == "stopped" and manifest["rows_done"] == len(rows) < manifest["rows_total"]  # as its report says
    assert store.frame().shape == rows.shape and set(summary(store)["method"]) == set(rows["method"])
    assert {p.name for p in bundled.bundled_runs_folder().iterdir()} >= {"quality-smollm2", "quality-gemma3"}


def test_a_subset_of_the_bundled_methods_is_served_in_its_order():
    made, shown, options = bundled.bundled_comparison("smollm2", "aware", "full,uniform,zigzag")
    assert [r.method for r in shown.comparison.results] == ["full", "uniform", "zigzag"]
    assert options.methods == "full,uniform,zigzag" and set(shown.answer_tokens) == {"full", "uniform", "zigzag"}
    assert len(bundled.bundled_comparison("smollm2", "aware", "full,streaming")[1].comparison.results) == 7


def test_the_compare_page_opens_with_the_bundled_comparison_and_follows_the_mode(no_model):
    at = _page("1_Compare.py")
    assert any("Bundled result" in info.value for info in at.info)
    assert not any("Stale" in warning.value for warning in at.warning)  # the default methods are bundled
    shown = at.session_state["comparison"].comparison
    assert shown.model == "smollm2" and shown.mode == "aware"
    assert [r.method for r in shown.results] == ["full", "zigzag", "pyramid", "uniform", "adakv"]
    at.radio(key="mode").set_value("context").run()
    assert at.session_state["comparison"].comparison.mode == "context" and not at.exception
    at.selectbox(key="model").set_value("gemma3").run()
    assert at.session_state["comparison"].comparison.model == "gemma3"


@pytest.mark.parametrize("name, charts", [("2_Uncertainty.py", 4), ("3_Budgets.py", 2)])
def test_the_analysis_pages_open_with_the_bundled_analysis(no_model, name, charts):
    at = _page(name)
    assert any("Bundled result" in info.value for info in at.info)
    assert len(at.get("plotly_chart")) >= charts


def test_the_home_page_draws_the_story_picture_from_the_bundled_analysis(no_model):
    at = AppTest.from_file(str(ROOT / "app.py"), default_timeout=60)
    at.run()
    assert not at.exception and len(at.get("plotly_chart")) == 1
    assert any("mean task score at 20% kept" in caption.value for caption in at.caption)
