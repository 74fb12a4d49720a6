"""The model server (`zigzag-viz serve`) and the CLI as its client: the token, limits and one-line errors, the
same JSON as the local CLI, jobs that queue, cancel, fail and are kept, progress as server-sent events, and a
real server process reached with `--backend` and killed mid-job."""

import json
import os
import socket
import stat
import subprocess
import sys
import threading
import time

import httpx
import pytest
from conftest import start_server
from fastapi.testclient import TestClient

from zigzag_viz import cli
from zigzag_viz.errors import OutOfMemoryError
from zigzag_viz.evaluation import runner as runner_module
from zigzag_viz.evaluation.prompts import passkey_prompt
from zigzag_viz.evaluation.runner import Runner
from zigzag_viz.pipeline import runtime
from zigzag_viz.serving.api import CompareOptions
from zigzag_viz.serving.jobs import Job, JobStore
from zigzag_viz.serving.server import Limits, create_app, server_token

TOKEN = "test-token-0123456789"  # the `served` fixture's token (conftest.SERVER_TOKEN)
AUTH = {"Authorization": f"Bearer {TOKEN}"}
PROMPT = passkey_prompt(n_sentences=12, seed=7)
OTHER_PROMPT = passkey_prompt(n_sentences=10, seed=8)
COMPARE = {"model": "tiny", "prompt": PROMPT.text, "methods": "full,zigzag,uniform", "budget": 0.4, "window": 16,
           "max_new_tokens": 4, "answer": PROMPT.answer}
TIMINGS = {"prefill_s", "analysis_s", "compress_s", "decode_s", "ms_per_token"}
WAIT_S = 120


@pytest.fixture()
def app(tiny):
    application = create_app([tiny], TOKEN, Limits(keep_s=60, keep_finished=8))
    yield application
    application.state.server.close()


@pytest.fixture()
def client(app):
    with TestClient(app) as test_client:
        yield test_client


def wait_for(client, job_id, statuses=("done", "failed", "cancelled"), timeout=WAIT_S) -> dict:
    """Poll GET /jobs/{id} (every 50 ms, at most `timeout` seconds) until its status is one of `statuses`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = client.get(f"/jobs/{job_id}", headers=AUTH).json()
        if job["status"] in statuses:
            return job
        time.sleep(0.05)
    raise AssertionError(f"job {job_id} still {job['status']} after {timeout} s")


def submit(client, **changes) -> str:
    response = client.post("/compare", headers=AUTH, json={**COMPARE, **changes})
    assert response.status_code == 202, response.text
    return response.json()["id"]


def local_rows(tiny, body: dict) -> list[dict]:
    runner = Runner(tiny)
    options = CompareOptions.from_json(body)
    return [row.to_json() for row in runner.compare(options.request(runner)).results]


def same_rows(served: list[dict], local: list[dict]) -> None:
    """Rows equal in every field but wall times; texts, token ids and KV bytes exactly."""
    assert [set(row) for row in served] == [set(row) for row in local]
    for a, b in zip(served, local):
        assert (a["method"], a["text"], a["token_ids"], a["kv_bytes"]) == (b["method"], b["text"], b["token_ids"], b["kv_bytes"])
        assert {k: v for k, v in a.items() if k not in TIMINGS} == {k: v for k, v in b.items() if k not in TIMINGS}


def one_line_error(response, status: int) -> str:
    assert response.status_code == status, response.text
    message = response.json()["error"]
    assert set(response.json()) == {"error"} and "\n" not in message and message
    return message


# ---------------------------------------------------------------------------------------------------------------
# The token, limits and errors

@pytest.mark.parametrize("method, path", [
    ("GET", "/models"), ("GET", "/methods"), ("POST", "/analyze"), ("POST", "/compare"), ("GET", "/jobs/abc"),
    ("GET", "/jobs/abc/events"), ("DELETE", "/jobs/abc"),
])
@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer wrong-token"}, {"Authorization": TOKEN},
                                     {"Authorization": f"Basic {TOKEN}"}])
def test_every_endpoint_but_health_needs_the_token(client, method, path, headers):
    response = client.request(method, path, headers=headers, json={"model": "tiny", "prompt": "hi"})
    assert one_line_error(response, 401) == "missing or wrong bearer token"
    assert response.headers["www-authenticate"] == "Bearer" and "wrong-token" not in response.text
    assert "access-control-allow-origin" not in response.headers


def test_health_is_open_and_models_and_methods_mirror_the_cli(client, tiny, capsys):
    assert client.get("/health").json() == {"status": "ok"}
    models = client.get("/models", headers=AUTH).json()["models"]
    assert models == [{"name": "tiny", "device": "cpu", "dtype": "float32", "gpu_bytes_in_use": None,
                       "gpu_bytes_total": None, "layers": 4, "max_context": 4096, "jobs": 0}]
    assert cli.main(["methods", "--json"]) == 0
    assert client.get("/methods", headers=AUTH).text == capsys.readouterr().out.strip()


def test_an_oversized_body_is_refused_with_413(client):
    big = {**COMPARE, "prompt": "word " * 500_000}
    one_line_error(client.post("/compare", headers=AUTH, json=big), 413)
    streamed = (chunk for chunk in [b'{"model": "tiny", "prompt": "', b"x" * 2**20, b"y" * 2**20, b'"}'])
    one_line_error(client.post("/analyze", headers=AUTH, content=streamed), 413)


@pytest.mark.parametrize("path", ["/compare", "/analyze"])
@pytest.mark.parametrize("changes, message", [
    ({"prompt": ""}, "the prompt is empty"),
    ({"prompt": "   "}, "the prompt is empty"),
    ({"budget": 2}, "budget must be a number in (0, 1], got 2"),
    ({"budget": "half"}, "budget must be a number"),
    ({"window": 0}, "window must be a whole number"),
    ({"model": "no-such-model"}, "unknown model 'no-such-model': this server has tiny"),
    ({"speed": "fast"}, "unknown field 'speed'"),
    ({"prompt": "word " * 5000}, "accepts at most 4096"),
])
def test_bad_input_gives_422_with_one_line(client, path, changes, message):
    body = {"model": "tiny", "prompt": PROMPT.text, **changes}
    assert message in one_line_error(client.post(path, headers=AUTH, json=body), 422)


@pytest.mark.parametrize("changes, message", [
    ({"methods": "full,bogus"}, "unknown method 'bogus'"),
    ({"methods": "zigzag[rho="}, "cannot read method spec 'zigzag[rho='"),
    ({"methods": ",".join(["uniform"] * 17)}, "at most 16 methods per comparison on this server, got 17"),
    ({"max_new_tokens": 513}, "max_new_tokens must be at most 512 on this server, got 513"),
    ({"mode": "sideways"}, "mode must be one of aware, context"),
    ({"budget": 0.01}, "below the always-kept window"),
    ({"match_bytes": "yes"}, "match_bytes must be true or false"),
])
def test_bad_comparisons_give_422_before_any_job(client, changes, message):
    assert message in one_line_error(client.post("/compare", headers=AUTH, json={**COMPARE, **changes}), 422)


def test_non_json_bodies_and_unknown_jobs(client):
    assert "not JSON" in one_line_error(client.post("/analyze", headers=AUTH, content=b"{oops"), 422)
    assert "must be a JSON object" in one_line_error(client.post("/analyze", headers=AUTH, json=[1]), 422)
    for method, path in (("GET", "/jobs/nope"), ("DELETE", "/jobs/nope"), ("GET", "/jobs/nope/events")):
        assert "no job 'nope'" in one_line_error(client.request(method, path, headers=AUTH), 404)


# ---------------------------------------------------------------------------------------------------------------
# The same JSON as the CLI

def test_analyze_answers_what_the_cli_prints(client, tmp_path, capsys):
    prompt_file = tmp_path / "prompt.txt"
    prompt_file.write_text(PROMPT.text)
    assert cli.main(["analyze", "--model", "tiny", "--prompt-file", str(prompt_file), "--window", "16",
                     "--budget", "0.3", "--heads", "--tokens", "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    body = {"model": "tiny", "prompt": PROMPT.text, "window": 16, "budget": 0.3, "heads": True, "tokens": True}
    response = client.post("/analyze", headers=AUTH, json=body)
    assert response.status_code == 200, response.text
    served = response.json()
    assert list(served) == list(printed) and served.pop("prefill_s") > 0
    printed.pop("prefill_s")
    assert served == printed


def test_a_compare_job_gives_the_rows_of_a_local_run_and_the_whole_export(client, tiny):
    job = wait_for(client, submit(client))
    assert job["status"] == "done" and job["progress"] == {"fraction": 1.0, "message": "done", "queue_position": None}
    rows = job["result"]["rows"]
    same_rows(rows, local_rows(tiny, COMPARE))
    export = job["result"]["comparison"]
    assert export["model"] == "tiny" and export["answer"] == PROMPT.answer and export["budget"] == 0.4
    assert [r["method"] for r in export["results"]] == ["full", "zigzag", "uniform"]
    assert export["results"] == rows and set(export["kept_map"]["methods"]) == {"full", "zigzag", "uniform"}


def test_a_compare_job_at_equal_bytes_gives_the_rows_of_a_local_run(client, tiny):
    body = {**COMPARE, "methods": "full,uniform,think", "match_bytes": True}
    rows = wait_for(client, submit(client, **body))["result"]["rows"]
    assert [r["method"] for r in rows] == ["full", "uniform", "uniform+think"]
    same_rows(rows, local_rows(tiny, body))


def test_two_clients_at_once_get_the_rows_of_two_serial_runs(app, tiny):
    bodies = [COMPARE, {**COMPARE, "prompt": OTHER_PROMPT.text, "methods": "full,pyramid", "mode": "context"}]
    served: list = [None, None]

    def run(index):
        with TestClient(app) as own:
            served[index] = wait_for(own, submit(own, **bodies[index]))

    threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(WAIT_S)
    for body, job in zip(bodies, served):
        assert job["status"] == "done"
        same_rows(job["result"]["rows"], local_rows(tiny, body))


# ---------------------------------------------------------------------------------------------------------------
# Jobs: queue, cancel, failures, retention, events

@pytest.fixture()
def gate(monkeypatch):
    """Holds every runner at its first 'uniform' row report until `gate["open"].set()`; `gate["reached"]` is set
    when one gets there."""
    events = {"reached": threading.Event(), "open": threading.Event()}
    report = Runner.report

    def held_report(self, fraction, message):
        if message.startswith("uniform"):
            events["reached"].set()
            events["open"].wait(WAIT_S)
        report(self, fraction, message)

    monkeypatch.setattr(Runner, "report", held_report)
    yield events
    events["open"].set()


def test_cancelling_stops_the_running_job_and_drops_a_queued_one_and_the_next_job_runs(client, tiny, gate):
    running = submit(client)
    assert gate["reached"].wait(WAIT_S)
    queued, after = submit(client, max_new_tokens=3), submit(client, max_new_tokens=2)
    job = client.get(f"/jobs/{queued}", headers=AUTH).json()
    assert job["status"] == "queued" and job["progress"]["queue_position"] == 1
    assert client.get(f"/jobs/{after}", headers=AUTH).json()["progress"]["queue_position"] == 2

    assert client.delete(f"/jobs/{queued}", headers=AUTH).json()["status"] == "cancelled"
    assert client.get(f"/jobs/{after}", headers=AUTH).json()["progress"]["queue_position"] == 1
    assert client.delete(f"/jobs/{running}", headers=AUTH).status_code == 202
    gate["open"].set()
    assert wait_for(client, running)["status"] == "cancelled"
    assert wait_for(client, queued)["status"] == "cancelled"
    job = wait_for(client, after)
    assert job["status"] == "done"
    same_rows(job["result"]["rows"], local_rows(tiny, {**COMPARE, "max_new_tokens": 2}))
    assert tiny.lock.acquire(blocking=False)
    tiny.lock.release()


def test_a_result_outlives_the_client_that_asked(app):
    with TestClient(app) as first:
        job_id = submit(first)
    with TestClient(app) as later:
        assert wait_for(later, job_id)["result"]["rows"][0]["method"] == "full"


def test_finished_jobs_are_kept_for_a_while_and_in_bounded_number(monkeypatch):
    clock = [1000.0]
    monkeypatch.setattr("zigzag_viz.serving.jobs.time.monotonic", lambda: clock[0])
    store = JobStore(keep_s=60, keep_finished=2)
    jobs = [store.add(Job("tiny", "compare", lambda progress: None)) for _ in range(4)]
    for job in jobs[:3]:
        job.succeed({"rows": []})
        clock[0] += 1
    assert store.get(jobs[0].id) is None and store.get(jobs[1].id) is jobs[1] and store.get(jobs[3].id) is jobs[3]
    clock[0] += 61
    assert store.get(jobs[1].id) is None and store.get(jobs[2].id) is None
    assert store.get(jobs[3].id) is jobs[3]  # unfinished jobs stay


def test_out_of_memory_fails_the_job_with_one_line_and_the_server_goes_on(client, tiny, monkeypatch):
    calls = []
    prefill_reference = runner_module.prefill_reference

    def first_runs_out(*args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            raise OutOfMemoryError("the device ran out of memory: try a shorter prompt, fewer methods, or the CPU")
        return prefill_reference(*args, **kwargs)

    monkeypatch.setattr(runner_module, "prefill_reference", first_runs_out)
    failed = wait_for(client, submit(client))
    assert failed["status"] == "failed" and failed["error"].startswith("the device ran out of memory")
    assert "\n" not in failed["error"] and "result" not in failed
    assert wait_for(client, submit(client))["status"] == "done"

    prefill = runtime.prefill

    def analysis_runs_out(*args, **kwargs):
        monkeypatch.setattr(runtime, "prefill", prefill)
        raise OutOfMemoryError("the device ran out of memory")

    monkeypatch.setattr(runtime, "prefill", analysis_runs_out)
    body = {"model": "tiny", "prompt": PROMPT.text}
    assert one_line_error(client.post("/analyze", headers=AUTH, json=body), 507) == "the device ran out of memory"
    assert client.post("/analyze", headers=AUTH, json=body).status_code == 200


def test_an_unexpected_error_fails_the_job_in_one_line_and_logs_its_traceback_without_the_token(
        client, monkeypatch, tmp_path):
    monkeypatch.setenv("ZIGZAG_VIZ_CACHE", str(tmp_path))

    def broken(*args, **kwargs):
        raise RuntimeError(f"secret internals {TOKEN}")

    monkeypatch.setattr(runner_module, "prefill_reference", broken)
    job = wait_for(client, submit(client))
    log = tmp_path / "logs" / "errors.log"
    assert job["error"] == f"job {job['id']} (compare on tiny) failed unexpectedly (RuntimeError); details in {log}"
    text = log.read_text()
    assert "Traceback" in text and "secret internals ***" in text and TOKEN not in text


def parse_events(text: str) -> list[tuple[str, dict]]:
    events = []
    for block in text.strip().split("\n\n"):
        lines = dict(line.split(": ", 1) for line in block.splitlines() if not line.startswith(":"))
        if lines:
            events.append((lines["event"], json.loads(lines["data"])))
    return events


def test_events_stream_progress_then_the_final_status(client):
    job_id = submit(client)
    response = client.get(f"/jobs/{job_id}/events", headers=AUTH)
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/event-stream")
    events = parse_events(response.text)
    names = [name for name, _ in events]
    assert names[-1] == "end" and set(names[:-1]) == {"progress"} and len(names) > 5
    fractions = [record["progress"]["fraction"] for _, record in events]
    assert fractions == sorted(fractions)
    assert any("prefill: layer 4 of 4" in record["progress"]["message"] for _, record in events)
    final = events[-1][1]
    assert final["status"] == "done" and final["result"] == client.get(f"/jobs/{job_id}", headers=AUTH).json()["result"]
    again = parse_events(client.get(f"/jobs/{job_id}/events", headers=AUTH).text)  # a finished job: one event
    assert [name for name, _ in again] == ["end"]


# ---------------------------------------------------------------------------------------------------------------
# Serving: the token, a real server process and the CLI as its client

def test_serving_beyond_loopback_needs_a_token_of_ones_own(monkeypatch, capsys, tmp_path):
    monkeypatch.delenv("ZIGZAG_VIZ_TOKEN", raising=False)
    monkeypatch.setenv("ZIGZAG_VIZ_CACHE", str(tmp_path))
    assert cli.main(["serve", "--model", "tiny", "--host", "0.0.0.0"]) == 2
    assert "0.0.0.0 is not a loopback address" in capsys.readouterr().err
    token = server_token(None, "127.0.0.1")
    path = tmp_path / "server-token"
    assert path.read_text().strip() == token and len(token) >= 32
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert capsys.readouterr().out.count(token) == 1
    monkeypatch.setenv("ZIGZAG_VIZ_TOKEN", "from-the-environment")
    assert server_token(None, "0.0.0.0") == "from-the-environment"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_cli(*args, stdin=None, timeout=300):
    env = dict(os.environ, ZIGZAG_VIZ_DEVICE="cpu")
    env.pop("ZIGZAG_VIZ_TOKEN", None)
    return subprocess.run([sys.executable, "-m", "zigzag_viz.cli", *args], input=stdin, capture_output=True,
                          text=True, env=env, timeout=timeout)


def run_in_process(capsys, *args) -> tuple[int, str, str]:
    code = cli.main(list(args))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_analyze_through_a_backend_and_an_unreachable_backend(served, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("ZIGZAG_VIZ_TOKEN", raising=False)
    url, token_file, _ = served
    prompt_file = tmp_path / "prompt.txt"
    prompt_file.write_text(OTHER_PROMPT.text)
    args = ["analyze", "--model", "tiny", "--prompt-file", str(prompt_file), "--window", "16", "--json"]
    code, out, _ = run_in_process(capsys, *args)
    local = json.loads(out)
    code, out, err = run_in_process(capsys, *args, "--backend", url, "--token-file", str(token_file))
    assert code == 0, err
    remote = json.loads(out)
    assert local.pop("prefill_s") > 0 and remote.pop("prefill_s") > 0 and remote == local

    code, _, err = run_in_process(capsys, *args, "--backend", url, "--token-file", str(token_file), "--budget", "0.01")
    assert code == 2 and len(err.splitlines()) == 1 and err.startswith("zigzag-viz: error: a budget of")
    nowhere = f"http://127.0.0.1:{_free_port()}"
    code, _, err = run_in_process(capsys, *args, "--backend", nowhere, "--token-file", str(token_file))
    assert code == 2 and err == f"zigzag-viz: error: the backend at {nowhere} cannot be reached (ConnectError)\n"
    code, _, err = run_in_process(capsys, *args, "--backend", url)
    assert code == 2 and err == "zigzag-viz: error: no token for the backend: give --token-file or set ZIGZAG_VIZ_TOKEN\n"


def test_the_cli_on_a_server_prints_what_it_prints_locally_and_a_dead_server_is_one_line(served, tmp_path, capsys):
    url, token_file, server = served
    prompt_file = tmp_path / "prompt.txt"
    prompt_file.write_text(PROMPT.text)
    args = ["compare", "--model", "tiny", "--prompt-file", str(prompt_file), "--methods", "full,zigzag,uniform",
            "--budget", "0.4", "--window", "16", "--max-new-tokens", "4", "--answer", PROMPT.answer, "--json"]
    code, out_local, err = run_in_process(capsys, *args, "--export", str(tmp_path / "local.json"))
    assert code == 0 and err == ""
    remote = run_cli(*args, "--export", str(tmp_path / "remote.json"), "--backend", url, "--token-file", str(token_file))
    assert remote.returncode == 0 and remote.stderr == "", remote.stderr
    same_rows(json.loads(remote.stdout), json.loads(out_local))
    exports = [json.loads((tmp_path / name).read_text()) for name in ("local.json", "remote.json")]
    assert exports[0]["kept_map"] == exports[1]["kept_map"]

    code, out, err = run_in_process(capsys, *args[:-1], "--backend", url, "--token-file", str(token_file))
    assert code == 0 and err.splitlines()[-1] == "100% done" and "token_agreement" in out

    wrong = tmp_path / "wrong"
    wrong.write_text("not-the-token")
    code, _, err = run_in_process(capsys, *args, "--backend", url, "--token-file", str(wrong))
    assert code == 2
    assert err == f"zigzag-viz: error: the backend at {url} refused the token (missing or wrong bearer token)\n"

    # a long job keeps the model busy; the CLI's job waits behind it when the server dies
    blocker = httpx.post(f"{url}/compare", headers=AUTH, timeout=30, json={
        **COMPARE, "prompt": passkey_prompt(n_sentences=120, seed=9).text, "max_new_tokens": 512,
        "methods": "full,zigzag,uniform,pyramid,streaming,l2norm,adakv,minicache"})
    assert blocker.status_code == 202, blocker.text
    client = subprocess.Popen([sys.executable, "-m", "zigzag_viz.cli", *args, "--backend", url, "--token-file",
                               str(token_file)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env=dict(os.environ, ZIGZAG_VIZ_DEVICE="cpu"))
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if httpx.get(f"{url}/models", headers=AUTH, timeout=10).json()["models"][0]["jobs"] == 2:
            break
        time.sleep(0.2)
    else:
        client.kill()
        pytest.fail("the client's job never reached the server's queue")
    server.kill()
    out, err = client.communicate(timeout=60)
    assert client.returncode == 2 and out == ""
    assert len(err.strip().splitlines()) == 1, err
    assert err.startswith(f"zigzag-viz: error: the backend at {url} went away during job ")

    # the same server started again on the same address serves the same command
    port = int(url.rsplit(":", 1)[1])
    _, restarted = start_server("tiny", token_file, port)
    try:
        again = run_cli(*args, "--backend", url, "--token-file", str(token_file))
        assert again.returncode == 0 and again.stderr == "", again.stderr
        same_rows(json.loads(again.stdout), json.loads(out_local))
    finally:
        restarted.kill()
        restarted.communicate(timeout=20)


@pytest.mark.slow
def test_a_smollm2_comparison_on_the_server_equals_the_local_one(smollm2):
    application = create_app([smollm2], TOKEN)
    body = {**COMPARE, "model": "smollm2", "max_new_tokens": 12}
    try:
        with TestClient(application) as client:
            job = wait_for(client, submit(client, **body), timeout=300)
        assert job["status"] == "done" and PROMPT.answer in job["result"]["rows"][0]["text"]
        same_rows(job["result"]["rows"], local_rows(smollm2, body))
    finally:
        application.state.server.close()


def test_the_cli_on_a_backend_imports_neither_torch_nor_the_methods(tmp_path):
    prompt = tmp_path / "prompt.txt"
    prompt.write_text("What is the capital of France?")
    token = tmp_path / "token"
    token.write_text("t0ken\n")
    code = ("import sys; from zigzag_viz import cli; "
            f"status = cli.main(['compare', '--backend', 'http://127.0.0.1:{_free_port()}', '--token-file', {str(token)!r}, "
            f"'--prompt-file', {str(prompt)!r}, '--json']); "
            "print(status, 'torch' in sys.modules, 'zigzag_viz.methods' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.stdout.split() == ["2", "False", "False"], result.stderr
    assert "cannot be reached" in result.stderr
