"""The Uncertainty and Budgets pages driven by Streamlit's AppTest on the tiny model (no browser)."""

from pathlib import Path

import pytest
from streamlit.testing.v1 import AppTest

from zigzag_viz.evaluation.prompts import EXAMPLES
from zigzag_viz.pipeline import runtime
from zigzag_viz.pipeline.capture import LMBO_GRID
from zigzag_viz.presentation import charts, ui
from zigzag_viz.presentation.views import AnalysisResult

ROOT = Path(__file__).resolve().parents[1]
UNCERTAINTY = str(ROOT / "pages" / "2_Uncertainty.py")
BUDGETS = str(ROOT / "pages" / "3_Budgets.py")


def _open(page: str, model: str = "tiny") -> AppTest:
    at = AppTest.from_file(page, default_timeout=120)
    at.run()
    at.selectbox(key="model").set_value(model).run()
    return at


def _button(at: AppTest, label: str):
    return next(b for b in at.button if b.label == label)


def _slider(at: AppTest, label: str):
    return next(s for s in at.slider if s.label == label)


def _no_traceback(at: AppTest) -> None:
    assert not at.exception, [e.value for e in at.exception]


def _messages(at: AppTest) -> str:
    return " ".join(str(e.value) for e in list(at.error) + list(at.warning))


def _analysed(page: str, window: int | None = None) -> AppTest:
    at = _open(page)
    if window is not None:
        next(n for n in at.number_input if n.label.startswith("Observation window")).set_value(window)
    _button(at, "Analyze").click().run()
    _no_traceback(at)
    return at


def test_uncertainty_page_draws_every_figure_and_the_table():
    at = _open(UNCERTAINTY)
    assert "Press **Analyze**" in at.info[0].value
    _button(at, "Analyze").click().run()
    _no_traceback(at)
    assert not at.error, _messages(at)
    # entropy heatmap, layer curves, token importance map, hidden-change map
    assert len(at.get("plotly_chart")) == 4
    table = at.dataframe[0].value
    assert list(table["layer"]) == [0, 1, 2, 3]
    assert {"entropy", "entropy_norm", "lmba", "hidden_change", "cap"} <= set(table.columns)
    assert "lmbo" not in table.columns
    assert isinstance(at.session_state["uncertainty"], AnalysisResult)

    # display options redraw from the stored analysis
    at.toggle[0].set_value(True).run()
    _slider(at, "τ for LMBA").set_value(0.6).run()
    _no_traceback(at)
    assert len(at.get("plotly_chart")) == 4
    assert (at.dataframe[0].value["lmba"] < table["lmba"]).all()

    # the cross-model view on the tiny model adds one more chart
    at.multiselect[0].set_value(["tiny"]).run()
    _button(at, "Compare models").click().run()
    _no_traceback(at)
    assert len(at.get("plotly_chart")) == 5
    assert list(at.session_state["uncertainty_models"]) == ["tiny"]


def test_uncertainty_page_with_lmbo_adds_the_column():
    at = _open(UNCERTAINTY)
    at.checkbox[0].check().run()
    at.text_area[0].set_value("The pass key is 41234. Remember it. " * 6 + "What is the pass key?").run()
    _button(at, "Analyze").click().run()
    _no_traceback(at)
    table = at.dataframe[0].value
    assert "lmbo" in table.columns
    # at the default threshold 0.99: each layer's first grid fraction whose window-output cosine reaches it
    cosines = at.session_state["uncertainty"].analysis.lmbo_cos
    expected = [next((f for f, c in zip(LMBO_GRID, row) if c >= 0.99), 1.0) for row in cosines]
    assert table["lmbo"].tolist() == pytest.approx(expected)


@pytest.mark.parametrize("page", [UNCERTAINTY, BUDGETS])
def test_empty_prompt_is_a_message_not_a_traceback(page):
    at = _open(page)
    at.text_area[0].set_value("   ").run()
    _button(at, "Analyze").click().run()
    _no_traceback(at)
    assert "prompt is empty" in _messages(at)
    assert not at.get("plotly_chart")


def test_binary_prompt_is_an_error_not_a_traceback():
    at = _open(UNCERTAINTY)
    at.text_area[0].set_value("abc\x00def").run()
    _button(at, "Analyze").click().run()
    _no_traceback(at)
    assert "not text" in " ".join(e.value for e in at.error)


def test_budgets_page_sliders_recompute_without_the_model(monkeypatch):
    at = _analysed(BUDGETS)
    assert not at.error, _messages(at)
    assert len(at.get("plotly_chart")) == 2  # budgets per layer, KV bytes per method
    before = at.session_state["budgets_curves"]
    per_layer = at.dataframe[1].value
    assert set(per_layer.columns) >= {"layer", "zigzag", "pyramid", "uniform", "cap"}
    bytes_before = at.dataframe[0].value.set_index("method")["kv_bytes"]
    # the default kept fraction is 0.2 and the tiny model has no sliding layers: a fifth of full's bytes
    assert bytes_before["uniform"] / bytes_before["full"] == pytest.approx(0.2, abs=1e-3)

    def no_model(*args, **kwargs):
        raise AssertionError("a slider touched the model")

    monkeypatch.setattr(runtime, "prefill", no_model)
    monkeypatch.setattr(ui, "load_model", no_model)

    _slider(at, "Kept fraction").set_value(0.5).run()
    _no_traceback(at)
    after = at.session_state["budgets_curves"]
    assert sum(after["uniform"]) > sum(before["uniform"])
    bytes_after = at.dataframe[0].value.set_index("method")["kv_bytes"]
    assert bytes_after["zigzag"] > bytes_before["zigzag"]
    assert bytes_after["full"] == bytes_before["full"]

    at.radio[0].set_value("hidden").run()
    zigzag_hidden = at.session_state["budgets_curves"]["zigzag"]
    _slider(at, "ρ (ZigZag floor share)").set_value(0.9).run()
    assert at.session_state["budgets_curves"]["zigzag"] != zigzag_hidden
    pyramid = at.session_state["budgets_curves"]["pyramid"]
    _slider(at, "β (PyramidKV)").set_value(2.0).run()
    assert at.session_state["budgets_curves"]["pyramid"] != pyramid
    assert list(at.dataframe[1].value["pyramid"]) == at.session_state["budgets_curves"]["pyramid"]
    _no_traceback(at)
    assert not at.error


def test_budgets_page_calibrates_rho_and_signal_and_moves_the_sliders_to_them(monkeypatch, tmp_path):
    from collections import Counter

    from zigzag_viz.methods import calibration
    from zigzag_viz.methods.zigzag import ZigZag

    monkeypatch.setenv("ZIGZAG_VIZ_CACHE", str(tmp_path))
    monkeypatch.setattr(ZigZag, "calibration_set", calibration.CalibrationSet(prompts=2, sentences=8, seed=7000))
    monkeypatch.setattr(calibration, "computations", Counter())
    calibration.memo.clear()
    at = _analysed(BUDGETS)
    assert not any("Calibrated for this model" in c.value for c in at.caption)
    _button(at, "Calibrate ρ and signal for this model").click().run()
    _no_traceback(at)
    assert not at.error, _messages(at)
    chosen = next(c.value for c in at.caption if "Calibrated for this model" in c.value)
    stored = ZigZag(rho="auto", signal="auto").stored_result(ui.cached_model("tiny"))
    assert f"ρ = {float(stored['rho']):g}, signal = {stored['signal']}" in chosen
    _button(at, "Use the calibrated ρ and signal").click().run()
    assert _slider(at, "ρ (ZigZag floor share)").value == pytest.approx(float(stored["rho"]))
    assert at.radio(key="budget_signal").value == stored["signal"]
    at = _analysed(BUDGETS)  # a new session finds the stored choice without calibrating again
    assert any("Calibrated for this model" in c.value for c in at.caption)
    assert calibration.computations["zigzag"] == 1


def test_budgets_page_budget_below_the_window_is_a_message():
    at = _analysed(BUDGETS, window=512)
    assert "window w = 512" in " ".join(c.value for c in at.caption)
    _slider(at, "Kept fraction").set_value(0.05).run()
    _no_traceback(at)
    assert "below the always-kept window" in " ".join(e.value for e in at.error)
    assert at.session_state["budgets_curves"] is None
    assert not at.get("plotly_chart")
    _slider(at, "Kept fraction").set_value(0.9).run()
    assert not at.error and len(at.get("plotly_chart")) == 2


def test_default_comparison_models_are_embedded():
    models = ui.default_comparison_models()
    assert len(models) == 2 and models[0] == "smollm2"
    assert set(models) <= set(ui.EMBEDDED_MODELS)


COMPARE = str(ROOT / "pages" / "1_Compare.py")


def test_compare_page_offers_every_method_with_its_parameters_and_runs_compositions():
    from zigzag_viz.methods import METHODS

    at = _open(COMPARE)
    picker = at.multiselect(key="methods")
    assert list(picker.options) == list(METHODS)
    picker.set_value(["full", "zigzag", "kivi", "think", "adakv"]).run()
    labels = {w.label for w in list(at.number_input) + list(at.selectbox) + list(at.text_input)}
    for name in ("zigzag", "kivi", "think", "adakv"):
        for parameter in METHODS[name].parameters:
            assert f"{name}: {parameter}" in labels
    at.text_input(key="methods_extra").set_value("zigzag+kivi, uniform[select=knorm]").run()
    next(s for s in at.slider if s.label == "Kept fraction of the prompt").set_value(0.5).run()
    _button(at, "Run").click().run()
    _no_traceback(at)
    table = at.dataframe[0].value
    assert table["method"].iloc[0] == "full"  # then by KL
    assert set(table["method"]) == {"full", "zigzag", "kivi", "think", "adakv", "zigzag+kivi", "uniform[select=knorm]"}
    assert list(table["KL nats"].iloc[1:]) == sorted(table["KL nats"].iloc[1:])
    fraction = table.set_index("method")["KV share"]
    for token_method in ("zigzag", "adakv", "uniform[select=knorm]"):  # these keep half of the prompt's tokens
        assert fraction[token_method] == pytest.approx(0.5, abs=0.01)
    assert 0 < fraction["kivi"] < 1 and 0 < fraction["think"] < 1  # quantized / pruned channels, every token
    assert 0 < fraction["zigzag+kivi"] < min(fraction["zigzag"], fraction["kivi"])  # quantizes what ZigZag keeps


def test_compare_page_reports_a_bad_spec_without_running(monkeypatch):
    import zigzag_viz.evaluation.runner as runner_module

    def no_prefill(*_args, **_kwargs):
        raise AssertionError("a run started with a bad spec")

    monkeypatch.setattr(runner_module, "prefill_reference", no_prefill)
    at = _open(COMPARE)
    for spec, message in (("zigzag+l2norm", "different axes"), ("uniform, nosuch", "nosuch"), ("zigzag[rho=", "rho")):
        at.text_input(key="methods_extra").set_value(spec).run()
        assert at.error[0].value.startswith("More specs: ") and message in at.error[0].value
        next(b for b in at.button if b.label == "Run").click().run()
        assert "Fix the method spec above first: nothing ran." in [w.value for w in at.warning]
        assert "comparison_bundled" in at.session_state  # what is shown is still the bundled result
    _no_traceback(at)


def test_compare_page_widgets_context_mode_figures_and_exports(monkeypatch):
    import zigzag_viz.evaluation.runner as runner_module

    prefills, rows = [], []
    real_prefill, real_row = runner_module.prefill_reference, runner_module.method_row
    monkeypatch.setattr(runner_module, "prefill_reference", lambda *a, **k: prefills.append(a[4]) or real_prefill(*a, **k))
    monkeypatch.setattr(runner_module, "method_row",
                        lambda *a, **k: rows.append((a[2].spec, a[3].budget)) or real_row(*a, **k))
    ui.server_cache().clear()
    at = _open(COMPARE)
    source = "question over a bundled article"
    article = EXAMPLES[source]()
    at.selectbox(key="prompt_source").set_value(source).run()
    assert at.text_area(key=f"prompt_{source}").value == article.text
    assert at.text_input(key=f"answer_{source}").value == article.answer
    at.radio(key="mode").set_value("context").run()
    at.multiselect(key="methods").set_value(["full", "zigzag", "adakv", "streaming"]).run()
    _button(at, "Run").click().run()
    _no_traceback(at)
    assert not at.error, _messages(at)
    table = at.dataframe[0].value
    assert table["method"].iloc[0] == "full" and set(table["method"]) == {"full", "zigzag", "adakv", "streaming"}
    assert at.session_state["comparison"].comparison.mode == "context"
    assert list(table.columns) == list(charts.QUALITY_COLUMNS)  # readable headers with units, each with hover help
    assert list(at.dataframe[1].value.columns) == ["method", *charts.TIMING_COLUMNS]  # seconds in a table of their own
    verdict = next(m.value for m in at.markdown if "kept fraction" not in m.value and m.value.startswith("**"))
    assert "20% kept" in verdict
    # KL/top-1 curves, kept-token map, tokens per layer, KV bytes, layer signals, budget curves
    assert len(at.get("plotly_chart")) == 6
    assert at.multiselect(key="kept_methods").value == ["zigzag", "adakv", "streaming"]
    labels = [b.proto.label for b in at.get("download_button")]
    assert "Whole comparison as JSON (rows, curves, kept-token maps)" in labels
    assert any("CSV" in label for label in labels) and any("Parquet" in label for label in labels)
    assert sum("(HTML)" in label for label in labels) == 6
    assert prefills == ["context"] and len(rows) == 4
    # The same run again is served from the caches: no prefill, no method.
    _button(at, "Run").click().run()
    assert prefills == ["context"] and len(rows) == 4
    # A new budget reruns the methods on the cached prefill; one more method runs alone.
    next(s for s in at.slider if s.label == "Kept fraction of the prompt").set_value(0.5).run()
    _button(at, "Run").click().run()
    assert prefills == ["context"] and [spec for spec, budget in rows[4:]] == ["full", "zigzag", "adakv", "streaming"]
    at.multiselect(key="methods").set_value(["full", "zigzag", "adakv", "streaming", "pyramid"]).run()
    _button(at, "Run").click().run()
    assert prefills == ["context"] and rows[8:] == [("pyramid", 0.5)]
    assert set(at.dataframe[0].value["method"]) == {"full", "zigzag", "adakv", "streaming", "pyramid"}
    # Another mode is another prefill; the results on screen say they are stale until then.
    at.radio(key="mode").set_value("aware").run()
    assert any("Stale: the setting changed" in w.value for w in at.warning)
    _button(at, "Run").click().run()
    assert prefills == ["context", "aware"]
    assert at.session_state["comparison"].comparison.mode == "aware"
    assert not any("Stale" in w.value for w in at.warning)


def test_compare_page_explains_missing_question_and_empty_prompt():
    at = _open(COMPARE)
    at.selectbox(key="prompt_source").set_value("type your own").run()
    _button(at, "Run").click().run()
    assert "The prompt is empty" in _messages(at)
    at.text_area(key="prompt_type your own").set_value("one paragraph and nothing after it " * 10).run()
    at.radio(key="mode").set_value("context").run()
    _button(at, "Run").click().run()
    _no_traceback(at)
    assert "context mode needs a question" in _messages(at)
    at.text_input(key="question_type your own").set_value("What is this about?").run()
    next(s for s in at.slider if s.label == "Kept fraction of the prompt").set_value(1.0).run()
    _button(at, "Run").click().run()
    _no_traceback(at)
    assert not at.error, _messages(at)
    assert at.session_state["comparison"].comparison.mode == "context"


def test_model_kept_fraction_window_mode_and_tau_are_shared_by_every_page_and_survive_navigation():
    at = AppTest.from_file(str(ROOT / "app.py"), default_timeout=120)
    at.run()
    at.switch_page("pages/1_Compare.py").run()
    at.selectbox(key="model").set_value("tiny").run()
    next(s for s in at.slider if s.label == "Kept fraction of the prompt").set_value(0.45).run()
    next(n for n in at.number_input if n.label.startswith("Observation window")).set_value(48).run()
    at.radio(key="mode").set_value("context").run()
    at.switch_page("pages/3_Budgets.py").run()
    assert at.selectbox(key="model").value == "tiny"
    assert next(n for n in at.number_input if n.label.startswith("Observation window")).value == 48
    at.switch_page("pages/2_Uncertainty.py").run()
    assert next(n for n in at.number_input if n.label.startswith("Observation window")).value == 48
    _slider(at, "τ for LMBA").set_value(0.75).run()
    at.switch_page("pages/1_Compare.py").run()
    assert at.selectbox(key="model").value == "tiny" and at.radio(key="mode").value == "context"
    assert next(s for s in at.slider if s.label == "Kept fraction of the prompt").value == pytest.approx(0.45)
    at.switch_page("pages/2_Uncertainty.py").run()
    assert _slider(at, "τ for LMBA").value == pytest.approx(0.75)
    assert not at.exception and not at.warning


def test_compare_page_matches_bytes_then_saves_and_reopens_the_comparison(monkeypatch, tmp_path):
    monkeypatch.setenv("ZIGZAG_VIZ_RUNS", str(tmp_path))
    at = _open(COMPARE)
    at.multiselect(key="methods").set_value(["full", "uniform", "kivi", "think"]).run()
    at.text_input(key="methods_extra").set_value("kivi[residual=32,group=16]").run()
    at.toggle(key="match_bytes").set_value(True).run()
    _button(at, "Run").click().run()
    _no_traceback(at)
    assert not at.error, _messages(at)
    table = at.dataframe[0].value.set_index("method")
    # 20 % of full KV's bytes: KIVI (2 bits: 25 % of the bytes on the tiny model) and ThinK run behind uniform
    # eviction at a larger kept fraction; KIVI with a short full-precision tail holds 16 % at any fraction
    assert set(table.index) == {"full", "uniform", "uniform+kivi", "uniform+think", "kivi[group=16,residual=32]"}
    for method in ("uniform", "uniform+kivi", "uniform+think"):
        assert table.loc[method, "KV share"] == pytest.approx(0.2, abs=0.01), method
    assert table.loc["uniform+kivi", "kept"] > 0.5 and table.loc["uniform+think", "kept"] > 0.2
    assert table.loc["kivi[group=16,residual=32]", "KV share"] < 0.19
    verdict = next(m.value for m in at.markdown if m.value.startswith("**") and "Closest to full KV" in m.value)
    assert "At other memory, so not comparable head to head: kivi[group=16,residual=32] holds 16%" in verdict
    shown = at.session_state["comparison"]

    at.text_input(key="save_run_name").set_value("matched").run()
    _button(at, "Save").click().run()
    _no_traceback(at)
    assert (tmp_path / "matched" / "view.json.gz").exists() and any(s.value.startswith("Saved as") for s in at.success)

    again = AppTest.from_file(COMPARE, default_timeout=120)  # a new session: the saved comparison is listed
    again.run()
    assert again.selectbox(key="saved_pick").options == ["matched"]
    _button(again, "Open").click().run()
    _no_traceback(again)
    reopened = again.session_state["comparison"]
    assert [r.method for r in reopened.comparison.results] == [r.method for r in shown.comparison.results]
    assert [r.text for r in reopened.comparison.results] == [r.text for r in shown.comparison.results]
    assert again.toggle(key="match_bytes").value and again.selectbox(key="model").value == "tiny"
    assert not any("Stale" in w.value for w in again.warning)  # the widgets follow the reopened settings
    assert "comparison_bundled" not in again.session_state
