"""Model load time: the embedded SmolLM2 read from its GGUF against the model store (converted once to safetensors).

    .venv/bin/python benchmarks/load_time.py

Every load runs in a fresh Python process, so nothing is remembered between them. In one run, on a fresh
temporary ZIGZAG_VIZ_CACHE: the first load (conversion included), later loads (median of --repeats), the GGUF
load with ZIGZAG_VIZ_MODEL_STORE=off (median of --gguf-repeats), and the whole
`zigzag-viz compare --model smollm2 --methods full,uniform --max-new-tokens 8 --window 4 --json` command on a
12-token prompt with the store off and on (--repeats interleaved runs each; the chat template makes the prompt
40 tokens, so the default 32-token window would not fit the default 20% budget).

load_s is load_model() alone; import_s the imports before it (torch, zigzag_viz, transformers' Llama and
tokenizer classes: the same for both paths); process_s the whole process, interpreter start included, and
process_cpu_s its CPU time, which a busy machine inflates less than wall time.
Writes benchmarks/results/load_time.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
CLI = Path(sys.executable).parent / "zigzag-viz"
PROMPT = "What is the capital of France? Answer in one word."
PROMPT_TOKENS = 12
GOALS = {"later_load_s": 1.0, "compare_s": 3.0}

LOAD_IN_CHILD = """
import json, time
started = time.perf_counter()
from zigzag_viz.pipeline.models import load_model
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM, PreTrainedTokenizerFast
imported = time.perf_counter()
loaded = load_model("smollm2")
print(json.dumps({"import_s": imported - started, "load_s": time.perf_counter() - imported,
                  "device": str(loaded.device), "dtype": str(loaded.dtype)}))
"""


def _child_env(cache: Path, store: bool) -> dict:
    return {**os.environ, "ZIGZAG_VIZ_CACHE": str(cache), "ZIGZAG_VIZ_MODEL_STORE": "on" if store else "off",
            "TRANSFORMERS_VERBOSITY": "error", "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1"}


def _children_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _run(command: list[str], env: dict) -> tuple[float, float, str]:
    """(wall seconds, CPU seconds, stdout) of one command; exits on failure."""
    cpu_before = _children_cpu_s()
    started = time.perf_counter()
    done = subprocess.run(command, env=env, capture_output=True, text=True, cwd=ROOT)
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(command[:3])} failed:\n{done.stderr[-3000:]}")
    return seconds, _children_cpu_s() - cpu_before, done.stdout


def load_once(cache: Path, store: bool) -> dict:
    """One load_model("smollm2") in a fresh process: {"load_s", "import_s", "process_s", "process_cpu_s", ...}."""
    process_s, process_cpu_s, stdout = _run([sys.executable, "-c", LOAD_IN_CHILD], _child_env(cache, store))
    row = {**json.loads(stdout.strip().splitlines()[-1]), "process_s": process_s, "process_cpu_s": process_cpu_s}
    return {k: round(v, 3) if isinstance(v, float) else v for k, v in row.items()}


def _median_of(rows: list[dict]) -> dict:
    keys = ("load_s", "import_s", "process_s", "process_cpu_s")
    return {key: round(statistics.median(r[key] for r in rows), 3) for key in keys}


def compare_once(cache: Path, store: bool, prompt_file: Path) -> tuple[float, float]:
    """(wall seconds, CPU seconds) of the whole compare command."""
    command = [str(CLI), "compare", "--model", "smollm2", "--prompt-file", str(prompt_file), "--methods",
               "full,uniform", "--max-new-tokens", "8", "--window", "4", "--json"]
    seconds, cpu_s, stdout = _run(command, _child_env(cache, store))
    if [row["method"] for row in json.loads(stdout)] != ["full", "uniform"]:
        raise SystemExit(f"unexpected compare output: {stdout[:300]}")
    return round(seconds, 3), round(cpu_s, 3)


def _prompt_tokens(cache: Path) -> int:
    """Tokens of PROMPT alone (before the chat template adds its system turn)."""
    code = ("from zigzag_viz.pipeline.models import _load_smollm2_tokenizer as tokenizer; "
            f"print(len(tokenizer()({PROMPT!r})['input_ids']))")
    return int(_run([sys.executable, "-c", code], _child_env(cache, True))[2].strip())


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3, help="later loads, and compare runs per setting")
    parser.add_argument("--gguf-repeats", type=int, default=2)
    parser.add_argument("--out", type=Path, default=RESULTS / "load_time.json")
    args = parser.parse_args(argv)

    load_average = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="zigzag_viz_load_time_") as scratch:
        cache = Path(scratch) / "cache"
        first = load_once(cache, store=True)
        print(f"first load (conversion included): {first['load_s']:.2f} s, process {first['process_s']:.2f} s",
              file=sys.stderr)
        later_rows = [load_once(cache, store=True) for _ in range(args.repeats)]
        later = _median_of(later_rows)
        print(f"later loads: {later['load_s']:.2f} s, process {later['process_s']:.2f} s (median of {args.repeats})",
              file=sys.stderr)
        gguf_rows = [load_once(cache, store=False) for _ in range(args.gguf_repeats)]
        gguf = _median_of(gguf_rows)
        print(f"GGUF loads: {gguf['load_s']:.2f} s, process {gguf['process_s']:.2f} s "
              f"(median of {args.gguf_repeats})", file=sys.stderr)

        prompt_file = Path(scratch) / "prompt.txt"
        prompt_file.write_text(PROMPT + "\n", encoding="utf-8")
        prompt_tokens = _prompt_tokens(cache)
        if prompt_tokens != PROMPT_TOKENS:
            raise SystemExit(f"the prompt has {prompt_tokens} tokens, expected {PROMPT_TOKENS}")
        runs = {"store_off": [], "store_on": []}
        for _ in range(args.repeats):
            for setting in runs:
                runs[setting].append(compare_once(cache, setting == "store_on", prompt_file))
        before, after = (statistics.median(wall for wall, _ in runs[k]) for k in runs)
        cpu_before, cpu_after = (statistics.median(cpu for _, cpu in runs[k]) for k in runs)
        print(f"compare command: store off {before:.2f} s, store on {after:.2f} s, after/before {after / before:.3f}",
              file=sys.stderr)

    record = {
        "benchmark": "load_time",
        "model": "smollm2",
        "device": first["device"],
        "dtype": first["dtype"],
        "torch": _version("torch"),
        "transformers": _version("transformers"),
        "machine": f"{platform.machine()}, {os.cpu_count()} cpus",
        "load_average_at_start": [round(x, 2) for x in load_average],
        "date": time.strftime("%Y-%m-%d"),
        "first_load": first,
        "later_loads": {**later, "repeats": args.repeats, "runs": later_rows},
        "gguf_loads": {**gguf, "repeats": args.gguf_repeats, "runs": gguf_rows},
        "compare": {
            "command": "zigzag-viz compare --model smollm2 --prompt-file <prompt> --methods full,uniform "
                       "--max-new-tokens 8 --window 4 --json",
            "prompt": PROMPT,
            "prompt_tokens": prompt_tokens,
            "store_off_s": round(before, 3),
            "store_on_s": round(after, 3),
            "ratio_after_before": round(after / before, 4),
            "store_off_cpu_s": round(cpu_before, 3),
            "store_on_cpu_s": round(cpu_after, 3),
            "runs": {k: [{"wall_s": wall, "cpu_s": cpu} for wall, cpu in v] for k, v in runs.items()},
        },
        "goals": {**GOALS, "later_load_met": later["load_s"] <= GOALS["later_load_s"],
                  "compare_met": after <= GOALS["compare_s"]},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=2) + "\n")
    print(json.dumps(record, indent=2))
    return record


def _version(package: str) -> str:
    from importlib.metadata import version

    return version(package)


if __name__ == "__main__":
    main()
