"""The `zigzag-viz` command line: analyze a prompt's layer signals, compare methods against full KV, serve models,
run sweeps of generated tasks and query the stored runs."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

# Before anything imports tqdm or transformers: they read these once, at import.
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TQDM_DISABLE", "1")

from .pipeline.budgets import SIGNALS, kept_fraction  # noqa: E402
from .errors import InputError, UserError, check_text  # noqa: E402
from .failures import unexpected  # noqa: E402
from .serving.api import (  # noqa: E402
    DEFAULT_METHODS, AnalyzeOptions, CompareOptions, analysis_report, comparison_rows, configured_token, methods_listing,
)


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
    check_text(text, f"prompt in {path}")
    return text.rstrip("\r\n")  # a text file's final newline is not part of the prompt


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise InputError(f"expected a positive whole number, got {text!r}") from None
    if value < 1:
        raise InputError(f"expected a positive whole number, got {value}")
    return value


def _port(text: str) -> int:
    value = _positive_int(text)
    if value > 65535:
        raise InputError(f"a port is at most 65535, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="zigzag-viz", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    def common(sub):
        sub.add_argument("--model", default="smollm2", help="smollm2 (embedded), tiny, or a local folder")
        sub.add_argument("--prompt-file", required=True, help="text file with the prompt, or - for standard input")
        sub.add_argument("--window", type=_positive_int, default=32, help="observation window w (tokens)")
        sub.add_argument("--budget", type=kept_fraction, default=0.2, help="kept fraction of the prompt, in (0, 1]")
        sub.add_argument("--json", action="store_true", help="print JSON instead of a table")
        sub.add_argument("--backend", default=None, metavar="URL",
                         help="run on the model server at URL (zigzag-viz serve) instead of here")
        sub.add_argument("--token-file", default=None, metavar="PATH",
                         help="the backend's token, first line of PATH (default: ZIGZAG_VIZ_TOKEN)")

    analyze = commands.add_parser("analyze", help="per-layer uncertainty signals and budgets")
    common(analyze)
    analyze.add_argument("--tau", type=lambda text: kept_fraction(text, "tau"), default=0.9, help="attention mass LMBA must cover")
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
    compare.add_argument("--match-bytes", action="store_true",
                         help="bring every method to --budget as a share of full KV's bytes (methods on bits, "
                              "channels or layers get uniform eviction in front, its kept fraction solved for)")
    compare.add_argument("--export", default=None, metavar="PATH",
                         help="also write the whole comparison (settings, rows, kept-token maps) as JSON to PATH")

    methods = commands.add_parser("methods", help="list the compression methods and their parameters")
    methods.add_argument("--json", action="store_true", help="print JSON (what the server's GET /methods gives)")

    serve = commands.add_parser("serve", help="serve models over HTTP for analyze and compare --backend")
    serve.add_argument("--model", action="append", required=True, help="a model to load and serve (repeat for more)")
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on (beyond loopback only with a token)")
    serve.add_argument("--port", type=_port, default=8765)
    serve.add_argument("--token-file", default=None, metavar="PATH",
                       help="bearer token, first line of PATH (default: ZIGZAG_VIZ_TOKEN, else a new random token "
                            "printed once and written under the cache folder)")
    sweep = commands.add_parser("sweep", help="run a grid of generated tasks and store it as a run (resumable)")
    sweep.add_argument("--model", default="smollm2", help="smollm2, gemma3, tiny, or a local folder")
    sweep.add_argument("--tasks", default="passkey", help="comma-separated: " + ", ".join(_task_names()))
    sweep.add_argument("--lengths", type=_int_list, default=(1024,), help="prompt lengths in tokens, comma-separated")
    sweep.add_argument("--depths", type=_float_list, default=(0.5,), help="needle depths in [0, 1], comma-separated")
    sweep.add_argument("--samples", type=_positive_int, default=1, help="prompts per (task, family, length, depth)")
    sweep.add_argument("--budgets", type=_float_list, default=(0.2, 0.5), help="kept fractions, comma-separated")
    sweep.add_argument("--methods", default="full,uniform,zigzag", help="comma-separated method specs")
    sweep.add_argument("--modes", default="aware", help="aware, context, or aware,context")
    sweep.add_argument("--families", default="", help="prompt families (filler/key format/wording), default: each task's own")
    sweep.add_argument("--window", type=_positive_int, default=32)
    sweep.add_argument("--max-new-tokens", type=_positive_int, default=24)
    sweep.add_argument("--seed", type=int, default=0)
    sweep.add_argument("--out", required=True, metavar="FOLDER", help="the run's folder (runs/NAME); the same command continues it")
    sweep.add_argument("--ray", action="store_true", help="spread prompts over a local Ray cluster (one worker per CPU or GPU)")
    sweep.add_argument("--ray-address", default=None, metavar="ADDR", help="join the Ray cluster at ADDR instead")
    sweep.add_argument("--workers", type=_positive_int, default=None, help="Ray workers (default: one per GPU, else per CPU)")

    runs = commands.add_parser("runs", help="stored runs: list, show a summary, export rows")
    runs.add_argument("action", choices=("list", "show", "export"))
    runs.add_argument("name", nargs="?", default=None, help="the run (a folder under --root) for show and export")
    runs.add_argument("--root", default="runs", help="folder holding the runs (default: runs)")
    runs.add_argument("--format", choices=("csv", "parquet"), default="csv")
    runs.add_argument("--to", default=None, metavar="PATH", help="export file (default: NAME.csv / NAME.parquet here)")
    return parser


def _task_names() -> list[str]:
    from .evaluation.tasks import TASKS

    return list(TASKS)


def _split(text: str, kind, name: str) -> tuple:
    try:
        values = tuple(kind(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise InputError(f"{name} must be comma-separated numbers, got {text!r:.60}") from None
    if not values:
        raise InputError(f"the sweep grid is empty: give at least one {name}")
    return values


def _int_list(text: str) -> tuple[int, ...]:
    return _split(text, int, "length")


def _float_list(text: str) -> tuple[float, ...]:
    return _split(text, float, "value")


def run_sweep(args) -> int:
    """Check the sweep and its folder before loading anything, then run what is not stored yet."""
    from .evaluation.store import RunStore
    from .evaluation.sweep import RateReporter, SweepSettings, run_sweep as sweep, run_sweep_ray
    from .pipeline.models import load_model

    settings = SweepSettings(
        model=args.model, tasks=tuple(t.strip() for t in args.tasks.split(",") if t.strip()), lengths=args.lengths,
        depths=args.depths, samples=args.samples, budgets=args.budgets,
        methods=tuple(m.strip() for m in args.methods.split(",") if m.strip()),
        modes=tuple(m.strip() for m in args.modes.split(",") if m.strip()),
        families=tuple(f.strip() for f in args.families.split(",") if f.strip()), window=args.window,
        max_new_tokens=args.max_new_tokens, seed=args.seed,
    ).check()
    store = RunStore.open(Path(args.out), settings.to_json())
    report = RateReporter(lambda line: print(line, file=sys.stderr, flush=True))
    if args.ray or args.ray_address:
        written = run_sweep_ray(settings, store, report, address=args.ray_address, workers=args.workers)
    else:
        written = sweep(load_model(settings.model), settings, store, report)
    manifest = store.manifest()
    print(f"{store.folder}: {manifest['rows_done']} of {manifest['rows_total']} rows stored ({written} new), "
          f"{manifest['status']}")
    return 0


def run_runs(args) -> None:
    import pandas as pd

    from .evaluation.store import RunStore, check_run_name, export, runs_table, summary

    root = Path(args.root)
    if args.action == "list":
        table = runs_table(root)
        print(table.to_string(index=False) if len(table) else f"no runs under {root}")
        return
    if not args.name:
        raise InputError(f"runs {args.action} needs the name of a run")
    store = RunStore(root / check_run_name(args.name))
    store.manifest()
    if args.action == "show":
        with pd.option_context("display.width", 200, "display.max_rows", 500):
            print(summary(store).to_string(index=False))
    else:
        out = export(store, args.format, Path(args.to or f"{args.name}.{args.format}"))
        print(f"wrote {out}")


def _backend(args):
    from .serving.client import Backend

    return Backend(args.backend, configured_token(args.token_file))


def run_analyze(args) -> dict:
    """What `analyze --json` prints, computed here or on the backend."""
    options = AnalyzeOptions(args.model, read_prompt(args.prompt_file), args.window, args.budget, args.tau,
                             args.signal, args.heads, args.tokens, args.deep).check()
    if args.backend:
        with _backend(args) as backend:
            return backend.analyze(options)
    from .pipeline.models import load_model

    return analysis_report(load_model(options.model), options)


def run_compare(args) -> list[dict]:
    """What `compare --json` prints, computed here or on the backend; writes the export when asked."""
    options = CompareOptions(args.model, read_prompt(args.prompt_file), args.methods, args.budget,
                             args.max_new_tokens, args.window, args.answer, args.mode, args.question, args.match_bytes)
    if args.backend:  # the server checks the options with the same one-line messages
        with _backend(args) as backend:
            result = backend.compare(options, None if args.json else _progress_printer())
        rows, export = result["rows"], lambda: result["comparison"]
    else:
        from .evaluation.runner import Runner
        from .pipeline.models import load_model

        runner = Runner(load_model(options.check().model))
        comparison = runner.compare(options.request(runner))
        rows, export = comparison_rows(comparison), comparison.to_json
    if args.export:
        try:
            Path(args.export).write_text(json.dumps(export()), encoding="utf-8")
        except OSError as exc:
            raise InputError(f"cannot write {args.export}: {exc.strerror or exc}") from None
    return rows


def _progress_printer():
    """A job progress callback printing each new step on stderr."""
    last = None

    def show(job: dict) -> None:
        nonlocal last
        progress = job["progress"]
        if job["status"] == "queued":
            line = f"queued: {progress['queue_position']} job(s) ahead"
        else:
            line = f"{progress['fraction']:4.0%} {progress['message']}"
        if line != last:
            print(line, file=sys.stderr, flush=True)
            last = line

    return show


def run_serve(args) -> None:
    from .pipeline.models import load_model
    from .serving.server import serve, server_token

    token = server_token(args.token_file, args.host)
    serve([load_model(name) for name in dict.fromkeys(args.model)], token, args.host, args.port)


def _print_table(rows: list[dict], columns: list[str]) -> None:
    import pandas as pd

    frame = pd.DataFrame(rows)[columns]
    with pd.option_context("display.max_colwidth", 60, "display.width", 200):
        print(frame.to_string(index=False))


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
        if args.command == "methods":
            listing = methods_listing()
            if args.json:
                print(json.dumps(listing))
                return 0
            for row in listing:
                params = ", ".join(f"{k}={v['default']}" for k, v in row["parameters"].items())
                print(f"{row['method']:<10} {row['summary']}" + (f"  [{params}]" if params else ""))
            return 0
        _quiet_libraries()
        if args.command == "serve":
            run_serve(args)
        elif args.command == "sweep":
            run_sweep(args)
        elif args.command == "runs":
            run_runs(args)
        elif args.command == "analyze":
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
                _print_table(rows, ["method", "mode", "budget", "kv_fraction", "token_agreement", "rouge_l", "kl_mean", "first_divergence",
                                   "task_score", "ms_per_token", "text"])
        return 0
    except UserError as exc:
        print(f"zigzag-viz: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("zigzag-viz: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # a bug: one line here, the traceback in the error log
        print(f"zigzag-viz: error: {unexpected(exc, 'zigzag-viz ' + ' '.join((argv or sys.argv[1:])[:1]))}",
              file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
