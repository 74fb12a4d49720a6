"""Reliability: bad input of every kind gives one clear line (fuzzed with Hypothesis), bugs give one line with the
traceback in the error log, the server limits its callers' rate and sends no CORS headers, and a model that asks
to run its own code is refused without running it."""

import json
import math
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from zigzag_viz import cli
from zigzag_viz.errors import InputError, ModelLoadError, OutOfMemoryError, UserError
from zigzag_viz.evaluation.prompts import passkey_prompt
from zigzag_viz.evaluation.runner import LruCache, Runner, check_settings
from zigzag_viz.evaluation.store import check_run_name
from zigzag_viz.failures import error_log, keep_out_of_logs, log_failure
from zigzag_viz.methods import METHODS, parse_specs
from zigzag_viz.pipeline.budgets import kept_fraction
from zigzag_viz.pipeline.models import load_model
from zigzag_viz.presentation import views
from zigzag_viz.presentation.backends import InProcess, Turns
from zigzag_viz.serving.api import AnalyzeOptions, CompareOptions
from zigzag_viz.serving.server import Limits, RateLimit, create_app

TOKEN = "reliability-token-42"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


def one_line(message: str) -> None:
    assert message and "\n" not in message and len(message) <= 400, message


# ---------------------------------------------------------------------------------------------------------------
# Bad input, fuzzed

SPEC_PIECES = st.sampled_from(sorted(METHODS) + ["[", "]", "+", ",", "=", "rho", "0.5", "nan", "inf", "-1",
                                                 "select", "expected", " ", "signal", "beta", "abc", "[[", "\x00"])
SPEC_TEXT = st.one_of(st.text(max_size=60), st.lists(SPEC_PIECES, max_size=12).map("".join))


@settings(max_examples=300, deadline=None)
@given(SPEC_TEXT)
def test_any_spec_text_parses_or_gives_one_line(text):
    try:
        methods = parse_specs(text)
    except InputError as exc:
        one_line(str(exc))
        return
    for method in methods:  # what parses has a canonical spec that reads back to itself
        assert parse_specs(method.spec)[0].spec == method.spec


@pytest.mark.parametrize("text", ["zigzag[rho=", "zigzag[[", "a+", "+", "z" * 10_000, "zigzag[rho=nan]",
                                  "zigzag[rho=inf]", "zigzag[nosuch=1]", "pyramid[beta=abc]", "zigzag+", ","])
def test_malformed_specs_give_one_short_line(text):
    with pytest.raises(InputError) as caught:
        parse_specs(text)
    one_line(str(caught.value))


VALUES = st.one_of(st.none(), st.booleans(), st.integers(-10**12, 10**12), st.floats(allow_nan=True, allow_infinity=True),
                   st.text(max_size=30), st.lists(st.integers(), max_size=3), st.dictionaries(st.text(max_size=5), st.integers(), max_size=2))
FIELDS = st.sampled_from(["model", "prompt", "methods", "budget", "window", "max_new_tokens", "mode", "question",
                          "answer", "tau", "signal", "heads", "deep", "tokens", "nosuch"])


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(FIELDS, VALUES, max_size=8), st.sampled_from([CompareOptions, AnalyzeOptions]))
def test_any_request_body_is_read_or_refused_with_one_line(body, kind):
    try:
        options = kind.from_json(body)
        if kind is CompareOptions:
            check_settings(options.methods, options.budget, options.mode, options.window, options.max_new_tokens)
    except UserError as exc:
        one_line(str(exc))


@settings(max_examples=200, deadline=None)
@given(st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.integers(), st.text(max_size=12), st.none()))
def test_a_kept_fraction_is_in_zero_one_or_refused(value):
    try:
        fraction = kept_fraction(value)
    except InputError as exc:
        one_line(str(exc))
        return
    assert isinstance(fraction, float) and math.isfinite(fraction) and 0 < fraction <= 1


ODD_TEXT = st.text(st.characters(codec="utf-8", categories=["L", "N", "P", "S", "Z", "Cc", "Cf", "Mn"]),
                   max_size=80)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ODD_TEXT, st.sampled_from(["aware", "context"]))
def test_any_prompt_text_is_accepted_or_refused_before_any_work(tiny, prompt, mode):
    """Control characters, zero-width and right-to-left marks, emoji, whitespace only: a request or one line."""
    runner = Runner(tiny)
    try:
        request = runner.request(prompt, "full,uniform,zigzag", 0.5, mode=mode, window=2, max_new_tokens=1)
    except UserError as exc:
        one_line(str(exc))
        return
    assert prompt.strip() and request.input_ids.shape[1] >= 1


@pytest.mark.parametrize("prompt", ["", "   \n\t", "\u200b\u200b", "\u202e\u202d", "\x07\x08"])
def test_empty_looking_prompts_are_refused(tiny, prompt):
    with pytest.raises(UserError) as caught:
        Runner(tiny).request(prompt, "full", 0.5, window=2, max_new_tokens=1)
    one_line(str(caught.value))


def test_emoji_right_to_left_and_zero_width_text_runs(tiny):
    prompt = "Der Schlüssel ist 4821 \U0001F511. \u05d4\u05de\u05e4\u05ea\u05d7 \u200bzero\u200dwidth. What is the key?"
    comparison = Runner(tiny).compare(Runner(tiny).request(prompt, "full,zigzag", 0.5, window=4, max_new_tokens=2))
    assert [row.method for row in comparison.results] == ["full", "zigzag"]


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=64))
def test_any_bytes_as_a_prompt_file_give_text_or_one_line(tmp_path_factory, data):
    path = tmp_path_factory.mktemp("prompt") / "prompt.txt"
    path.write_bytes(data)
    try:
        text = cli.read_prompt(str(path))
    except InputError as exc:
        one_line(str(exc))
        return
    assert text.strip() and "\x00" not in text


@pytest.mark.parametrize("name", ["..", ".", "a/b", "../x", "a\x00b", "", "x" * 200, "a b", "/abs"])
def test_run_names_that_could_leave_the_runs_folder_are_refused(name):
    with pytest.raises(InputError) as caught:
        check_run_name(name)
    one_line(str(caught.value))


# ---------------------------------------------------------------------------------------------------------------
# Bugs: one line for the user, the traceback in the error log

def test_a_bug_in_the_cli_is_one_line_and_its_traceback_is_logged(monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("ZIGZAG_VIZ_CACHE", str(tmp_path))

    def broken(_args):
        raise KeyError("deep inside")

    monkeypatch.setattr(cli, "run_compare", broken)
    assert cli.main(["compare", "--model", "tiny", "--prompt-file", "-"]) == 1
    message = capsys.readouterr().err.strip()
    log = tmp_path / "logs" / "errors.log"
    assert message == f"zigzag-viz: error: zigzag-viz compare failed unexpectedly (KeyError); details in {log}"
    text = log.read_text()
    assert "Traceback" in text and "KeyError: 'deep inside'" in text and "in broken" in text


def test_the_error_log_keeps_secrets_out_and_stays_bounded(monkeypatch, tmp_path):
    monkeypatch.setenv("ZIGZAG_VIZ_CACHE", str(tmp_path))
    monkeypatch.setattr("zigzag_viz.failures.MAX_LOG_BYTES", 2000)
    keep_out_of_logs("hunter2-secret")
    for index in range(20):
        try:
            raise ValueError(f"failure {index} with hunter2-secret")
        except ValueError as exc:
            assert log_failure(exc, "a test") == error_log()
    current, previous = error_log(), error_log().with_name("errors.log.1")
    assert previous.exists() and current.stat().st_size <= 2000 + 1000
    both = current.read_text() + previous.read_text()
    assert "failure 19 with ***" in both and "hunter2-secret" not in both


# ---------------------------------------------------------------------------------------------------------------
# The server: bugs, rate limits, CORS

@pytest.fixture()
def make_client(tiny):
    apps = []

    def make(**limits):
        app = create_app([tiny], TOKEN, Limits(**limits))
        apps.append(app)
        return TestClient(app, raise_server_exceptions=False)

    yield make
    for app in apps:
        app.state.server.close()


def test_a_bug_in_an_endpoint_is_a_one_line_500_and_logged_without_the_token(make_client, monkeypatch, tmp_path):
    monkeypatch.setenv("ZIGZAG_VIZ_CACHE", str(tmp_path))

    def broken(_loaded):
        raise AttributeError(f"no such thing, token {TOKEN}")

    monkeypatch.setattr(views, "device_info", broken)
    response = make_client().get("/models", headers=AUTH)
    assert response.status_code == 500
    assert response.json() == {"error": "GET /models failed unexpectedly (AttributeError); details in "
                                        f"{tmp_path / 'logs' / 'errors.log'}"}
    text = (tmp_path / "logs" / "errors.log").read_text()
    assert "AttributeError: no such thing, token ***" in text and TOKEN not in text


def test_requests_beyond_the_rate_get_429_with_retry_after(make_client):
    client = make_client(requests_per_minute=60, burst=3)
    assert [client.get("/methods", headers=AUTH).status_code for _ in range(3)] == [200, 200, 200]
    refused = client.get("/methods", headers=AUTH)
    assert refused.status_code == 429 and int(refused.headers["retry-after"]) >= 1
    one_line(refused.json()["error"])
    assert client.get("/health").status_code == 200  # health is never limited


def test_guessing_tokens_is_slowed_down(make_client):
    client = make_client(wrong_tokens_per_minute=12)
    wrong = {"Authorization": "Bearer guess"}
    statuses = [client.get("/models", headers=wrong).status_code for _ in range(4)]
    assert statuses == [401, 401, 429, 429]
    assert client.get("/models", headers=AUTH).status_code == 200  # the right token still works


def test_a_token_bucket_refills_at_its_rate():
    clock = iter([0.0, 0.0, 0.0, 0.5, 1.0, 1.0])
    limit = RateLimit(per_minute=120, burst=2)  # two a second
    import zigzag_viz.serving.server as server_module

    original = server_module.time.monotonic
    server_module.time.monotonic = lambda: next(clock)
    try:
        waits = [limit.wait_s("k") for _ in range(6)]
    finally:
        server_module.time.monotonic = original
    assert waits[:2] == [0.0, 0.0] and waits[2] == pytest.approx(0.5)
    assert waits[3] == 0.0 and waits[4] == 0.0 and waits[5] == pytest.approx(0.5)


def test_no_cors_headers_are_sent(make_client):
    client = make_client()
    origin = {"Origin": "https://elsewhere.example"}
    preflight = client.options("/compare", headers={**origin, "Access-Control-Request-Method": "POST"})
    assert "access-control-allow-origin" not in preflight.headers
    plain = client.get("/methods", headers={**AUTH, **origin})
    assert plain.status_code == 200 and "access-control-allow-origin" not in plain.headers


# ---------------------------------------------------------------------------------------------------------------
# Remote code never runs

@pytest.mark.parametrize("where", ["config.json", "tokenizer_config.json"])
def test_a_model_folder_that_ships_code_is_refused_without_running_it(tmp_path, where):
    marker = tmp_path / "RAN"
    code = f"open({str(marker)!r}, 'w').write('ran')\n"
    for module in ("configuration_custom.py", "modeling_custom.py", "tokenization_custom.py"):
        (tmp_path / module).write_text(code)
    config = {"model_type": "custom_model", "architectures": ["CustomForCausalLM"]}
    auto_map = {"AutoConfig": "configuration_custom.CustomConfig",
                "AutoModelForCausalLM": "modeling_custom.CustomForCausalLM",
                "AutoTokenizer": ["tokenization_custom.CustomTokenizer", None]}
    (tmp_path / "config.json").write_text(json.dumps({**config, **({"auto_map": auto_map} if where == "config.json" else {})}))
    if where == "tokenizer_config.json":
        (tmp_path / where).write_text(json.dumps({"auto_map": auto_map}))
    with pytest.raises(ModelLoadError) as caught:
        load_model(str(tmp_path))
    one_line(str(caught.value))
    assert "never runs" in str(caught.value) and not marker.exists()


# ---------------------------------------------------------------------------------------------------------------
# The load benchmark stays runnable

@pytest.mark.slow
def test_the_server_load_benchmark_runs_a_small_load_without_errors(tmp_path):
    root = Path(__file__).resolve().parents[1]
    out = tmp_path / "load.json"
    done = subprocess.run([sys.executable, str(root / "benchmarks" / "server_load.py"), "--requests", "8",
                           "--clients", "3", "--baseline", "2", "--out", str(out)],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    record = json.loads(out.read_text())
    assert record["errors"] == 0 and record["requests"] == 8 and record["clients"] == 3
    under_load = record["under_load"]
    assert 0 < under_load["p50_s"] <= under_load["p95_s"] <= under_load["p99_s"]
    assert record["p99_bound_s"] == pytest.approx(3 * record["single_request"]["p99_s"], abs=1e-3)


# ---------------------------------------------------------------------------------------------------------------
# Concurrent sessions of one app

def _session_options(index: int) -> CompareOptions:
    prompt = passkey_prompt(n_sentences=8 + index, depth=0.5, seed=300 + index)
    return CompareOptions("tiny", prompt.text, "full,zigzag,uniform", 0.5, 3, window=8, answer=prompt.answer).check()


def test_five_sessions_at_once_get_the_rows_of_five_serial_runs_and_hear_they_are_queued(tiny):
    backend = InProcess(lambda _name: tiny, LruCache())
    options = [_session_options(index) for index in range(5)]
    serial = []
    for option in options:
        runner = Runner(tiny)
        serial.append([(r.method, r.text, r.token_ids, r.kv_bytes) for r in runner.compare(option.request(runner)).results])

    start = threading.Barrier(5)
    heard: list[list[str]] = [[] for _ in options]
    results: list = [None] * 5

    def session(index: int) -> None:
        start.wait()
        results[index] = backend.comparison(options[index], lambda _f, message: heard[index].append(message),
                                            lambda _method, _text: None)

    threads = [threading.Thread(target=session, args=(index,)) for index in range(5)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=300)
    assert not any(thread.is_alive() for thread in threads), "a session is still waiting"
    for result, rows in zip(results, serial):
        assert [(r.method, r.text, r.token_ids, r.kv_bytes) for r in result.comparison.results] == rows
    waits = [message for messages in heard for message in messages if message.startswith("waiting: ")]
    assert waits and all(message.endswith("run(s) ahead on tiny in this app") for message in waits)


def test_a_session_that_stops_waiting_leaves_the_queue_and_the_others_go_on(tiny):
    turns = Turns(poll_s=0.02)
    holding, release = threading.Event(), threading.Event()

    def first() -> None:
        with turns.turn(lambda *_: None, "tiny"):
            holding.set()
            release.wait(10)

    def cancelled(_fraction, message):
        raise RuntimeError("cancelled: " + message)

    thread = threading.Thread(target=first)
    thread.start()
    holding.wait(10)
    with pytest.raises(RuntimeError, match="cancelled: waiting: 1 run"):
        with turns.turn(cancelled, "tiny"):
            pass
    release.set()
    thread.join(10)
    with turns.turn(cancelled, "tiny"):  # nobody ahead: no waiting, no message
        pass


# ---------------------------------------------------------------------------------------------------------------
# Out of memory

def _lock_is_free(loaded) -> bool:
    """Whether another thread can take the model's lock at once."""
    taken = []

    def take() -> None:
        if loaded.lock.acquire(blocking=False):
            taken.append(True)
            loaded.lock.release()

    thread = threading.Thread(target=take)
    thread.start()
    thread.join(10)
    return bool(taken)


@pytest.mark.parametrize("failing_call, where", [(1, "prefill"), (4, "decode")])
def test_out_of_memory_in_prefill_or_decode_is_one_line_frees_the_model_and_the_next_run_works(tiny, failing_call, where):
    backend = InProcess(lambda _name: tiny, LruCache())
    options = _session_options(9)
    calls = []

    def runs_out(_module, _args):
        calls.append(1)
        if len(calls) == failing_call:
            raise torch.OutOfMemoryError(f"CUDA out of memory in the {where} (simulated)")

    handle = tiny.model.register_forward_pre_hook(runs_out)
    try:
        with pytest.raises(OutOfMemoryError) as caught:
            backend.comparison(options, lambda *_: None, lambda *_: None)
    finally:
        handle.remove()
    one_line(str(caught.value))
    assert str(caught.value).startswith("the device ran out of memory")
    assert _lock_is_free(tiny)  # and the turn is free: the next run below would wait forever otherwise
    rows = backend.comparison(options, lambda *_: None, lambda *_: None).comparison.results
    runner = Runner(tiny)
    expected = runner.compare(options.request(runner)).results
    assert [(r.method, r.token_ids) for r in rows] == [(r.method, r.token_ids) for r in expected]
