"""The quality study: a sweep of generated tasks on one model, stored as a run and summarised for the README.

    .venv/bin/python benchmarks/quality_study.py --model smollm2          # resumable: run it again to go on
    .venv/bin/python benchmarks/quality_study.py --model gemma3 --report-only   # the results of the rows so far

Runs `zigzag-viz sweep` (through the library) into runs/quality_<model>, then writes
benchmarks/results/quality_<model>.parquet (every row) and quality_<model>.md: per method and mode the accuracy at
20 % kept and the smallest kept fraction matching full KV (over every task), per task, and per prompt family at
20 % kept — the same method ranks differently on different templates, so the family table is part of the result.
The grid defaults to what this 2-core CPU finishes in well under an hour; say what was cut when quoting it.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from datetime import datetime
from pathlib import Path

os.environ.setdefault("TQDM_DISABLE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import pandas as pd

from zigzag_viz.evaluation import aggregate
from zigzag_viz.evaluation.store import RunStore
from zigzag_viz.evaluation.sweep import RateReporter, SweepSettings, run_sweep
from zigzag_viz.pipeline.models import load_model

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"


def _csv(text: str, kind=str) -> tuple:
    return tuple(kind(part) for part in text.split(",") if part.strip())


def table_md(frame: pd.DataFrame, index: bool = False) -> str:
    """A Markdown table of `frame` (its index as the first columns when `index`)."""
    if index:
        frame = frame.reset_index()
    lines = [_cells(frame.columns), "|" + "---|" * len(frame.columns)]
    return "\n".join(lines + [_cells(row) for row in frame.itertuples(index=False)])


def _cells(values) -> str:
    return "| " + " | ".join("" if pd.isna(v) else f"{v:g}" if isinstance(v, float) else str(v) for v in values) + " |"


def headline(rows: pd.DataFrame, at: float) -> pd.DataFrame:
    """Per method and mode: mean score at kept fraction `at` over every prompt, and the smallest kept fraction from
    which the mean score over every task matches full KV's."""
    overall = rows.assign(task="all")
    lossless = aggregate.smallest_lossless(overall).set_index(["method", "mode"])["smallest_lossless"]
    table = aggregate.accuracy_table(overall)
    scores = table[abs(table["budget"] - at) < 1e-9].set_index(["method", "mode"])
    lines = []
    for (method, mode), score in scores["score"].items():
        lines.append({"method": method, "mode": mode, f"score at {at:.0%}": round(score, 3),
                      "prompts": int(scores.loc[(method, mode), "prompts"]),
                      "smallest lossless fraction": lossless.get((method, mode), float("nan"))})
    return pd.DataFrame(lines).sort_values(["mode", f"score at {at:.0%}"], ascending=[True, False])


def markdown(rows: pd.DataFrame, settings: SweepSettings, manifest: dict, seconds: float, at: float) -> str:
    by_family = rows[abs(rows["budget"] - at) < 1e-9].pivot_table(
        index=["method", "mode"], columns="family", values="score", aggfunc="mean").round(2)
    by_task = rows[abs(rows["budget"] - at) < 1e-9].pivot_table(
        index=["method", "mode"], columns="task", values="score", aggfunc="mean").round(2)
    lossless = aggregate.smallest_lossless(rows).pivot_table(index=["method", "mode"], columns="task",
                                                             values="smallest_lossless", aggfunc="first")
    return "\n".join([
        f"# Quality study on {settings.model}: generated tasks, {len(rows)} rows",
        "",
        f"Tasks {', '.join(settings.tasks)}; lengths {', '.join(map(str, settings.lengths))} tokens; needle depths "
        f"{', '.join(f'{d:g}' for d in settings.depths)}; {settings.samples} sample(s) per cell and family; kept "
        f"fractions {', '.join(f'{b:g}' for b in settings.budgets)}; modes {', '.join(settings.modes)}; "
        f"{settings.max_new_tokens} new tokens; window {settings.window}. Status {manifest['status']}, "
        f"{manifest['rows_done']} of {manifest['rows_total']} rows; this run's sweep took {seconds / 60:.0f} min "
        f"(git {str(manifest.get('git_commit'))[:10]}). Scores: RULER's rule (share of expected strings in the "
        "answer), exact match for article questions.",
        "",
        f"## Per method and mode (every task): score at {at:.0%} kept and the smallest lossless fraction",
        "",
        table_md(headline(rows, at)),
        "",
        f"## Score at {at:.0%} kept, per task",
        "",
        table_md(by_task, index=True),
        "",
        "## Smallest kept fraction matching full KV, per task (empty: none in the grid)",
        "",
        table_md(lossless, index=True),
        "",
        f"## Score at {at:.0%} kept, per prompt family (filler / key format / wording)",
        "",
        table_md(by_family, index=True),
        "",
    ])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--tasks", default="passkey,niah_multikey,vt,qa")
    parser.add_argument("--lengths", default="1024")
    parser.add_argument("--depths", default="0.1,0.5,0.9")
    parser.add_argument("--samples", type=int, default=1)
    parser.add_argument("--budgets", default="0.2,0.5")
    parser.add_argument("--methods", default="full,uniform,pyramid,zigzag,adakv,streaming")
    parser.add_argument("--modes", default="aware,context")
    parser.add_argument("--at", type=float, default=0.2, help="kept fraction of the headline score")
    parser.add_argument("--label", default="", help="a second study of the same model: quality_<model>_<label>.*")
    parser.add_argument("--run", type=Path, default=None, help="the run folder (default runs/quality_<model>[_<label>])")
    parser.add_argument("--report-only", action="store_true",
                        help="write the results from the rows stored so far (a stopped run), without sweeping")
    args = parser.parse_args(argv)
    settings = SweepSettings(
        model=args.model, tasks=_csv(args.tasks), lengths=_csv(args.lengths, int), depths=_csv(args.depths, float),
        samples=args.samples, budgets=_csv(args.budgets, float), methods=_csv(args.methods),
        modes=_csv(args.modes), max_new_tokens=24,
    ).check()
    if not any(abs(b - args.at) < 1e-9 for b in settings.budgets):
        parser.error(f"--at {args.at:g} must be one of the kept fractions ({args.budgets})")
    name = f"quality_{args.model}" + (f"_{args.label}" if args.label else "")
    store = RunStore.open(args.run or ROOT / "runs" / name, settings.to_json())
    if args.report_only:
        manifest = store.manifest()
        seconds = (datetime.fromisoformat(manifest["updated"]) - datetime.fromisoformat(manifest["created"])).total_seconds()
    else:
        started = time.monotonic()
        run_sweep(load_model(settings.model), settings, store,
                  RateReporter(lambda line: print(line, file=sys.stderr, flush=True)))
        seconds = time.monotonic() - started
    rows = store.frame()
    RESULTS.mkdir(parents=True, exist_ok=True)
    rows.to_parquet(RESULTS / f"{name}.parquet", index=False)
    text = markdown(rows, settings, store.manifest(), seconds, args.at)
    (RESULTS / f"{name}.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
