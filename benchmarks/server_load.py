"""A bounded load test of the model server: many clients at once on one model, mixed analyses and comparisons.

    .venv/bin/python benchmarks/server_load.py --model tiny --requests 200 --clients 5

Starts `zigzag-viz serve --model M` on a free loopback port, then
1. runs `--baseline` requests one at a time (half analyses, half comparisons) for the single-request time;
2. runs `--requests` requests from `--clients` concurrent asyncio clients (the same mix, a new prompt each, so the
   server's row cache serves none): POST /analyze answers at once; POST /compare is a job followed through its
   server-sent events to its end.
Stops by itself. Prints latency p50/p95/p99 (seconds, submit to result) overall and per kind, throughput
(requests/s), errors (any non-2xx answer, failed job or transport error), and the bound the queue implies: with
`--clients` requests in flight a request waits for at most the others, so p99 ≤ clients × the single-request
p99. Writes benchmarks/results/server_load.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import sys
import time
from pathlib import Path

os.environ.setdefault("TQDM_DISABLE", "1")

import httpx
import numpy as np

from backend_overhead import serving
from zigzag_viz.evaluation.prompts import passkey_prompt

RESULTS = Path(__file__).resolve().parent / "results"
METHODS = "full,zigzag,uniform"


def request_body(kind: str, index: int, model: str, max_new_tokens: int) -> dict:
    """The body of request `index`: a pass-key prompt of its own (10–20 sentences, seeded by `index`)."""
    prompt = passkey_prompt(n_sentences=10 + index % 11, depth=(index % 9) / 8, seed=10_000 + index)
    if kind == "analyze":
        return {"model": model, "prompt": prompt.text, "window": 8}
    return {"model": model, "prompt": prompt.text, "methods": METHODS, "budget": 0.5, "window": 8,
            "max_new_tokens": max_new_tokens, "answer": prompt.answer}


async def follow(client: httpx.AsyncClient, job_id: str) -> str:
    """The final status of a job, read from its event stream."""
    async with client.stream("GET", f"/jobs/{job_id}/events", timeout=600) as response:
        response.raise_for_status()
        event = None
        async for line in response.aiter_lines():
            if line.startswith("event: "):
                event = line[7:]
            elif line.startswith("data: ") and event == "end":
                return json.loads(line[6:])["status"]
    return "stream ended without its end event"


async def one_request(client: httpx.AsyncClient, kind: str, body: dict) -> tuple[float, str | None]:
    """(seconds from submit to result, the error or None)."""
    started = time.perf_counter()
    try:
        if kind == "analyze":
            response = await client.post("/analyze", json=body, timeout=600)
            error = None if response.status_code == 200 else f"{response.status_code} {response.text[:120]}"
        else:
            response = await client.post("/compare", json=body, timeout=600)
            if response.status_code != 202:
                error = f"{response.status_code} {response.text[:120]}"
            else:
                status = await follow(client, response.json()["id"])
                error = None if status == "done" else f"job {status}"
    except httpx.HTTPError as exc:
        error = f"{type(exc).__name__}: {exc}"
    return time.perf_counter() - started, error


async def run_load(url: str, token: str, work: list[tuple[str, dict]], clients: int) -> tuple[list[dict], float]:
    """Run `work` from `clients` concurrent clients, each taking the next request when its last one ends;
    returns one record per request (kind, seconds, error) and the wall time (seconds)."""
    pending = list(enumerate(work))
    records: list[dict] = []

    async def client_loop() -> None:
        async with httpx.AsyncClient(base_url=url, headers={"Authorization": f"Bearer {token}"}) as client:
            while pending:
                index, (kind, body) = pending.pop(0)
                seconds, error = await one_request(client, kind, body)
                records.append({"index": index, "kind": kind, "seconds": seconds, "error": error})

    started = time.perf_counter()
    await asyncio.gather(*(client_loop() for _ in range(clients)))
    return sorted(records, key=lambda record: record["index"]), time.perf_counter() - started


def percentiles(seconds: list[float]) -> dict:
    values = np.asarray(seconds, dtype=float)
    return {f"p{q}_s": round(float(np.percentile(values, q)), 4) for q in (50, 95, 99)} if len(values) else {}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--clients", type=int, default=5)
    parser.add_argument("--baseline", type=int, default=20, help="requests run one at a time first")
    parser.add_argument("--max-new-tokens", type=int, default=8)
    parser.add_argument("--out", type=Path, default=RESULTS / "server_load.json")
    args = parser.parse_args(argv)

    kinds = ("analyze", "compare")
    baseline = [(kinds[i % 2], request_body(kinds[i % 2], i, args.model, args.max_new_tokens))
                for i in range(args.baseline)]
    work = [(kinds[i % 2], request_body(kinds[i % 2], args.baseline + i, args.model, args.max_new_tokens))
            for i in range(args.requests)]
    with serving(args.model) as (url, token):
        asyncio.run(run_load(url, token, baseline[:2], 1))  # warm-up, not counted
        single, single_wall = asyncio.run(run_load(url, token, baseline, 1))
        loaded, wall = asyncio.run(run_load(url, token, work, args.clients))

    errors = [record for record in single + loaded if record["error"]]
    single_p99 = percentiles([r["seconds"] for r in single])["p99_s"]
    load_stats = percentiles([r["seconds"] for r in loaded])
    bound = args.clients * single_p99
    record = {
        "benchmark": "server_load",
        "model": args.model,
        "methods": METHODS,
        "max_new_tokens": args.max_new_tokens,
        "clients": args.clients,
        "requests": args.requests,
        "single_request": {**percentiles([r["seconds"] for r in single]),
                           **{kind: percentiles([r["seconds"] for r in single if r["kind"] == kind]) for kind in kinds},
                           "throughput_per_s": round(len(single) / single_wall, 3)},
        "under_load": {**load_stats,
                       **{kind: percentiles([r["seconds"] for r in loaded if r["kind"] == kind]) for kind in kinds},
                       "throughput_per_s": round(len(loaded) / wall, 3), "wall_s": round(wall, 2)},
        "throughput_ratio": round((len(loaded) / wall) / (len(single) / single_wall), 3),
        "p99_bound_s": round(bound, 4),
        "p99_within_bound": bool(load_stats["p99_s"] <= bound),
        "errors": len(errors),
        "first_errors": [f"{e['kind']}: {e['error']}" for e in errors[:5]],
        "machine": f"{platform.machine()}, {os.cpu_count()} cpus, load average {os.getloadavg()[0]:.1f}",
        "date": time.strftime("%Y-%m-%d"),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=2) + "\n")
    print(json.dumps(record, indent=2))
    print(f"{args.requests} requests from {args.clients} clients: p50 {load_stats['p50_s']:.3f} s, p99 "
          f"{load_stats['p99_s']:.3f} s (bound {bound:.3f} s), throughput × {record['throughput_ratio']:.2f} of one "
          f"client, {len(errors)} errors", file=sys.stderr)
    return 0 if not errors else 1


if __name__ == "__main__":
    sys.exit(main())
