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


@pytest.mark.parametrize("params", [{"kept": "abc"}, {"kept": "nan"}, {"window": "-"}, {"prompt": "text-../../etc"},
                                    {"prompt": "text-0000"}, {"methods": "zigzag[[", "tokens": "x"}])
def test_a_damaged_link_is_ignored_field_by_field(params):
    values = links.read_params(params)
    assert "kept_fraction" not in values and "window" not in values and "max_new_tokens" not in values
    assert links.split_methods(values.get("methods", "")) == ([], "")
    assert not isinstance(values.get("prompt"), dict)


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
