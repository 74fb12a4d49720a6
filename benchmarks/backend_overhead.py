"""Cost of running a comparison on a model server instead of in-process: the same comparison both ways.

    .venv/bin/python benchmarks/backend_overhead.py --model smollm2 --repeats 5

Starts `zigzag-viz serve --model M` on a free loopback port, loads M here too, and runs full, zigzag and
uniform on a generated pass-key prompt (about 1K tokens) in-process (what `compare --json` does locally:
request, comparison, rows) and through the server (what `compare --backend --json` does: POST /compare,
the job's events, the result), interleaved, alternating which goes first, on a new prompt each repeat so no
cache serves either. Prints the medians (seconds) and the ratio server ÷ in-process, checks that both gave
the same texts and token ids, and writes benchmarks/results/backend_overhead.json. `server_job_s` is the time
the job ran on the server and `transport_and_queue_s` the rest of the server's wall time (HTTP, queue, events,
JSON), which the machine's load does not blur as much as it blurs the two wall times.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import secrets
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

os.environ.setdefault("TQDM_DISABLE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import httpx
import torch

from zigzag_viz.evaluation.prompts import passkey_prompt
from zigzag_viz.evaluation.runner import Runner
from zigzag_viz.pipeline.models import load_model
from zigzag_viz.serving.api import CompareOptions, comparison_rows
from zigzag_viz.serving.client import Backend

RESULTS = Path(__file__).resolve().parent / "results"
METHODS = "full,zigzag,uniform"
N_SENTENCES = 55  # about 1K SmolLM2 tokens with the chat template


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_server(model: str, token_file: Path, port: int, log: Path) -> subprocess.Popen:
    """`zigzag-viz serve` on 127.0.0.1:`port`, returned once GET /health answers (at most 10 minutes)."""
    with log.open("w") as output:
        server = subprocess.Popen(
            [sys.executable, "-m", "zigzag_viz.cli", "serve", "--model", model, "--port", str(port),
             "--token-file", str(token_file)], stdout=output, stderr=subprocess.STDOUT,
        )
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline and server.poll() is None:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                return server
        except httpx.HTTPError:
            time.sleep(0.5)
    server.kill()
    raise SystemExit("the server did not start:\n" + log.read_text())


@contextmanager
def serving(model: str):
    """`zigzag-viz serve --model M` on a free loopback port with a fresh token in a file of mode 0600: yields
    (url, token); the server is stopped on leaving."""
    token = secrets.token_urlsafe(32)
    with tempfile.TemporaryDirectory() as folder:
        token_file = Path(folder) / "token"
        token_file.write_text(token)
        token_file.chmod(0o600)
        port = free_port()
        server = start_server(model, token_file, port, Path(folder) / "server.log")
        try:
            yield f"http://127.0.0.1:{port}", token
        finally:
            server.terminate()
            server.wait(timeout=60)


def in_process(loaded, options: CompareOptions) -> tuple[float, list[dict]]:
    started = time.perf_counter()
    runner = Runner(loaded)
    rows = comparison_rows(runner.compare(options.request(runner)))
    return time.perf_counter() - started, rows


def on_server(backend: Backend, options: CompareOptions) -> tuple[float, list[dict], float]:
    """(wall seconds, rows, seconds the job ran on the server) of one comparison through the server."""
    heard = []
    started = time.perf_counter()
    rows = backend.compare(options, heard.append)["rows"]
    seconds = time.perf_counter() - started
    return seconds, rows, heard[-1]["finished"] - heard[-1]["started"]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--out", type=Path, default=RESULTS / "backend_overhead.json")
    args = parser.parse_args(argv)

    loaded = load_model(args.model)
    with serving(args.model) as (url, token):
        with Backend(url, token) as backend:
            samples = {"in_process": [], "server": [], "server_job": []}
            tokens, same = [], True
            for repeat in range(-1, args.repeats):  # repeat -1 warms both up and is not counted
                prompt = passkey_prompt(n_sentences=N_SENTENCES, depth=0.5, seed=100 + repeat)
                options = CompareOptions(args.model, prompt.text, METHODS, 0.2, args.max_new_tokens,
                                         answer=prompt.answer).check()
                runs = [("in_process", lambda: in_process(loaded, options)),
                        ("server", lambda: on_server(backend, options))]
                results = {name: run() for name, run in (runs if repeat % 2 else runs[::-1])}
                same &= all((a["text"], a["token_ids"]) == (b["text"], b["token_ids"])
                            for a, b in zip(results["in_process"][1], results["server"][1]))
                if repeat >= 0:
                    tokens.append(int(loaded.encode(prompt.text).shape[1]))
                    samples["in_process"].append(results["in_process"][0])
                    samples["server"].append(results["server"][0])
                    samples["server_job"].append(results["server"][2])
                    print(f"repeat {repeat + 1}: in-process {results['in_process'][0]:.3f} s, server "
                          f"{results['server'][0]:.3f} s (job {results['server'][2]:.3f} s)", file=sys.stderr)

    medians = {name: statistics.median(values) for name, values in samples.items()}
    record = {
        "benchmark": "backend_overhead",
        "model": loaded.name,
        "device": str(loaded.device) if loaded.device.type != "cuda" else torch.cuda.get_device_name(),
        "dtype": str(loaded.dtype),
        "methods": METHODS,
        "budget": 0.2,
        "max_new_tokens": args.max_new_tokens,
        "prompt_tokens": tokens,
        "repeats": args.repeats,
        "in_process_s": round(medians["in_process"], 4),
        "server_s": round(medians["server"], 4),
        "ratio": round(medians["server"] / medians["in_process"], 4),
        "server_job_s": round(medians["server_job"], 4),
        "transport_and_queue_s": round(statistics.median(
            wall - job for wall, job in zip(samples["server"], samples["server_job"])), 4),
        "samples_s": {name: [round(v, 4) for v in values] for name, values in samples.items()},
        "same_texts_and_tokens": same,
        "torch": torch.__version__,
        "machine": f"{platform.machine()}, {os.cpu_count()} cpus, load average {os.getloadavg()[0]:.1f}",
        "date": time.strftime("%Y-%m-%d"),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=2) + "\n")
    print(json.dumps(record, indent=2))
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
