"""The committed results of `benchmarks/` as tables and figures for the Benchmarks page (no Streamlit here).

    records = read_results(results_folder())        # file name → its JSON record
    headline_table(records)                         # one line per result: what it measured, the headline, where
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

import pandas as pd

from .story import scores_sentence


def results_folder() -> Path:
    """benchmarks/results beside the package (where `make bench` writes)."""
    return Path(__file__).resolve().parents[2] / "benchmarks" / "results"


def read_results(folder: Path) -> tuple[dict[str, dict], list[str]]:
    """Every JSON record under `folder` by file stem, and one line per file that could not be read."""
    records, problems = {}, []
    for path in sorted(Path(folder).glob("*.json")):
        try:
            record = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            problems.append(f"{path.name} cannot be read ({type(exc).__name__})")
            continue
        if isinstance(record, dict):
            records[path.stem] = record
        else:
            problems.append(f"{path.name} holds no record")
    return records, problems


def _capture(r: dict) -> str:
    ratios = [row["ratio"] for row in r["rows"]]
    return (f"analysis prefill ÷ plain prefill {min(ratios):.2f}–{max(ratios):.2f} from {r['rows'][0]['tokens']} to "
            f"{r['rows'][-1]['tokens']} tokens")


def _load(r: dict) -> str:
    return f"later loads {r['later_loads']['load_s']:.2f} s, first load {r['first_load']['load_s']:.1f} s"


def _latency(r: dict) -> str:
    return (f"in the browser: cold start {r['cold_start_s']:.1f} s, page switch {r['page_switch_s']:.2f} s, slider → "
            f"chart {r['slider_ms']:.0f} ms (goals 5 s, 1 s, 200 ms), Run → first row {r['first_row_s']:.1f} s")


def _cache(r: dict) -> str:
    ratios = r["ratio_to_cold"]
    return (f"same Run again {ratios['same_run']:.2f} of the cold run, new kept fraction {ratios['new_budget']:.2f}, "
            f"one more method {ratios['one_more_method']:.2f}")


def _backend(r: dict) -> str:
    return f"server ÷ in-process {r['ratio']:.2f} ({r['server_s']:.1f} s vs {r['in_process_s']:.1f} s)"


def _server_load(r: dict) -> str:
    load = r["under_load"]
    return (f"{r['requests']} requests from {r['clients']} clients: p99 {load['p99_s']:.2f} s (bound "
            f"{r['p99_bound_s']:.2f} s), {r['errors']} errors")


def _quality(r: dict) -> str:
    """The best method among those holding the kept share of the bytes (± 0.05) at 20 % kept."""
    at = r["fractions"].index(0.2) if 0.2 in r["fractions"] else 0
    fraction = r["fractions"][at]
    equal = [m for m in r["methods"] if m["method"] != "full" and abs(m["kv_fraction"][at] - fraction) <= 0.05]
    best = max(equal, key=lambda m: m["accuracy"][at], default=None)
    if best is None:
        return "—"
    return (f"{r['prompts']} prompts, {r['mode']} setting, {fraction:.0%} of the bytes: best {best['method']} "
            f"{best['accuracy'][at]:.0%} (full KV {r['full_accuracy']:.0%})")


def _gpu(r: dict) -> str:
    return str(r.get("summary") or r.get("device") or "—")


HEADLINES: dict[str, Callable[[dict], str]] = {
    "capture_overhead": _capture,
    "load_time": _load,
    "app_latency": _latency,
    "compare_cache": _cache,
    "backend_overhead": _backend,
    "server_load": _server_load,
    "method_quality": _quality,
    "gpu": _gpu,
}


def _kind(stem: str) -> str:
    return next((kind for kind in sorted(HEADLINES, key=len, reverse=True) if stem.startswith(kind)), stem)


def headline_table(records: dict[str, dict]) -> pd.DataFrame:
    """One row per result file: file, model, device, machine, date and the headline."""
    rows = []
    for stem, record in records.items():
        describe = HEADLINES.get(_kind(stem))
        try:
            headline = describe(record) if describe else "—"
        except (KeyError, IndexError, TypeError, ValueError):
            headline = "— (a record of another shape)"
        machine = record.get("machine") or (f"{record['cpu_count']} cpus" if "cpu_count" in record else "—")
        rows.append({"result": stem, "model": record.get("model", "—"), "device": record.get("device", "—"),
                     "machine": machine, "date": record.get("date", "—"), "headline": headline})
    return pd.DataFrame(rows, columns=["result", "model", "device", "machine", "date", "headline"])


def capture_rows(record: dict) -> pd.DataFrame:
    """The capture-overhead rows: tokens, plain and analysis prefill seconds, their ratio."""
    return pd.DataFrame(record["rows"])[["tokens", "prefill_s", "analysis_s", "ratio"]]


def quality_tables(folder: Path) -> dict[str, str]:
    """The Markdown summaries of the committed quality studies (`quality_<model>.md`), by model."""
    return {path.stem.removeprefix("quality_"): path.read_text(encoding="utf-8")
            for path in sorted(Path(folder).glob("quality_*.md"))}


def zigzag_against_uniform(folder: Path, model: str, at: float = 0.2) -> str | None:
    """One sentence from the committed quality study of `model` (`story.scores_sentence`); None without a study."""
    path = Path(folder) / f"quality_{model}.parquet"
    if not path.exists():
        return None
    return scores_sentence(pd.read_parquet(path, columns=["method", "mode", "budget", "score"]), model, at)
