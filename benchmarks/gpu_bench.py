"""Signal capture, decoding speed and memory at Llama-3.1-8B shapes on a GPU (random weights built from a config
in code: nothing is downloaded).

    .venv/bin/python benchmarks/gpu_bench.py                      # on a CUDA machine
    .venv/bin/python benchmarks/gpu_bench.py --shape tiny --tokens 64 128 --batch 1 2 --decode-steps 4 \\
        --max-analysis 512 --memory-bytes 2000000000 --out /tmp/gpu_cpu.json   # the same script, tiny, anywhere

One row per (tokens, batch, kept): `prefill_s` a plain prefill of the batch; `analysis_s` the same prefill with
every layer's signals captured (batch 1; `analysis_ratio` = analysis ÷ plain); `decode_ms` milliseconds per
decoded token (per step, for the whole batch) from the static cache of ragged layers, replayed as a CUDA graph on
a GPU, after keeping `kept` of each layer's tokens (key-norm selection, real eviction), `decode_ms_full` the same
at kept 1.0 and `decode_ratio` their ratio; `decode_ms_eager` the eager dynamic-cache decode at this kept;
`kv_bytes` what the cache holds after eviction; `peak_gpu_bytes` the most GPU memory allocated in the row.
Also: how many sequences of `--fit-tokens` fit in memory at full and at 20 % kept (device memory less the weights
and one prefill's workspace, over the measured bytes per sequence), and the longest prompt whose whole uncertainty
analysis runs (doubling from the smallest `--tokens` up to `--max-analysis`). Rows that run out of memory say so.
Writes benchmarks/results/gpu_<device>.json on a GPU; elsewhere only where `--out` says.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import re
import sys
import time
from pathlib import Path

import torch

from zigzag_viz.errors import OutOfMemoryError
from zigzag_viz.pipeline import runtime
from zigzag_viz.pipeline.models import default_device, wrap_model
from zigzag_viz.pipeline.static_cache import GraphedDecoder, to_static

RESULTS = Path(__file__).resolve().parent / "results"
SHAPES = {
    "llama8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                    num_key_value_heads=8, vocab_size=128256, rope_theta=500000.0, max_position_embeddings=131072),
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=256, rope_theta=10000.0, max_position_embeddings=8192),
}


def build(shape: str, device: torch.device):
    """A randomly initialised Llama of `shape`, bfloat16 on CUDA (float32 elsewhere), wrapped for the pipeline."""
    from transformers import LlamaConfig, LlamaForCausalLM

    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    config = LlamaConfig(**SHAPES[shape], tie_word_embeddings=False)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(previous)
    return wrap_model(f"llama-{shape}-random", model, None, device, use_chat_template=False)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def plain_prefill(loaded, ids: torch.Tensor) -> tuple[object, float]:
    """A fresh cache filled with `ids` (batch, n) without any capture, and the seconds it took."""
    cache = runtime.new_cache(loaded)
    kwargs = {runtime._cache_argument(loaded.model): cache, "use_cache": True, "logits_to_keep": 1}
    sync(loaded.device)
    started = time.perf_counter()
    with torch.inference_mode():
        loaded.model(input_ids=ids, **kwargs)
    sync(loaded.device)
    return cache, time.perf_counter() - started


def analysed_prefill_s(loaded, ids: torch.Tensor, window: int) -> float:
    """Seconds of a prefill of `ids` (1, n) that records every layer's signals and the layer × token map."""
    sync(loaded.device)
    started = time.perf_counter()
    pre = runtime.prefill(loaded, ids, window)
    pre.analysis.token_importance()
    sync(loaded.device)
    return time.perf_counter() - started


def keep_fraction(cache, fraction: float, window: int) -> None:
    """Keep `fraction` of every layer's tokens per sequence and KV head (largest key norms, the last `window`
    always), as new smaller tensors: the evicted ones are freed."""
    if fraction >= 1.0:
        return
    for entry in cache.layers:
        keys, values = entry.keys, entry.values
        n = keys.shape[-2]
        kept = min(max(int(round(fraction * n)), window), n)
        scores = keys.float().norm(dim=-1)
        scores[..., n - window:] = float("inf")
        index = scores.topk(kept, dim=-1).indices.sort(dim=-1).values[..., None]
        entry.keys = keys.gather(2, index.expand(-1, -1, -1, keys.shape[-1])).contiguous()
        entry.values = values.gather(2, index.expand(-1, -1, -1, values.shape[-1])).contiguous()
        del keys, values, scores, index


def decode_ms(loaded, cache, batch: int, start: int, steps: int, static: bool) -> float:
    """Milliseconds per step of `steps` greedy steps for `batch` sequences (two untimed warm-up steps first)."""
    warm = 2
    tokens = torch.zeros(batch, dtype=torch.long, device=loaded.device)
    graphed = None
    if static:
        to_static(cache, steps + warm + 1)
        if loaded.device.type == "cuda":
            graphed = GraphedDecoder(loaded.model, cache, runtime._cache_argument(loaded.model), loaded.device, batch)
    argument = runtime._cache_argument(loaded.model)

    def step(position: int) -> torch.Tensor:
        if graphed is not None:
            return graphed.step(tokens, position)
        positions = torch.full((batch, 1), position, dtype=torch.long, device=loaded.device)
        with torch.inference_mode():
            out = loaded.model(input_ids=tokens[:, None], **{argument: cache}, use_cache=True, position_ids=positions)
        return out.logits[:, -1]

    for index in range(warm):
        tokens = step(start + index).argmax(-1)
    sync(loaded.device)
    started = time.perf_counter()
    for index in range(warm, warm + steps):
        tokens = step(start + index).argmax(-1)
    sync(loaded.device)
    return 1000.0 * (time.perf_counter() - started) / steps


def free_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()


def write(out: Path, record: dict) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=2) + "\n")


def kv_bytes(cache) -> int:
    return sum(t.numel() * t.element_size() for entry in cache.layers for t in (entry.keys, entry.values))


def measure_row(loaded, n: int, batch: int, kept: float, args, generator) -> dict:
    """One (tokens, batch, kept) row; its decode from the static path and, for comparison, the eager one."""
    runtime.reset_peak_memory(loaded.device)
    ids = torch.randint(loaded.config.vocab_size, (batch, n), generator=generator).to(loaded.device)
    cache, prefill_s = plain_prefill(loaded, ids)
    keep_fraction(cache, kept, args.window)
    held = kv_bytes(cache)
    eager_cache = runtime.new_cache(loaded)
    for index, entry in enumerate(cache.layers):  # the eager decode reads the same kept tensors
        eager_cache.update(entry.keys, entry.values, index)
    eager_ms = decode_ms(loaded, eager_cache, batch, n, args.decode_steps, static=False)
    del eager_cache
    static_ms = decode_ms(loaded, cache, batch, n, args.decode_steps, static=True)
    del cache
    return {"tokens": n, "batch": batch, "kept": kept, "prefill_s": round(prefill_s, 4), "decode_ms": round(static_ms, 3),
            "decode_ms_eager": round(eager_ms, 3), "kv_bytes": held, "peak_gpu_bytes": runtime.peak_memory(loaded.device)}


def longest_analysis(loaded, start: int, limit: int, window: int, generator) -> dict:
    """The longest prompt (doubling from `start` up to `limit` tokens) whose whole analysis runs."""
    longest, failed_at, n = None, None, start
    while n <= limit:
        ids = torch.randint(loaded.config.vocab_size, (1, n), generator=generator).to(loaded.device)
        try:
            analysed_prefill_s(loaded, ids, window)
        except (OutOfMemoryError, torch.OutOfMemoryError):
            failed_at = n
            break
        finally:
            del ids
            free_memory(loaded.device)
        longest, n = n, n * 2
    return {"longest_tokens": longest, "first_out_of_memory_tokens": failed_at, "limit_tokens": limit}


def sequences_that_fit(loaded, rows: list[dict], tokens: int, memory_bytes: int | None) -> dict | None:
    """Sequences of `tokens` that fit beside the weights at full and at 20 % kept, from the measured bytes."""
    per_sequence = {}
    for kept in (1.0, 0.2):
        match = [r for r in rows if r["tokens"] == tokens and r["kept"] == kept and "kv_bytes" in r]
        if match:
            per_sequence[kept] = min(r["kv_bytes"] / r["batch"] for r in match)
    if memory_bytes is None or len(per_sequence) < 2:
        return None
    weights = sum(p.numel() * p.element_size() for p in loaded.model.parameters())
    workspace = max((r["peak_gpu_bytes"] or 0) - weights - r["kv_bytes"] for r in rows
                    if r["tokens"] == tokens and r["batch"] == 1 and "kv_bytes" in r)
    free = memory_bytes - weights - max(workspace, 0)
    full, kept = (math.floor(free / per_sequence[k]) for k in (1.0, 0.2))
    return {"tokens": tokens, "memory_bytes": memory_bytes, "weights_bytes": weights, "workspace_bytes": max(workspace, 0),
            "sequences_full": full, "sequences_kept_0.2": kept, "ratio": round(kept / max(full, 1), 2)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=tuple(SHAPES), default="llama8b")
    parser.add_argument("--tokens", type=int, nargs="+", default=[8192, 32768, 65536])
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--kept", type=float, nargs="+", default=[1.0, 0.2])
    parser.add_argument("--decode-steps", type=int, default=32)
    parser.add_argument("--window", type=int, default=32)
    parser.add_argument("--fit-tokens", type=int, default=32768)
    parser.add_argument("--max-analysis", type=int, default=131072)
    parser.add_argument("--memory-bytes", type=int, default=None, help="device memory to plan with (default: the GPU's)")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)

    device = default_device()
    if device.type != "cuda" and args.out is None:
        print("no GPU here: give --out to write the CPU figures somewhere (results/ holds GPU figures only)")
        return 2
    generator = torch.Generator().manual_seed(0)
    loaded = build(args.shape, device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    out = args.out or RESULTS / f"gpu_{re.sub(r'[^a-z0-9]+', '-', name.lower()).strip('-')}.json"
    memory = args.memory_bytes or (torch.cuda.get_device_properties(device).total_memory if device.type == "cuda" else None)
    plain_prefill(loaded, torch.zeros((1, 16), dtype=torch.long, device=device))  # first-call set-up, untimed
    rows = []
    for n in args.tokens:
        analysis_s = plain_1 = None
        for batch in args.batch:
            for kept in sorted(args.kept, reverse=True):
                try:
                    row = measure_row(loaded, n, batch, kept, args, generator)
                    if batch == 1 and kept == max(args.kept):
                        ids = torch.randint(loaded.config.vocab_size, (1, n), generator=generator).to(device)
                        plain_1 = row["prefill_s"]
                        analysis_s = analysed_prefill_s(loaded, ids, args.window)
                except (OutOfMemoryError, torch.OutOfMemoryError):
                    row = {"tokens": n, "batch": batch, "kept": kept, "error": "out of memory"}
                    free_memory(device)
                if batch == 1 and analysis_s is not None:
                    row.update(analysis_s=round(analysis_s, 4), analysis_ratio=round(analysis_s / plain_1, 4))
                rows.append(row)
                print(json.dumps(row), flush=True)
                write(out, {"rows": rows, "complete": False})  # a later failure keeps what was measured
    for row in rows:
        full = [r for r in rows if (r["tokens"], r["batch"], r["kept"]) == (row["tokens"], row["batch"], 1.0) and "decode_ms" in r]
        if full and "decode_ms" in row:
            row.update(decode_ms_full=full[0]["decode_ms"], decode_ratio=round(row["decode_ms"] / full[0]["decode_ms"], 4))
    record = {
        "benchmark": "signal capture, decode speed and memory at the given shapes (random weights)",
        "shape": args.shape, "config": SHAPES[args.shape], "device": str(device), "device_name": name,
        "dtype": str(loaded.dtype).removeprefix("torch."), "decode_path": "static ragged cache, CUDA graph" if device.type == "cuda" else "static ragged cache, eager",
        "decode_steps": args.decode_steps, "window": args.window, "rows": rows,
        "fit": sequences_that_fit(loaded, rows, args.fit_tokens, memory),
        "analysis": longest_analysis(loaded, min(args.tokens), args.max_analysis, args.window, generator),
        "torch": torch.__version__, "python": platform.python_version(), "date": time.strftime("%Y-%m-%d"),
    }
    write(out, record)
    for row in rows:
        if "decode_ratio" in row:
            print(f"{row['tokens']:>6} tokens × {row['batch']}  kept {row['kept']:.1f}: decode {row['decode_ms']:.2f} ms/step "
                  f"(eager {row['decode_ms_eager']:.2f}), ratio to full {row['decode_ratio']:.3f}"
                  + (f", analysis ÷ prefill {row['analysis_ratio']:.3f}" if "analysis_ratio" in row else ""))
    print(f"fit: {record['fit']}")
    print(f"analysis: {record['analysis']}")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
