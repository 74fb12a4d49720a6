"""Compare page: what its caches save, measured with Streamlit's AppTest in one process.

Runs the page on the bundled pass-key prompt with full KV and four methods, then, in this order and on the
same server caches: the same Run again (everything cached), a new kept fraction (the prefill and full-KV
answer cached, the methods rerun), and one more method (only that method runs). Prints each as a ratio to
the first, cold run and writes benchmarks/results/compare_cache_<model>.json.

    .venv/bin/python benchmarks/compare_cache.py --model smollm2
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PAGE = ROOT / "pages" / "1_Compare.py"
RESULTS = ROOT / "benchmarks" / "results"
METHODS = ["full", "zigzag", "pyramid", "uniform", "adakv"]

for name, value in (("TRANSFORMERS_VERBOSITY", "error"), ("HF_HUB_OFFLINE", "1"), ("TQDM_DISABLE", "1")):
    os.environ.setdefault(name, value)


def _run(at) -> float:
    started = time.perf_counter()
    next(b for b in at.button if b.label == "Run").click().run()
    seconds = time.perf_counter() - started
    if at.exception or at.error:
        raise SystemExit(f"the page failed: {[e.value for e in list(at.exception) + list(at.error)]}")
    return seconds


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--mode", choices=("aware", "context"), default="aware")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)

    import streamlit
    import torch
    from streamlit.testing.v1 import AppTest

    from zigzag_viz.presentation import ui

    logging.getLogger("streamlit").setLevel(logging.ERROR)  # loading the model outside a page run is intended
    at = AppTest.from_file(str(PAGE), default_timeout=900)
    at.run()
    at.selectbox(key="model").set_value(args.model).run()
    started = time.perf_counter()
    ui.cached_model(args.model)  # the model load is not what the caches below are about
    load_s = time.perf_counter() - started
    at.radio(key="mode").set_value(args.mode).run()
    at.multiselect(key="methods").set_value(METHODS).run()
    timings = {"cold": _run(at), "same_run": _run(at)}
    next(s for s in at.slider if s.label == "Kept fraction of the prompt").set_value(0.5).run()
    timings["new_budget"] = _run(at)
    at.multiselect(key="methods").set_value(METHODS + ["streaming"]).run()
    timings["one_more_method"] = _run(at)
    comparison = at.session_state["comparison"].comparison
    record = {
        "benchmark": "compare page: Run with cold and warm caches (AppTest, server time, whole script)",
        "model": args.model, "mode": args.mode, "device": str(ui.cached_model(args.model).device),
        "n_tokens": comparison.n_tokens, "methods": METHODS, "model_load_s": round(load_s, 2),
        "seconds": {k: round(v, 3) for k, v in timings.items()},
        "ratio_to_cold": {k: round(v / timings["cold"], 4) for k, v in timings.items()},
        "streamlit": streamlit.__version__, "torch_threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
        "python": platform.python_version(), "date": time.strftime("%Y-%m-%d"),
        "machine": f"{platform.machine()}, {os.cpu_count()} cpus",
    }
    out = args.out or RESULTS / f"compare_cache_{args.model}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=2) + "\n")
    for name, seconds in timings.items():
        print(f"{name:<16} {seconds:7.3f} s   ratio to cold {seconds / timings['cold']:.3f}")
    return record


if __name__ == "__main__":
    main(sys.argv[1:])
