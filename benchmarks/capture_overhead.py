"""Cost of capturing layer signals: plain SDPA prefill vs the analysis prefill, side by side on one prompt.

    .venv/bin/python benchmarks/capture_overhead.py --model smollm2 --tokens 1024 2048 4096 8192 --json

Prints one row per length {"tokens", "prefill_s", "analysis_s", "ratio", "peak_extra_mb"} (medians over
--repeats interleaved runs) and writes them to benchmarks/results/capture_overhead.json.
peak_extra_mb is the analysis run's peak memory minus the plain run's (CUDA allocator peak on a GPU;
peak resident set size, reset between runs through /proc/self/clear_refs, on the CPU).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

if "MALLOC_MMAP_THRESHOLD_" not in os.environ:
    # A fixed mmap threshold makes glibc hand large freed buffers back at once, so peak RSS measures them.
    os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"})
os.environ.setdefault("TQDM_DISABLE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import torch

from zigzag_viz.pipeline import attention, runtime
from zigzag_viz.evaluation.runner import Runner
from zigzag_viz.pipeline.models import load_model
from zigzag_viz.evaluation.prompts import passkey_prompt

RESULTS = Path(__file__).resolve().parent / "results"


def prompt_ids(loaded, tokens: int) -> torch.Tensor:
    """Exactly `tokens` ids of varied passkey prose (ends with the question when long enough)."""
    text = passkey_prompt(n_sentences=tokens // 12 + 10, depth=0.5, seed=tokens).text
    ids = loaded.tokenizer(text)["input_ids"]
    if len(ids) < tokens:
        raise SystemExit(f"prompt too short: {len(ids)} < {tokens}")
    return torch.tensor([ids[-tokens:]], device=loaded.device)


def _peak_reset(device: torch.device) -> float:
    """Reset the peak counter; returns the current usage in MB."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        return torch.cuda.memory_allocated() / 2**20
    Path("/proc/self/clear_refs").write_text("5")
    return _status_mb("VmRSS")


def _peak_mb(device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() / 2**20
    return _status_mb("VmHWM")


def _status_mb(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"{field} missing from /proc/self/status")


def plain_prefill(loaded, ids) -> None:
    """Plain transformers SDPA prefill into a fresh cache (the model is switched to "sdpa" by the caller)."""
    runtime.forward_tokens(loaded, runtime.new_cache(loaded), ids, 0, last_only=True)


def analysis_prefill(loaded, ids, window) -> None:
    Runner(loaded).analyze(ids, window)


def _timed(loaded, run, implementation: str) -> tuple[float, float]:
    """(seconds, peak extra MB) of one run under an attention implementation; the switch is not timed."""
    with attention.implementation(loaded.model, implementation):
        base = _peak_reset(loaded.device)
        started = time.perf_counter()
        run()
        if loaded.device.type == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - started
        return seconds, _peak_mb(loaded.device) - base


def measure(loaded, ids, window: int, repeats: int) -> dict:
    runs = {
        "plain": (lambda: plain_prefill(loaded, ids), "sdpa"),
        "analysis": (lambda: analysis_prefill(loaded, ids, window), attention.IMPLEMENTATION),
    }
    for run, implementation in runs.values():  # warm-up
        _timed(loaded, run, implementation)
    samples = {name: [] for name in runs}
    for _ in range(repeats):
        for name, (run, implementation) in runs.items():
            samples[name].append(_timed(loaded, run, implementation))
    seconds = {name: statistics.median(s for s, _ in values) for name, values in samples.items()}
    peaks = {name: statistics.median(p for _, p in values) for name, values in samples.items()}
    return {
        "tokens": int(ids.shape[1]),
        "prefill_s": round(seconds["plain"], 4),
        "analysis_s": round(seconds["analysis"], 4),
        "ratio": round(seconds["analysis"] / seconds["plain"], 4),
        "peak_extra_mb": round(peaks["analysis"] - peaks["plain"], 2),
        "peak_plain_mb": round(peaks["plain"], 2),
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--tokens", type=int, nargs="+", default=[1024, 2048, 4096, 8192])
    parser.add_argument("--window", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", action="store_true", help="print the rows as JSON")
    parser.add_argument("--out", type=Path, default=RESULTS / "capture_overhead.json")
    args = parser.parse_args(argv)

    loaded = load_model(args.model)
    rows = []
    for tokens in args.tokens:
        row = measure(loaded, prompt_ids(loaded, tokens), args.window, args.repeats)
        rows.append(row)
        print(f"{tokens:>6} tokens: prefill {row['prefill_s']:.3f} s, analysis {row['analysis_s']:.3f} s, "
              f"ratio {row['ratio']:.3f}, extra peak {row['peak_extra_mb']:.1f} MB", file=sys.stderr)
    record = {
        "benchmark": "capture_overhead",
        "model": loaded.name,
        "device": str(loaded.device) if loaded.device.type != "cuda" else torch.cuda.get_device_name(),
        "dtype": str(loaded.dtype),
        "window": args.window,
        "repeats": args.repeats,
        "torch": torch.__version__,
        "machine": f"{platform.machine()}, {os.cpu_count()} cpus",
        "date": time.strftime("%Y-%m-%d"),
        "rows": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=2) + "\n")
    print(json.dumps(rows if args.json else record, indent=None if args.json else 2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
