"""The `zigzag-viz` command line: analyze a prompt's layer signals, or compare methods against full KV."""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path

# Before anything imports tqdm or transformers: they read these once, at import.
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TQDM_DISABLE", "1")

from .pipeline.capture import SIGNALS  # noqa: E402
from .errors import InputError, UserError  # noqa: E402

DEFAULT_METHODS = "full,zigzag,pyramid,uniform"


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line on stderr, exit 2
        raise InputError(message)


def _quiet_libraries() -> None:
    import warnings

    warnings.filterwarnings("ignore")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def read_prompt(path: str) -> str:
    """Prompt text from a file, or standard input for '-', without its final newline; refuses empty and
    non-text input."""
    try:
        data = sys.stdin.buffer.read() if path == "-" else Path(path).read_bytes()
    except OSError as exc:
        raise InputError(f"cannot read prompt file {path}: {exc.strerror or exc}") from None
    if b"\x00" in data:
        raise InputError(f"the prompt in {path} is not text (binary data)")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise InputError(f"the prompt in {path} is not UTF-8 text") from None
    if not text.strip():
        raise InputError(f"the prompt in {path} is empty")
    return text.rstrip("\r\n")  # a text file's final newline is not part of the prompt


def _fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise InputError(f"budget must be a number in (0, 1], got {text!r}") from None
    if not math.isfinite(value) or not 0.0 < value <= 1.0:
        raise InputError(f"budget must be a number in (0, 1], got {text}")
    return value


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise InputError(f"expected a positive whole number, got {text!r}") from None
    if value < 1:
        raise InputError(f"expected a positive whole number, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="zigzag-viz", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    def common(sub):
        sub.add_argument("--model", default="smollm2", help="smollm2 (embedded), tiny, or a local folder")
        sub.add_argument("--prompt-file", required=True, help="text file with the prompt, or - for standard input")
        sub.add_argument("--window", type=_positive_int, default=32, help="observation window w (tokens)")
        sub.add_argument("--budget", type=_fraction, default=0.2, help="kept fraction of the prompt, in (0, 1]")
        sub.add_argument("--json", action="store_true", help="print JSON instead of a table")

    analyze = commands.add_parser("analyze", help="per-layer uncertainty signals and budgets")
    common(analyze)
    analyze.add_argument("--tau", type=_fraction, default=0.9, help="attention mass LMBA must cover")
    analyze.add_argument("--signal", choices=SIGNALS, default="lmba", help="layer uncertainty behind ZigZag budgets")
    analyze.add_argument("--heads", action="store_true", help="add per-head entropy and LMBA, and the GQA grouping")
    analyze.add_argument("--tokens", action="store_true", help="add the layer × token map (≤ 512 bins, with their text)")
    analyze.add_argument("--deep", action="store_true", help="add LMBO, the output-view minimum budget (slower)")

    compare = commands.add_parser("compare", help="full KV against compressed caches")
    common(compare)
    compare.add_argument("--methods", default=DEFAULT_METHODS, help="comma-separated method specs")
    compare.add_argument("--max-new-tokens", type=_positive_int, default=32)
    compare.add_argument("--answer", default=None, help="known answer, for the task score")
    compare.add_argument("--mode", choices=("aware", "context"), default="aware",
                         help="aware: compress after context and question; context: compress the context, then "
                              "feed the question through the compressed cache")
    compare.add_argument("--question", default=None,
                         help="question appended after a blank line (default in context mode: the prompt's last paragraph)")
    compare.add_argument("--export", default=None, metavar="PATH",
                         help="also write the whole comparison (settings, rows, kept-token maps) as JSON to PATH")

    commands.add_parser("methods", help="list the compression methods and their parameters")
    return parser


def run_analyze(args) -> dict:
    from .evaluation.runner import Runner
    from .pipeline.budgets import budget_curves
    from .pipeline.capture import LMBO_GRID, bin_columns, bin_edges, bin_texts
    from .pipeline.models import load_model

    text = read_prompt(args.prompt_file)
    if args.signal == "lmbo" and not args.deep:
        raise InputError("--signal lmbo needs --deep")
    loaded = load_model(args.model)
    pre = Runner(loaded).analyze(text, args.window, deep=args.deep)
    ids = pre.input_ids
    a = pre.analysis
    signals = {name: a.layer_signal(name, tau=args.tau) for name in ("entropy", "lmba", "hidden")}
    if args.deep:
        signals["lmbo"] = a.lmbo()
    layers = []
    for i in range(a.num_layers):
        row = {"layer": i, "entropy": float(signals["entropy"][i]), "lmba": float(signals["lmba"][i]),
               "hidden_change": float(signals["hidden"][i])}
        if args.deep:
            row["lmbo"] = float(signals["lmbo"][i])
        layers.append(row)
    curves = budget_curves(signals[args.signal], args.budget, a.n_tokens, a.window, caps=a.layer_caps)
    result = {
        "model": loaded.name,
        "n_tokens": a.n_tokens,
        "layers": layers,
        "budgets": {k: [int(b) for b in v] for k, v in curves.items()},
        "signal": args.signal,
        "window": a.window,
        "layer_caps": a.layer_caps.tolist(),
        "prefill_s": round(pre.seconds, 4),
    }
    if args.heads:
        result["heads"] = {
            "entropy": a.entropy.tolist(), "entropy_norm": a.entropy_norm.tolist(),
            "lmba": a.lmba(args.tau).tolist(), "kv_group": a.kv_group.tolist(),
        }
    if args.tokens:
        edges = bin_edges(a.n_tokens)
        result["tokens"] = {
            "bin_edges": edges.tolist(),
            "bin_texts": bin_texts(loaded.token_texts(ids[0]), edges),
            "importance": bin_columns(a.token_importance(), edges).tolist(),
            "hidden_change": bin_columns(a.hidden_change, edges, "mean").tolist(),
        }
    if args.deep:
        result["lmbo_grid"] = list(LMBO_GRID)
        result["lmbo_cos"] = a.lmbo_cos.tolist()
    return result


def run_compare(args) -> list[dict]:
    from .evaluation.runner import Runner
    from .methods import parse_specs
    from .pipeline.models import load_model

    methods = parse_specs(args.methods)
    text = read_prompt(args.prompt_file)
    runner = Runner(load_model(args.model))
    request = runner.request(text, methods, args.budget, args.mode, args.question, args.window, args.max_new_tokens,
                             args.answer)
    result = runner.compare(request)
    if args.export:
        try:
            Path(args.export).write_text(json.dumps(result.to_json()), encoding="utf-8")
        except OSError as exc:
            raise InputError(f"cannot write {args.export}: {exc.strerror or exc}") from None
    return [r.to_json() for r in result.results]


def _methods_listing() -> list[dict]:
    from .methods import METHODS

    return [
        {
            "method": name,
            "compresses": cls.compresses,
            "summary": cls.summary,
            "paper": cls.paper,
            "parameters": {k: {"default": p.default, "help": p.help} for k, p in cls.parameters.items()},
        }
        for name, cls in METHODS.items()
    ]


def _print_table(rows: list[dict], columns: list[str]) -> None:
    import pandas as pd

    frame = pd.DataFrame(rows)[columns]
    with pd.option_context("display.max_colwidth", 60, "display.width", 200):
        print(frame.to_string(index=False))


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
        if args.command == "methods":
            listing = _methods_listing()
            for row in listing:
                params = ", ".join(f"{k}={v['default']}" for k, v in row["parameters"].items())
                print(f"{row['method']:<10} {row['summary']}" + (f"  [{params}]" if params else ""))
            return 0
        _quiet_libraries()
        if args.command == "analyze":
            result = run_analyze(args)
            if args.json:
                print(json.dumps(result))
            else:
                print(f"{result['model']}: {result['n_tokens']} tokens")
                rows = [dict(layer, **{f"{k}_budget": v[layer["layer"]] for k, v in result["budgets"].items()})
                        for layer in result["layers"]]
                _print_table(rows, list(rows[0]))
        else:
            rows = run_compare(args)
            if args.json:
                print(json.dumps(rows))
            else:
                _print_table(rows, ["method", "mode", "kv_fraction", "token_agreement", "rouge_l", "kl_mean", "first_divergence",
                                   "task_score", "ms_per_token", "text"])
        return 0
    except UserError as exc:
        print(f"zigzag-viz: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("zigzag-viz: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
