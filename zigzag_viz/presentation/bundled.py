"""Results bundled with the package, so that every page opens populated before any model is loaded.

    .venv/bin/python -m zigzag_viz.presentation.bundled      # regenerate them from the real models (minutes)

The bundled prompt (`example_prompt`) analysed on each embedded model, and compared with full KV under
BUNDLED_METHODS at the pages' default settings in both modes; stored as gzipped `wire` JSON under
zigzag_viz/bundled/ (no pickle), with the settings, versions and date they were made with. The committed quality
studies of benchmarks/results/ become runs under zigzag_viz/bundled/runs/ for the Runs page.
"""

from __future__ import annotations

import dataclasses
import gzip
import json
import re
import shutil
import sys
import time
from functools import lru_cache
from importlib import resources
from pathlib import Path

from ..errors import UserError
from ..evaluation.prompts import EXAMPLES
from ..serving.api import CompareOptions
from .views import AnalysisResult, ComparisonResult

BUNDLED_MODELS = ("smollm2", "gemma3")
RUNS = "runs"  # the committed quality studies as runs the Runs page lists: runs/quality-<model>/
BUNDLED_SOURCE = next(iter(EXAMPLES))  # the pages' default prompt
BUNDLED_METHODS = "full,zigzag,pyramid,uniform,adakv,kivi,less"
BUNDLED_MODES = ("aware", "context")
SETTINGS = {"budget": 0.2, "window": 32, "max_new_tokens": 24}
FOLDER = "bundled"


def bundled_options(model: str, mode: str, methods: str = BUNDLED_METHODS) -> CompareOptions:
    """The options a bundled comparison was made with (the Compare page's defaults)."""
    example = EXAMPLES[BUNDLED_SOURCE]()
    return CompareOptions(model, example.text, methods, SETTINGS["budget"], SETTINGS["max_new_tokens"],
                          SETTINGS["window"], answer=example.answer, mode=mode)


def _name(kind: str, model: str, mode: str | None = None) -> str:
    return f"{kind}-{model}" + (f"-{mode}" if mode else "") + ".json.gz"


@lru_cache(maxsize=16)
def _read(name: str):
    """The decoded result in a bundled file, or None when it is missing or unreadable."""
    from ..serving import wire

    try:
        data = resources.files("zigzag_viz").joinpath(FOLDER, name).read_bytes()
        record = json.loads(gzip.decompress(data))
        return record["made"], wire.decode(record["result"])
    except (OSError, ValueError, KeyError, TypeError, UserError):
        return None


def bundled_analysis(model: str, prompt: str, window: int) -> tuple[dict, AnalysisResult] | None:
    """(how it was made, the analysis) of the bundled prompt on `model`, when `prompt` and `window` are the
    bundled ones; else None."""
    if prompt != EXAMPLES[BUNDLED_SOURCE]().text or window != SETTINGS["window"]:
        return None
    return _read(_name("analysis", model))


def bundled_comparison(model: str, mode: str, methods: str | None = None
                       ) -> tuple[dict, ComparisonResult, CompareOptions] | None:
    """(how it was made, the comparison, its options) of the bundled prompt on `model` in `mode`, or None. With
    `methods` (comma-separated specs) all among the bundled ones, only their rows, in that order."""
    found = _read(_name("comparison", model, mode))
    if found is None:
        return None
    made, shown = found
    wanted = [m for m in (methods or "").split(",") if m]
    rows = {row.method: row for row in shown.comparison.results}
    if not wanted or not set(wanted) <= set(rows):
        return made, shown, bundled_options(model, mode)
    comparison = dataclasses.replace(shown.comparison, results=[rows[m] for m in wanted])
    tokens = {m: shown.answer_tokens[m] for m in wanted}
    return made, dataclasses.replace(shown, comparison=comparison, answer_tokens=tokens), \
        bundled_options(model, mode, ",".join(wanted))


def bundled_runs_folder() -> Path:
    """The folder of bundled runs (inside the installed package)."""
    return Path(str(resources.files("zigzag_viz").joinpath(FOLDER, RUNS)))


def bundle_study(study: Path, model: str, folder: Path) -> Path:
    """A committed quality study (`benchmarks/results/quality_<model>.parquet`) as a complete run at `folder`:
    its rows in one shard, its grid read from the rows into the manifest's settings."""
    import pandas as pd

    from ..evaluation.store import RunStore

    rows = pd.read_parquet(study)
    settings = {"model": model, "study": Path(study).name, "rows": len(rows),
                **{f"{column}s": sorted(rows[column].unique().tolist()) for column in ("task", "length", "depth", "budget",
                                                                                         "method", "mode")}}
    store = RunStore.open(folder, settings)
    for shard in store.shards():
        shard.unlink()
    shutil.copyfile(study, store.folder / "shard-study.parquet")  # the study's Parquet file is already one shard
    report = Path(study).with_suffix(".md")  # "Status running, 432 of 864 rows" for a study stopped part way
    found = re.search(r"Status (\w+), (\d+) of (\d+) rows", report.read_text()) if report.exists() else None
    total = int(found.group(3)) if found else len(rows)
    store.update(status="complete" if len(rows) >= total else "stopped", rows_done=len(rows), rows_total=total)
    return folder


def regenerate(folder, models=BUNDLED_MODELS, progress=print) -> list[str]:
    """Make every bundled result from the real models into `folder`; the names of the files written."""
    from importlib.metadata import version

    from ..evaluation.runner import Runner
    from ..pipeline.models import load_model
    from ..serving import wire
    from .views import analysis_result, comparison_result

    written = []
    studies = Path(__file__).resolve().parents[2] / "benchmarks" / "results"
    for model in models:
        for study in sorted(studies.glob(f"quality_{model}*.parquet")):  # quality_smollm2.parquet, quality_smollm2_grid…
            written.append(str(bundle_study(study, model, folder / RUNS / study.stem.replace("_", "-"))))
            progress(f"bundled the study {study.name} as a run")
        loaded = load_model(model)
        made = {"model": model, "device": str(loaded.device), "date": time.strftime("%Y-%m-%d"),
                "torch": version("torch"), "transformers": version("transformers"), **SETTINGS,
                "methods": BUNDLED_METHODS}
        runner = Runner(loaded)
        example = EXAMPLES[BUNDLED_SOURCE]()
        results = {_name("analysis", model): analysis_result(loaded, runner.analyze(example.text, SETTINGS["window"]),
                                                             False)}
        for mode in BUNDLED_MODES:
            progress(f"{model}: comparing in {mode} mode")
            options = bundled_options(model, mode)
            results[_name("comparison", model, mode)] = comparison_result(loaded, runner.compare(options.request(runner)))
        for name, result in results.items():
            path = folder / name
            path.write_bytes(gzip.compress(json.dumps({"made": made, "result": wire.encode(result)}).encode(), mtime=0))
            written.append(name)
            progress(f"wrote {path} ({path.stat().st_size / 1024:.0f} KiB)")
    return written


if __name__ == "__main__":
    target = Path(__file__).resolve().parents[1] / FOLDER
    target.mkdir(exist_ok=True)
    regenerate(target, sys.argv[1:] or BUNDLED_MODELS)
