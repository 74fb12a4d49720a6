"""The app on a model server: the pages' results sent exactly (wire), the server's view endpoints equal to an
in-process run, rows landing one by one, a stopped wait cancelling the server's job, and the Compare page driven
through a real server process by AppTest, including the server going away mid-session."""

import json
from pathlib import Path

import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient
from streamlit.testing.v1 import AppTest

from zigzag_viz.evaluation.prompts import passkey_prompt
from zigzag_viz.evaluation.runner import NoCache, Runner
from zigzag_viz.presentation import backends, views
from zigzag_viz.serving import wire
from zigzag_viz.serving.api import AnalyzeOptions, CompareOptions
from zigzag_viz.serving.client import Backend as Client
from zigzag_viz.serving.server import Limits, create_app

ROOT = Path(__file__).resolve().parents[1]
COMPARE_PAGE = str(ROOT / "pages" / "1_Compare.py")
PROMPT = passkey_prompt(n_sentences=12, seed=21)
OPTIONS = CompareOptions(model="tiny", prompt=PROMPT.text, methods="full,zigzag,uniform", budget=0.4, window=16,
                         max_new_tokens=4, answer=PROMPT.answer)


def assert_same(a, b, path="result"):
    """Two results equal field by field, arrays exactly (dtype, shape and values)."""
    if isinstance(a, np.ndarray):
        assert isinstance(b, np.ndarray) and a.dtype == b.dtype and a.shape == b.shape, path
        np.testing.assert_array_equal(a, b, err_msg=path)
    elif hasattr(a, "__dataclass_fields__"):
        assert type(a) is type(b), path
        for name in a.__dataclass_fields__:
            assert_same(getattr(a, name), getattr(b, name), f"{path}.{name}")
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b), path
        for index, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{path}[{index}]")
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), path
        for key in a:
            assert_same(a[key], b[key], f"{path}[{key!r}]")
    else:
        assert a == b, f"{path}: {a!r} != {b!r}"


def without_times(shown: views.ComparisonResult) -> views.ComparisonResult:
    """The same result with every row's wall times zeroed (they differ between two runs)."""
    for row in shown.comparison.results:
        row.prefill_s = row.analysis_s = row.compress_s = row.decode_s = 0.0
    return shown


@pytest.fixture(scope="module")
def local_view(tiny):
    runner = Runner(tiny)
    return views.comparison_result(tiny, runner.compare(OPTIONS.request(runner)))


def test_wire_sends_analyses_and_comparisons_exactly(tiny, local_view):
    pre = Runner(tiny).analyze(PROMPT.text, 16, deep=True)
    for result in (views.analysis_result(tiny, pre, True), local_view):
        text = json.dumps(wire.encode(result))
        assert_same(wire.decode(json.loads(text)), result)
    assert local_view.comparison.results[1].kept_map.size > 0 and "zigzag" in local_view.answer_tokens


@pytest.mark.parametrize(("value", "message"), [
    ({"__type__": "Popen", "args": ["rm"]}, "unknown result type 'Popen'"),
    ({"__type__": "DeviceInfo", "model": "m"}, "a DeviceInfo in the backend's answer is incomplete"),
    ({"__array__": "object", "shape": [1], "data": ""}, "no readable dtype"),
    ({"__array__": "float32", "shape": [3], "data": "AAAA"}, "is damaged"),
    ({"__array__": "float32", "shape": [1], "data": "!!"}, "is damaged"),
])
def test_wire_refuses_what_it_does_not_know_with_one_line(value, message):
    with pytest.raises(wire.WireError, match=message):
        wire.decode({"rows": [value]})


def test_the_view_endpoints_equal_an_in_process_run(tiny, local_view):
    application = create_app([tiny], "t0ken", Limits(keep_s=60))
    auth = {"Authorization": "Bearer t0ken"}
    try:
        with TestClient(application) as client:
            job = client.post("/views/analysis", headers=auth,
                              json=AnalyzeOptions(model="tiny", prompt=PROMPT.text, window=16).to_json()).json()
            while job["status"] not in ("done", "failed", "cancelled"):
                job = client.get(f"/jobs/{job['id']}", headers=auth).json()
            assert job["status"] == "done", job
            analysed = wire.decode(job["result"])
            expected = views.analysis_result(tiny, Runner(tiny).analyze(PROMPT.text, 16), False)
            analysed = views.AnalysisResult(**{**analysed.__dict__, "prefill_s": expected.prefill_s})
            assert_same(analysed, expected)

            job = client.post("/views/compare", headers=auth, json=OPTIONS.to_json()).json()
            while job["status"] not in ("done", "failed", "cancelled"):
                job = client.get(f"/jobs/{job['id']}", headers=auth).json()
            assert job["status"] == "done", job
            assert [row["method"] for row in job["landed"]] == ["full", "zigzag", "uniform"]
            assert [row["text"] for row in job["landed"]] == [r.text for r in local_view.comparison.results]
            assert_same(without_times(wire.decode(job["result"])), without_times(local_view))

            models = client.get("/models", headers=auth).json()["models"]
            assert models[0]["device"] == "cpu" and models[0]["dtype"] == "float32"
            assert models[0]["gpu_bytes_in_use"] is None
    finally:
        application.state.server.close()


def test_a_stopped_wait_cancels_the_job_on_the_server_and_the_model_serves_the_next(served, local_view):
    url, token_file, _ = served
    token = token_file.read_text().strip()
    remote = backends.remote(url, token)
    long_options = CompareOptions(**{**OPTIONS.to_json(), "prompt": passkey_prompt(n_sentences=120, seed=5).text,
                                     "max_new_tokens": 400})
    seen = []

    def stop_after_the_first_row(fraction, message):
        seen.append(message)
        if any("compress and decode" in m for m in seen):
            raise KeyboardInterrupt  # what a page rerun or Ctrl-C does to the wait

    with pytest.raises(KeyboardInterrupt):
        remote.comparison(long_options, stop_after_the_first_row, lambda method, text: None)
    auth = {"Authorization": f"Bearer {token}"}
    deadline_jobs = [httpx.get(f"{url}/models", headers=auth, timeout=10).json()["models"][0]["jobs"]]
    landed = []
    shown = remote.comparison(OPTIONS, lambda fraction, message: None, lambda method, text: landed.append(method))
    assert landed == ["full", "zigzag", "uniform"]
    assert_same(without_times(shown), without_times(local_view))
    assert deadline_jobs[0] <= 1  # the cancelled job did not stay queued behind anything


def test_devices_describe_where_the_model_runs():
    cpu = views.DeviceInfo("smollm2", "cpu", "float32")
    gpu = views.DeviceInfo("llama", "cuda:0", "bfloat16", 3 * 2**30, 80 * 2**30)
    assert cpu.describe() == "smollm2 on cpu · float32"
    assert gpu.describe() == "llama on cuda:0 · bfloat16 · GPU memory 3.00 of 80 GiB"


def _compare_page(url: str, token: str) -> AppTest:
    at = AppTest.from_file(COMPARE_PAGE, default_timeout=300)
    at.run()
    at.radio(key="backend_kind").set_value("model server").run()
    at.text_input(key="backend_url").set_value(url).run()
    at.text_input(key="backend_token").set_value(token).run()
    return at


def _run(at: AppTest) -> AppTest:
    """Set the page to OPTIONS and press Run."""
    at.multiselect(key="methods").set_value(["full", "zigzag", "uniform"])
    next(s for s in at.slider if s.label == "Kept fraction of the prompt").set_value(OPTIONS.budget)
    next(n for n in at.number_input if n.label.startswith("Observation window")).set_value(OPTIONS.window)
    next(n for n in at.number_input if n.label == "Max new tokens").set_value(OPTIONS.max_new_tokens)
    at.selectbox(key="prompt_source").set_value("type your own").run()
    at.text_area[0].set_value(OPTIONS.prompt)
    next(t for t in at.text_input if t.label.startswith("Known answer")).set_value(OPTIONS.answer)
    return next(b for b in at.button if b.label == "Run").click().run()


def test_the_uncertainty_page_through_a_server_equals_an_in_process_analysis(served, tiny):
    url, token_file, _ = served
    at = AppTest.from_file(str(ROOT / "pages" / "2_Uncertainty.py"), default_timeout=300)
    at.run()
    at.radio(key="backend_kind").set_value("model server").run()
    at.text_input(key="backend_url").set_value(url).run()
    at.text_input(key="backend_token").set_value(token_file.read_text().strip()).run()
    next(n for n in at.number_input if n.label.startswith("Observation window")).set_value(16)
    at.text_area[0].set_value(PROMPT.text)
    next(b for b in at.button if b.label == "Analyze").click().run()
    assert not at.exception and not at.error, [e.value for e in at.error]
    shown = at.session_state["uncertainty"]
    expected = views.analysis_result(tiny, Runner(tiny).analyze(PROMPT.text, 16), False)
    assert_same(views.AnalysisResult(**{**shown.__dict__, "prefill_s": expected.prefill_s}), expected)
    assert at.multiselect[0].options == ["tiny"]  # the models to compare are the server's


def test_the_environment_token_is_used_but_never_sent_to_the_browser(served, monkeypatch):
    url, token_file, _ = served
    token = token_file.read_text().strip()
    monkeypatch.setenv("ZIGZAG_VIZ_BACKEND", url)
    monkeypatch.setenv("ZIGZAG_VIZ_TOKEN", token)
    at = AppTest.from_file(COMPARE_PAGE, default_timeout=120)
    at.run()
    assert at.radio(key="backend_kind").value == "model server" and at.text_input(key="backend_url").value == url
    assert at.text_input(key="backend_token").value == ""  # the widget (and so the browser) never holds it
    assert at.selectbox(key="model_served").options == ["tiny"] and not at.warning


def test_the_compare_page_through_a_server_and_the_server_going_away(served, local_view, monkeypatch):
    url, token_file, server = served
    token = token_file.read_text().strip()
    wrong = _compare_page(url, "not-the-token")
    assert f"the backend at {url} refused the token (missing or wrong bearer token)" in [w.value for w in wrong.warning]
    assert not wrong.exception

    at = _compare_page(url, token)
    assert at.selectbox(key="model_served").options == ["tiny"]
    assert any(f"tiny on cpu · float32" in c.value for c in at.sidebar.caption)
    _run(at)
    assert not at.exception and not at.error, [e.value for e in at.error]
    shown = at.session_state["comparison"]
    assert_same(without_times(shown), without_times(local_view))

    server.kill()
    server.wait(timeout=20)
    next(b for b in at.button if b.label == "Run").click().run()
    assert not at.exception
    errors = [e.value for e in at.error]
    assert len(errors) == 1 and errors[0].startswith(f"Comparison: the backend at {url} ")
    assert "\n" not in errors[0]
    assert at.session_state["comparison"] is shown  # the last results stay
    assert any(h.value == "Answers side by side" for h in at.subheader)

