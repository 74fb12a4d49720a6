"""Offline sweeps: every (task, family, sample, length, depth) prompt × mode, one prefill each, every method and
kept fraction against it through the runner, stored as Parquet shards of a run that resumes where it stopped.

    settings = SweepSettings(model="smollm2", tasks=("passkey", "vt"), lengths=(1024,), depths=(0.5,),
                             samples=2, budgets=(0.2, 0.5), methods=("full", "uniform", "zigzag"),
                             modes=("aware",))
    settings.check()                                  # before any model is loaded: one line for bad input
    run_sweep(load_model(settings.model), settings, RunStore.open(out, settings.to_json()), progress=print)
    run_sweep_ray(settings, RunStore.open(out, settings.to_json()), address=None)   # or over a Ray cluster

Rows are keyed by `store.KEY_COLUMNS`; a prompt whose rows are all stored is skipped, so running the same sweep
again continues it and never writes a row twice. A kill loses at most the prompt in flight.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

from ..errors import InputError, UserError
from ..methods import parse_specs
from ..pipeline.budgets import kept_fraction
from ..pipeline.models import LoadedModel
from .compare import MODES, Comparison, MethodResult
from .runner import Runner
from .store import KEY_COLUMNS, RunStore
from .tasks import TASKS, Family, TaskPrompt, parse_tasks, score

Progress = Callable[[int, int, str], None]


@dataclass(frozen=True)
class SweepSettings:
    """What a sweep runs: lengths in the model's tokens, needle depths in [0, 1], samples per cell, kept
    fractions, method specs, modes, prompt families per task (empty: each task's own), the observation window
    and tokens generated per answer, and the seed that fixes every prompt."""

    model: str
    tasks: tuple[str, ...]
    lengths: tuple[int, ...]
    depths: tuple[float, ...]
    samples: int
    budgets: tuple[float, ...]
    methods: tuple[str, ...]
    modes: tuple[str, ...] = ("aware",)
    families: tuple[str, ...] = ()
    window: int = 32
    max_new_tokens: int = 24
    seed: int = 0

    def check(self) -> SweepSettings:
        """These settings with canonical method specs, or InputError for the first that cannot run."""
        if not self.model or not self.model.strip():
            raise InputError("no model given")
        parse_tasks(",".join(self.tasks))
        for name in ("lengths", "depths", "budgets", "methods", "modes"):
            if not getattr(self, name):
                raise InputError(f"the sweep grid is empty: give at least one of --{name}")
        if any(length < 16 for length in self.lengths):
            raise InputError(f"prompt lengths are whole numbers of tokens ≥ 16, got {min(self.lengths)}")
        if any(not 0.0 <= depth <= 1.0 for depth in self.depths):
            raise InputError("needle depths lie in [0, 1]")
        if self.samples < 1:
            raise InputError(f"samples must be at least 1, got {self.samples}")
        if self.window < 1 or self.max_new_tokens < 1:
            raise InputError("window and max_new_tokens are whole numbers ≥ 1")
        budgets = tuple(kept_fraction(b) for b in self.budgets)
        unknown = [m for m in self.modes if m not in MODES]
        if unknown:
            raise InputError(f"unknown mode {unknown[0]!r:.20}: choose from {', '.join(MODES)}")
        for family in self.families:
            Family.parse(family)
        specs = tuple(m.spec for m in parse_specs(",".join(self.methods)))
        smallest = min(budgets) * min(self.lengths)
        if smallest < self.window:
            raise InputError(f"a budget of {min(budgets):g} keeps about {smallest:.0f} tokens of a {min(self.lengths)}-token "
                             f"prompt, below the always-kept window of {self.window}: raise the budget or the length, "
                             "or lower --window")
        return dataclasses.replace(self, budgets=budgets, methods=specs)

    def to_json(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}

    def families_of(self, task: str) -> tuple[str, ...]:
        return self.families or TASKS[task].families

    def cells(self) -> Iterator[tuple[str, str, int, int, float]]:
        """(task, family, sample, length, depth) of every prompt, in a fixed order."""
        for task in self.tasks:
            depths = self.depths if TASKS[task].has_depth else self.depths[:1]  # no needle: one prompt per length
            for family in self.families_of(task):
                for length in self.lengths:
                    for depth in depths:
                        for sample in range(self.samples):
                            yield task, family, sample, length, depth

    @property
    def rows_per_prompt(self) -> int:
        return len(self.methods) * len(self.budgets)

    @property
    def rows_total(self) -> int:
        return sum(1 for _ in self.cells()) * len(self.modes) * self.rows_per_prompt


def row_schema():
    """The pyarrow schema of a stored sweep row (see `record`)."""
    import pyarrow as pa

    floats = ("depth", "budget", "score", "kv_fraction", "kl_mean", "top1_agreement", "rouge_l", "token_agreement",
              "prefill_s", "analysis_s", "compress_s", "decode_s", "ms_per_token")
    ints = ("sample", "length", "n_tokens", "kv_bytes", "first_divergence", "peak_gpu_bytes", "seed")
    texts = ("task", "family", "method", "mode", "answer")
    types = {**{c: pa.float64() for c in floats}, **{c: pa.int64() for c in ints}, **{c: pa.string() for c in texts},
             "layer_budgets": pa.list_(pa.int64()), "expected": pa.list_(pa.string())}
    return pa.schema([(column, types[column]) for column in ROW_COLUMNS])


ROW_COLUMNS = ("task", "family", "sample", "length", "depth", "budget", "method", "mode", "score", "n_tokens",
               "kv_bytes", "kv_fraction", "kl_mean", "top1_agreement", "rouge_l", "token_agreement",
               "first_divergence", "prefill_s", "analysis_s", "compress_s", "decode_s", "ms_per_token",
               "peak_gpu_bytes", "layer_budgets", "answer", "expected", "seed")


def record(prompt: TaskPrompt, row: MethodResult, n_tokens: int, seed: int) -> dict:
    """One stored row: its keys (store.KEY_COLUMNS), the task score and the row's measurements."""
    return {
        "task": prompt.task, "family": prompt.family, "sample": prompt.sample, "length": prompt.length,
        "depth": prompt.depth, "budget": row.budget, "method": row.method, "mode": row.mode,
        "score": score(prompt, row.text) if prompt.answers else float("nan"), "n_tokens": n_tokens, "kv_bytes": row.kv_bytes,
        "kv_fraction": row.kv_fraction, "kl_mean": row.kl_mean, "top1_agreement": row.top1_agreement,
        "rouge_l": row.rouge_l, "token_agreement": row.token_agreement, "first_divergence": row.first_divergence,
        "prefill_s": row.prefill_s, "analysis_s": row.analysis_s, "compress_s": row.compress_s,
        "decode_s": row.decode_s, "ms_per_token": row.ms_per_token, "peak_gpu_bytes": row.peak_gpu_bytes,
        "layer_budgets": list(row.layer_budgets), "answer": row.text, "expected": list(prompt.answers), "seed": seed,
    }


Cell = tuple  # (task, family, sample, length, depth)


class PromptWorker:
    """Makes the rows of one prompt and mode on a loaded model: where the model is, in this process or in a Ray
    actor (which builds one from the settings and loads the model once)."""

    def __init__(self, settings: SweepSettings | dict, loaded: LoadedModel | None = None):
        if isinstance(settings, dict):
            settings = SweepSettings(**{k: tuple(v) if isinstance(v, list) else v for k, v in settings.items()})
        self.settings = settings
        if loaded is None:
            from ..pipeline.models import load_model

            loaded = load_model(settings.model)
        self.loaded = loaded
        self.runner = Runner(loaded)

    def max_context(self) -> int:
        return self.loaded.max_context

    def rows(self, cell: Cell, mode: str) -> list[dict]:
        settings = self.settings
        task, family, sample, length, depth = cell
        prompt = TASKS[task].generate(length, depth, sample, family, self.loaded.count_tokens, settings.seed)
        request = self.runner.request(prompt.context, list(settings.methods), list(settings.budgets), mode,
                                      prompt.question, settings.window, settings.max_new_tokens)
        n_tokens = int(request.input_ids.shape[1])
        return [record(prompt, row, n_tokens, settings.seed) for row in self.runner.rows(request)]


def _pending(settings: SweepSettings, done: set) -> list[tuple[Cell, str]]:
    """(cell, mode) of every prompt that still lacks a row, in the sweep's order."""
    return [(cell, mode) for cell in settings.cells() for mode in settings.modes
            if not all((*cell, b, m, mode) in done for m in settings.methods for b in settings.budgets)]


def _drive(settings: SweepSettings, store: RunStore, max_context: int, results, progress: Progress | None) -> int:
    """Store the rows `results(pending)` yields as (cell, mode, rows), one shard each, and keep the manifest
    up to date, holding the run for this one writer; the rows written."""
    if max(settings.lengths) > max_context:
        raise InputError(f"a length of {max(settings.lengths)} tokens is beyond {settings.model}'s context of "
                         f"{max_context}")
    with store.writing():
        total = settings.rows_total
        store.remove_leftovers()
        done = store.done_keys()
        store.update(status="running", rows_total=total, rows_done=len(done), model_max_context=max_context)
        written = 0
        if progress is not None:
            progress(len(done), total, "starting" if not done else "continuing a stopped run")
        try:
            for (task, family, sample, length, depth), mode, rows in results(_pending(settings, done)):
                rows = [r for r in rows if row_key(r) not in done]
                if rows:
                    store.write_shard(rows, row_schema())
                done.update(row_key(r) for r in rows)
                written += len(rows)
                store.update(rows_done=len(done))
                if progress is not None:
                    progress(len(done), total,
                             f"{task} {family} length {length} depth {depth:g} sample {sample} {mode}")
        except BaseException:
            store.update(status="stopped", rows_done=len(done))
            raise
        store.update(status="complete" if len(done) >= total else "stopped", rows_done=len(done))
        return written


def run_sweep(loaded: LoadedModel, settings: SweepSettings, store: RunStore, progress: Progress | None = None) -> int:
    """Run every prompt of `settings` not yet stored in `store` on `loaded`, one shard per prompt and mode; the
    rows written. `progress(done, total, message)` hears each stored prompt (and may raise to stop)."""
    worker = PromptWorker(settings, loaded)

    def results(pending):
        for cell, mode in pending:
            yield cell, mode, worker.rows(cell, mode)

    return _drive(settings, store, loaded.max_context, results, progress)


def run_sweep_ray(settings: SweepSettings, store: RunStore, progress: Progress | None = None,
                  address: str | None = None, workers: int | None = None) -> int:
    """The same sweep spread over Ray workers: a local cluster (`address` None) or the one at `address`. Each
    worker is an actor that loads the model once (one GPU each when the cluster has GPUs, else one CPU); prompts
    go to whichever worker is free and the rows are stored here as they come back, so the run is the serial
    run's, timings aside."""
    import ray

    started_here = not ray.is_initialized()
    if started_here:
        options = {"address": address} if address else {"num_cpus": workers or os.cpu_count() or 1}
        ray.init(include_dashboard=False, logging_level="ERROR", log_to_driver=False, **options)
    try:
        resources = ray.cluster_resources()
        gpus = int(resources.get("GPU", 0))
        count = workers or gpus or max(int(resources.get("CPU", 1)), 1)
        actor = ray.remote(num_gpus=1 if gpus else 0, num_cpus=0 if gpus else 1)(PromptWorker)
        actors = [actor.remote(settings.to_json()) for _ in range(count)]
        max_context = _unwrapped(ray, actors[0].max_context.remote())

        def results(pending):
            queue = list(pending)
            running = {}
            for worker in actors:
                if queue:
                    cell, mode = queue.pop(0)
                    running[worker.rows.remote(cell, mode)] = (worker, cell, mode)
            while running:
                finished, _ = ray.wait(list(running), num_returns=1)
                worker, cell, mode = running.pop(finished[0])
                if queue:
                    next_cell, next_mode = queue.pop(0)
                    running[worker.rows.remote(next_cell, next_mode)] = (worker, next_cell, next_mode)
                yield cell, mode, _unwrapped(ray, finished[0])

        return _drive(settings, store, max_context, results, progress)
    finally:
        if started_here:
            ray.shutdown()


def _unwrapped(ray, reference):
    """`ray.get(reference)`, a worker's UserError raised as itself (one line, not Ray's traceback)."""
    try:
        return ray.get(reference)
    except (ray.exceptions.RayTaskError, ray.exceptions.ActorDiedError) as exc:
        cause = getattr(exc, "cause", None)
        if isinstance(cause, UserError):
            raise cause from None
        raise


def save_comparison(comparison: Comparison, folder) -> RunStore:
    """Store a comparison (the Compare page's, the CLI's) as a run of one prompt: task "compare", family "custom",
    depth the known answer's relative position in the compressed prompt (NaN without one), score the Compare page's
    task score (NaN without an answer); its settings name the model, mode, window and the prompt's digest."""
    digest = hashlib.sha256(" ".join(comparison.prompt_tokens).encode("utf-8")).hexdigest()[:16]
    settings = {"kind": "comparison", "model": comparison.model, "mode": comparison.mode, "window": comparison.window,
                "budget": comparison.budget, "prompt_sha256": digest, "methods": [r.method for r in comparison.results]}
    store = RunStore.open(Path(folder), settings)
    with store.writing():
        if store.shards():
            raise InputError(f"{store.folder} already holds this comparison")
        positions = comparison.answer_positions
        depth = positions[0] / comparison.n_context if positions else float("nan")
        prompt = TaskPrompt("compare", "custom", comparison.n_tokens, depth, 0, "", comparison.question or "",
                            (comparison.answer,) if comparison.answer else ())
        rows = [{**record(prompt, row, comparison.n_tokens, 0),
                 "score": float("nan") if row.task_score is None else row.task_score} for row in comparison.results]
        store.write_shard(rows, row_schema())
        store.update(status="complete", rows_done=len(rows), rows_total=len(rows))
    return store


def row_key(row: dict) -> tuple:
    return tuple(row[column] for column in KEY_COLUMNS)


class RateReporter:
    """A progress line: rows done of total, rows per minute and time left, measured from its first report."""

    def __init__(self, write: Callable[[str], None]):
        self.write = write
        self.started: float | None = None
        self.first_done = 0

    def __call__(self, done: int, total: int, message: str) -> None:
        now = time.monotonic()
        if self.started is None:
            self.started, self.first_done = now, done
        minutes = (now - self.started) / 60
        rate = (done - self.first_done) / minutes if minutes > 0 and done > self.first_done else None
        left = f"{(total - done) / rate:.0f} min left" if rate else "time left known after the first prompt"
        self.write(f"rows {done}/{total} · {f'{rate:.1f}' if rate else '–'} rows/min · {left} · {message}")
