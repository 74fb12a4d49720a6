"""Slider → redraw server time on the Budgets page, measured with Streamlit's AppTest.

Analyses the bundled prompt once (the model runs once), then times N moves of the "Kept fraction" slider
(`at.slider(key=...).set_value(v).run()`) and N reruns with no widget change, on the same AppTest in the
same process. AppTest always re-runs the whole page script (it does not isolate `st.fragment` reruns as a
browser session does), so both numbers include the page around the fragment: an upper bound on what a
slider costs the server. Neither touches the model: the analysis comes from session_state.

    .venv/bin/python benchmarks/app_latency.py --model smollm2 --samples 20
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PAGE = ROOT / "pages" / "3_Budgets.py"
RESULT = ROOT / "benchmarks" / "results" / "app_latency.json"
TARGET_MS = 200.0

for name, value in (("TRANSFORMERS_VERBOSITY", "error"), ("HF_HUB_OFFLINE", "1"), ("TQDM_DISABLE", "1")):
    os.environ.setdefault(name, value)


def percentile(values: list[float], q: float) -> float:
    """Linear-interpolated percentile, q in [0, 100]."""
    ordered = sorted(values)
    position = (len(ordered) - 1) * q / 100
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def _check(at, what: str) -> None:
    if at.exception:
        raise SystemExit(f"{what}: the page raised {at.exception[0].value}")
    if at.error:
        raise SystemExit(f"{what}: the page showed an error: {at.error[0].value}")


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny", help="tiny (default, fast) or smollm2")
    parser.add_argument("--samples", type=int, default=20, help="slider moves to time (at least 10)")
    parser.add_argument("--out", type=Path, default=RESULT)
    args = parser.parse_args(argv)
    if args.samples < 10:
        parser.error("--samples must be at least 10")

    import streamlit
    import torch
    from streamlit.testing.v1 import AppTest

    at = AppTest.from_file(str(PAGE), default_timeout=900)
    at.run()
    at.selectbox(key="model").set_value(args.model).run()
    started = time.perf_counter()
    next(b for b in at.button if b.label == "Analyze").click().run()
    analysis_s = time.perf_counter() - started
    _check(at, "analysis")
    result = at.session_state["budgets_analysis"]

    slider = lambda: at.slider(key="budget_fraction")  # noqa: E731
    values = [round(0.10 + 0.05 * (i % 16), 2) for i in range(args.samples + 1)]  # 0.10 … 0.85, never repeating in a row
    slider().set_value(values[-1]).run()  # warm-up: first figure build, imports
    _check(at, "warm-up")

    slider_ms = []
    for value in values[: args.samples]:
        before = at.session_state["budgets_curves"]
        started = time.perf_counter()
        slider().set_value(value).run()
        slider_ms.append((time.perf_counter() - started) * 1000)
        _check(at, f"slider at {value}")
        if at.session_state["budgets_curves"] == before:
            raise SystemExit(f"moving the slider to {value} did not change the budgets")

    noop_ms = []
    for _ in range(args.samples):
        started = time.perf_counter()
        at.run()
        noop_ms.append((time.perf_counter() - started) * 1000)
        _check(at, "no-op rerun")

    median_ms = statistics.median(slider_ms)
    noop_median = statistics.median(noop_ms)
    report = {
        "benchmark": "budgets page: slider → redraw, server time (AppTest, whole script per rerun)",
        "model": args.model,
        "device": result.device,
        "n_tokens": result.n_tokens,
        "num_layers": result.analysis.num_layers,
        "window": result.analysis.window,
        "samples": args.samples,
        "median_ms": round(median_ms, 2),
        "p90_ms": round(percentile(slider_ms, 90), 2),
        "min_ms": round(min(slider_ms), 2),
        "max_ms": round(max(slider_ms), 2),
        "target_ms": TARGET_MS,
        "meets_target": percentile(slider_ms, 90) <= TARGET_MS,
        "noop_median_ms": round(noop_median, 2),
        "noop_p90_ms": round(percentile(noop_ms, 90), 2),
        "ratio_slider_to_noop": round(median_ms / noop_median, 3),
        "first_analysis_s": round(analysis_s, 2),
        "prefill_s": round(result.prefill_s, 3),
        "slider_ms_all": [round(v, 2) for v in slider_ms],
        "streamlit": streamlit.__version__,
        "torch_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "machine": f"{platform.machine()}, {os.cpu_count()} cpus",
        "date": time.strftime("%Y-%m-%d"),
    }
    print(json.dumps(report, indent=2))
    print(f"slider median {median_ms:.1f} ms vs no-op rerun median {noop_median:.1f} ms: "
          f"ratio {median_ms / noop_median:.2f}", file=sys.stderr)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    return report


if __name__ == "__main__":
    main()
