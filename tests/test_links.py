"""Links that reproduce a view: settings to query parameters and back, typed prompts stored by hash, and the
Compare page opened from a link (AppTest) showing the same results as the run that made it."""

from pathlib import Path

import pytest
from streamlit.testing.v1 import AppTest

from zigzag_viz.presentation import links
from zigzag_viz.serving.api import CompareOptions

ROOT = Path(__file__).resolve().parents[1]
COMPARE = str(ROOT / "pages" / "1_Compare.py")


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("ZIGZAG_VIZ_CACHE", str(tmp_path))


def test_settings_go_into_a_link_and_come_back():
    options = CompareOptions("tiny", "my own prompt text", "full,zigzag[rho=0.5],uniform+kivi", 0.35, 7, 16,
                             answer="42", mode="context", question="What is it?")
    params = links.compare_params(options, "type your own", bundled=False, shown=True)
    assert params["prompt"].startswith(links.STORED) and params["run"] == "1" and params["kept"] == "0.35"
    values = links.read_params(params)
    assert values["prompt"] == {"prompt": "my own prompt text", "question": "What is it?", "answer": "42"}
    assert (values["model"], values["kept_fraction"], values["window"], values["mode"], values["max_new_tokens"]) == (
        "tiny", 0.35, 16, "context", 7)
    assert links.split_methods(values["methods"]) == (["full"], "zigzag[rho=0.5], uniform+kivi")
    bundled = links.compare_params(options, "passkey in varied prose", bundled=True, shown=False)
    assert bundled["prompt"] == "passkey in varied prose" and "run" not in bundled
    assert "match" not in params and "saved" not in params and links.read_params(params).get("saved") is None
    matched = links.compare_params(CompareOptions("tiny", "x", match_bytes=True), "type your own", bundled=False,
                                   shown=True, saved="compare-tiny")
    assert (matched["match"], matched["saved"]) == ("1", "compare-tiny")
    assert links.read_params(matched)["match_bytes"] is True and links.read_params(matched)["saved"] == "compare-tiny"


@pytest.mark.parametrize("params", [{"kept": "abc"}, {"kept": "nan"}, {"window": "-"}, {"prompt": "text-../../etc"},
                                    {"prompt": "text-0000"}, {"methods": "zigzag[[", "tokens": "x", "match": "yes"}])
def test_a_damaged_link_is_ignored_field_by_field(params):
    values = links.read_params(params)
    assert "kept_fraction" not in values and "window" not in values and "max_new_tokens" not in values
    assert links.split_methods(values.get("methods", "")) == ([], "")
    assert not isinstance(values.get("prompt"), dict) and "match_bytes" not in values


def test_a_link_opened_in_a_new_session_shows_the_same_view():
    at = AppTest.from_file(COMPARE, default_timeout=300)
    at.run()
    at.selectbox(key="model").set_value("tiny").run()
    at.selectbox(key="prompt_source").set_value("type your own").run()
    at.text_area(key="prompt_type your own").set_value("The code is 7731. Remember it. " * 8 + "\n\nWhat is the code?").run()
    at.text_input(key="answer_type your own").set_value("7731").run()
    at.multiselect(key="methods").set_value(["full", "uniform"]).run()
    at.text_input(key="methods_extra").set_value("zigzag[rho=0.5]").run()
    next(n for n in at.number_input if n.label == "Max new tokens").set_value(5).run()
    next(s for s in at.slider if s.label == "Kept fraction of the prompt").set_value(0.5).run()
    next(b for b in at.button if b.label == "Run").click().run()
    assert not at.exception and not at.error, [e.value for e in at.error]
    made = at.session_state["comparison"].comparison
    link = {key: at.query_params[key][0] if isinstance(at.query_params[key], list) else at.query_params[key]
            for key in at.query_params}
    assert link["run"] == "1" and link["model"] == "tiny" and link["prompt"].startswith("text-")

    fresh = AppTest.from_file(COMPARE, default_timeout=300)  # another browser opening the link
    for key, value in link.items():
        fresh.query_params[key] = value
    fresh.run()
    assert not fresh.exception and not fresh.error and not fresh.warning
    shown = fresh.session_state["comparison"].comparison
    assert [r.method for r in shown.results] == [r.method for r in made.results] == ["full", "uniform", "zigzag[rho=0.5]"]
    assert [r.token_ids for r in shown.results] == [r.token_ids for r in made.results]
    assert shown.answer == "7731" and shown.budget == made.budget == 0.5


def test_a_link_to_a_saved_comparison_reopens_it_and_a_missing_one_is_a_message(tiny, tmp_path, monkeypatch):
    from zigzag_viz.evaluation.runner import Runner
    from zigzag_viz.presentation import saved
    from zigzag_viz.presentation.views import comparison_result

    monkeypatch.setenv("ZIGZAG_VIZ_RUNS", str(tmp_path / "runs"))
    options = CompareOptions("tiny", "a prompt of a few words " * 20, "full,zigzag", 0.4, 3, 8)
    runner = Runner(tiny)
    shown = comparison_result(tiny, runner.compare(options.request(runner)))
    saved.save(shown, options, tmp_path / "runs" / "kept")
    at = AppTest.from_file(COMPARE, default_timeout=120)
    at.query_params.update({"saved": "kept", "run": "1"})
    at.run()
    assert not at.exception
    assert [r.text for r in at.session_state["comparison"].comparison.results] == [r.text for r in shown.comparison.results]
    assert at.text_area(key="prompt_type your own").value == options.prompt and at.slider(key="kept_fraction").value == 0.4
    assert at.query_params.get("saved") in ("kept", ["kept"])  # the address still names it
    missing = AppTest.from_file(COMPARE, default_timeout=120)
    missing.query_params.update({"saved": "gone"})
    missing.run()
    assert not missing.exception and any("holds no saved comparison" in e.value for e in missing.error)
