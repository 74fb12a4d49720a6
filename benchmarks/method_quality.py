"""Answer quality of every method at several kept fractions, on generated passkey prompts.

    .venv/bin/python benchmarks/method_quality.py --model smollm2

≥ 12 prompts of 1–1.5K tokens (fixed seed, needle depths 0.1–0.9, varied prose). `--mode aware` (default)
compresses with the question inside the context; `--mode context` compresses the context alone and feeds the
question through the compressed cache. Writes benchmarks/results/method_quality_<model>[_context].json and a
Markdown table beside it:
accuracy per method × fraction, the held KV fraction, and the smallest fraction at which each method
matches full KV. Prints each method's accuracy relative to full KV, measured in the same run. Methods whose work does not depend
on the kept fraction (layers, channels, bits) run once per prompt and count for every fraction.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

os.environ.setdefault("TQDM_DISABLE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import numpy as np

from zigzag_viz.errors import UserError
from zigzag_viz.evaluation.prompts import passkey_prompt
from zigzag_viz.evaluation.runner import Runner
from zigzag_viz.methods import METHODS, parse_spec
from zigzag_viz.pipeline.models import load_model

RESULTS = Path(__file__).resolve().parent / "results"
FRACTIONS = (0.1, 0.2, 0.35, 0.5, 0.7)
DEFAULT_SPECS = (
    "uniform", "uniform[select=knorm]", "uniform[select=hybrid]", "pyramid", "zigzag", "zigzag[select=knorm]",
    "zigzag[select=hybrid]", "streaming", "adakv", "baklava", "kvsharer", "minicache", "think", "kivi",
    "zigzag+kivi", "zigzag+think",
)


SETTINGS = {
    "aware": "question inside the compressed context",
    "context": "context compressed alone, question fed through the compressed cache",
}


def prompts(count: int, seed: int):
    """Passkey prompts of 1–1.5K tokens (55–80 filler sentences), needle depths spread over 0.1–0.9."""
    rng = np.random.default_rng(seed)
    depths = np.linspace(0.1, 0.9, count)
    return [passkey_prompt(n_sentences=int(rng.integers(55, 80)), depth=float(d), seed=seed * 1000 + i)
            for i, d in enumerate(depths)]


def available(specs):
    names = {part.split("[")[0] for spec in specs for part in spec.split("+")}
    missing = sorted(names - set(METHODS))
    return [s for s in specs if not ({p.split("[")[0] for p in s.split("+")} & set(missing))], missing


def markdown(record) -> str:
    fractions = record["fractions"]
    lines = [
        f"# Method quality on {record['model']}: passkey accuracy ({record['prompts']} prompts, "
        f"{record['min_tokens']}–{record['max_tokens']} tokens, " + SETTINGS[record["mode"]] + ")",
        "",
        f"Full KV: {record['full_accuracy']:.2f}. Cells: accuracy (held KV fraction).",
        "",
        "| method | " + " | ".join(f"{f:g}" for f in fractions) + " | smallest fraction matching full |",
        "|---|" + "---|" * (len(fractions) + 1),
    ]
    for row in record["methods"]:
        cells = [f"{a:.2f} ({k:.2f})" for a, k in zip(row["accuracy"], row["kv_fraction"])]
        smallest = row["smallest_matching_fraction"]
        lines.append(f"| `{row['method']}` | " + " | ".join(cells) + f" | {smallest if smallest is not None else '—'} |")
    if record["skipped"]:
        lines += ["", "Not run: " + "; ".join(record["skipped"])]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--prompts", type=int, default=12)
    parser.add_argument("--seed", type=int, default=2024)
    parser.add_argument("--fractions", type=float, nargs="+", default=list(FRACTIONS))
    parser.add_argument("--methods", default=",".join(DEFAULT_SPECS), help="';'-separated specs, or ',' when unambiguous")
    parser.add_argument("--max-new-tokens", type=int, default=12)
    parser.add_argument("--window", type=int, default=32)
    parser.add_argument("--mode", choices=tuple(SETTINGS), default="aware")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)

    from zigzag_viz.methods.base import _split_outside_brackets

    specs, missing = available(_split_outside_brackets(args.methods.replace(";", ","), ","))
    loaded = load_model(args.model)
    items = prompts(args.prompts, args.seed)
    correct = {(s, f): 0 for s in specs for f in args.fractions}
    fraction_held = {(s, f): [] for s in specs for f in args.fractions}
    skipped = {f"{name}: not registered" for name in missing}
    full_correct, lengths = 0, []
    started = time.perf_counter()
    runner = Runner(loaded)
    for index, item in enumerate(items):
        request = runner.request(item.text, [parse_spec(spec) for spec in specs], list(args.fractions), args.mode,
                                 window=args.window, max_new_tokens=args.max_new_tokens, answer=item.answer)
        reference = runner.reference(request)
        lengths.append(reference.n_tokens)
        full_ok = item.answer in reference.text
        full_correct += full_ok
        for spec, method in zip(specs, request.methods):
            once = None  # the row of a method without per-layer budgets serves every fraction
            for fraction in args.fractions:
                if once is None:
                    try:
                        prepared = runner.prepare_row(request, reference, method, fraction)
                        row = runner.row(request, reference, method, fraction, prepared)
                    except UserError as exc:
                        skipped.add(f"{spec} at {fraction:g}: {exc}")
                        continue
                    if method.budgets(prepared[0]) is None:
                        once = row
                else:
                    row = once
                correct[spec, fraction] += bool(row.task_score)
                fraction_held[spec, fraction].append(row.kv_fraction)
        print(f"prompt {index + 1}/{len(items)}: {reference.n_tokens} tokens, full KV {'right' if full_ok else 'wrong'}, "
              f"{time.perf_counter() - started:.0f} s", file=sys.stderr)

    full_accuracy = full_correct / len(items)
    rows = [{"method": "full", "accuracy": [full_accuracy] * len(args.fractions), "kv_fraction": [1.0] * len(args.fractions),
             "relative_to_full": [1.0] * len(args.fractions), "smallest_matching_fraction": None}]
    for spec in specs:
        accuracy = [correct[spec, f] / len(items) for f in args.fractions]
        held = [float(np.mean(fraction_held[spec, f])) if fraction_held[spec, f] else float("nan") for f in args.fractions]
        matching = [f for f, a in zip(args.fractions, accuracy) if a >= full_accuracy]
        rows.append({"method": spec, "accuracy": accuracy, "kv_fraction": [round(h, 4) for h in held],
                     "relative_to_full": [round(a / full_accuracy, 3) if full_accuracy else None for a in accuracy],
                     "smallest_matching_fraction": min(matching) if matching else None})
    record = {
        "benchmark": "method_quality", "model": loaded.name, "prompts": len(items), "seed": args.seed,
        "min_tokens": min(lengths), "max_tokens": max(lengths), "fractions": args.fractions,
        "max_new_tokens": args.max_new_tokens, "window": args.window, "mode": args.mode,
        "full_accuracy": full_accuracy, "methods": rows, "skipped": sorted(skipped),
        "seconds": round(time.perf_counter() - started, 1), "date": time.strftime("%Y-%m-%d"),
        "machine": f"{platform.machine()}, {os.cpu_count()} cpus",
    }
    suffix = "" if args.mode == "aware" else f"_{args.mode}"
    out = args.out or RESULTS / f"method_quality_{loaded.name}{suffix}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=2) + "\n")
    out.with_suffix(".md").write_text(markdown(record))
    print(markdown(record))
    for row in rows:
        print(f"{row['method']:<32} accuracy / full KV: " + ", ".join(
            f"{f:g}→{r}" for f, r in zip(args.fractions, row["relative_to_full"])))
    return 0


if __name__ == "__main__":
    sys.exit(main())
