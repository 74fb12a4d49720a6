"""The one way to run the pipeline: check a request, prefill its prompt once, evaluate (method, budget) rows.

Every caller (the command line, the app's pages, the benchmarks, the model server, sweep workers) goes through
`Runner`:

    runner = Runner(loaded, progress=report, cache=row_cache)
    prefill = runner.analyze(prompt, window=32)                 # signals only (Uncertainty, Budgets, analyze)
    request = runner.request(prompt, "full,zigzag,uniform", budgets=[0.2, 0.5], mode="context")  # checks, < 1 s
    for row in runner.rows(request):       # one prefill (cached), then each row as soon as it is ready
        show(row)
    comparison = runner.compare(request)   # or all rows of one budget at once, as a Comparison

`progress(fraction, message)` hears every step (prefill layers, calibration, each row) and may raise to cancel.
A `RowCache` keeps references and rows between calls (the app passes its Streamlit caches, a sweep its run store).
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable, Iterator, Protocol, Sequence

import torch

from ..errors import BudgetError, InputError
from ..methods import CompressionContext, CompressionMethod, parse_specs
from ..pipeline import runtime
from ..pipeline import cache as kvcache
from ..pipeline.budgets import average_budget, check_feasible, kept_fraction, smallest_kept_fraction
from ..pipeline.capture import decoder_layers
from ..pipeline.models import LoadedModel
from .compare import MODES, Comparison, MethodResult, Reference, assemble, method_row, prefill_reference
from .matching import Matched, match_method
from .prompts import split_question

Progress = Callable[[float, str], None]
MAX_NEW_TOKENS = 4096


class RowCache(Protocol):
    """Where a runner keeps what it computed: `reference(key, compute)` and `row(key, compute)` return the
    stored value for `key` (a tuple of plain values) or store and return `compute()`."""

    def reference(self, key: tuple, compute: Callable[[], Reference]) -> Reference: ...

    def row(self, key: tuple, compute: Callable[[], MethodResult]) -> MethodResult: ...


class NoCache:
    """Computes everything every time."""

    def reference(self, key, compute):
        return compute()

    def row(self, key, compute):
        return compute()


class LruCache:
    """Keeps the latest `references` prefilled prompts and `rows` rows in memory, for every thread of a process
    (the app's server, the model server). Two threads asking for the same new key may both compute it."""

    def __init__(self, references: int = 4, rows: int = 256):
        self.limits = {"reference": references, "row": rows}
        self.stores: dict[str, OrderedDict] = {"reference": OrderedDict(), "row": OrderedDict()}
        self.lock = threading.Lock()

    def _get(self, kind: str, key: tuple, compute: Callable):
        store = self.stores[kind]
        with self.lock:
            if key in store:
                store.move_to_end(key)
                return store[key]
        value = compute()
        with self.lock:
            store[key] = value
            while len(store) > self.limits[kind]:
                store.popitem(last=False)
        return value

    def reference(self, key, compute):
        return self._get("reference", key, compute)

    def row(self, key, compute):
        return self._get("row", key, compute)

    def clear(self) -> None:
        with self.lock:
            for store in self.stores.values():
                store.clear()


@dataclass(frozen=True)
class Request:
    """A checked request: the prompt's token ids (1, n) with the compressed part `ids[:, :split]`, the methods,
    the kept fractions and the settings. Made by `Runner.request`, which refuses anything that cannot run."""

    prompt: str
    input_ids: torch.Tensor
    split: int
    question: str | None
    methods: tuple[CompressionMethod, ...]
    budgets: tuple[float, ...]
    mode: str
    window: int
    max_new_tokens: int
    answer: str | None
    match_bytes: bool = False

    @property
    def specs(self) -> tuple[str, ...]:
        return tuple(method.spec for method in self.methods)

    @property
    def needs(self) -> frozenset[str]:
        """Records the prefill must keep for these methods."""
        return frozenset().union(*(method.prefill_needs for method in self.methods))

    def reference_key(self, model: str) -> tuple:
        return (model, self.prompt, self.window, self.max_new_tokens, self.mode, self.question, tuple(sorted(self.needs)))

    def row_key(self, model: str, spec: str, budget: float) -> tuple:
        return (model, self.prompt, self.window, self.max_new_tokens, self.mode, self.question, spec, budget, self.answer)


def _methods(methods: str | Sequence[CompressionMethod | str]) -> tuple[CompressionMethod, ...]:
    if isinstance(methods, str):
        return tuple(parse_specs(methods))
    parsed = [m for item in methods for m in (parse_specs(item) if isinstance(item, str) else [item])]
    if not parsed:
        raise InputError("no methods given")
    return tuple(parsed)


def check_settings(
    methods: str | Sequence[CompressionMethod | str], budgets: float | Sequence[float], mode: str, window: int,
    max_new_tokens: int,
) -> tuple[tuple[CompressionMethod, ...], tuple[float, ...]]:
    """The parsed methods and kept fractions, or UserError for the first setting that cannot run on any model
    (what can be checked without a tokenizer: the model server answers 422 with it before queuing a job)."""
    parsed = _methods(methods)
    if mode not in MODES:
        raise InputError(f"mode must be one of {', '.join(MODES)}, got {mode!r:.40}")
    if isinstance(window, bool) or not isinstance(window, int) or window < 1:
        raise InputError(f"window must be a whole number of tokens ≥ 1, got {window!r}")
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or not 1 <= max_new_tokens <= MAX_NEW_TOKENS:
        raise InputError(f"max_new_tokens must be a whole number in [1, {MAX_NEW_TOKENS}], got {max_new_tokens!r}")
    fractions = tuple(kept_fraction(b) for b in (budgets if isinstance(budgets, (list, tuple)) else [budgets]))
    if not fractions:
        raise BudgetError("no budget given")
    return parsed, fractions


def expected_layer_caps(loaded: LoadedModel, n_tokens: int) -> list[int]:
    """(L,) most tokens each layer's cache will hold after prefilling `n_tokens`, read from the model's layers
    before any forward pass (n, or the sliding window − 1 when smaller); equals `PromptAnalysis.layer_caps`."""
    caps = []
    for layer in decoder_layers(loaded.model):
        sliding = getattr(layer.self_attn, "sliding_window", None)
        caps.append(n_tokens if not sliding else min(n_tokens, int(sliding) - 1))
    return caps


class Runner:
    """Runs requests on one loaded model; see the module docstring. Forward passes take the model's lock."""

    def __init__(self, loaded: LoadedModel, progress: Progress | None = None, cache: RowCache | None = None):
        self.loaded = loaded
        self.progress = progress
        self.cache = cache if cache is not None else NoCache()

    def report(self, fraction: float, message: str) -> None:
        if self.progress is not None:
            self.progress(min(max(float(fraction), 0.0), 1.0), message)

    def analyze(self, prompt: str | torch.Tensor, window: int = 32, deep: bool = False) -> runtime.Prefill:
        """Prefill `prompt` (text, or token ids (1, n) already encoded) once recording its layer signals (with
        LMBO when `deep`), reporting each layer."""
        if isinstance(window, bool) or not isinstance(window, int) or window < 1:
            raise InputError(f"window must be a whole number of tokens ≥ 1, got {window!r}")
        input_ids = prompt if isinstance(prompt, torch.Tensor) else self.loaded.encode(prompt)
        layers = self.loaded.num_layers
        what = "attention, hidden states and LMBO" if deep else "attention and hidden states"
        self.report(0.0, f"prefill of {input_ids.shape[1]} tokens, recording {what}")
        prefill = runtime.prefill(self.loaded, input_ids, window, deep=deep,
                                  progress=lambda layer: self.report((layer + 1) / layers, f"layer {layer + 1} of {layers}"))
        self.report(1.0, "done")
        return prefill

    def request(
        self, prompt: str, methods: str | Sequence[CompressionMethod | str], budgets: float | Sequence[float] = 0.2,
        mode: str = "aware", question: str | None = None, window: int = 32, max_new_tokens: int = 32,
        answer: str | None = None, match_bytes: bool = False,
    ) -> Request:
        """Check everything that can be checked before the prefill (methods, mode, settings, prompt length,
        each budget against the window and the compressed tokens) and return the request; raises UserError.
        With `match_bytes` every method is brought to each budget as a share of full KV's bytes (`matched`)."""
        methods, fractions = check_settings(methods, budgets, mode, window, max_new_tokens)
        text, asked = prompt, None
        if mode == "context" or (question and question.strip()):
            _, asked, text = split_question(prompt, question)
        input_ids = self.loaded.encode(text)
        n = int(input_ids.shape[1])
        split = self.loaded.question_start(text, asked, input_ids) if mode == "context" else n
        if split < 1:
            raise InputError("context mode needs some context before the question")
        if any(m.stage == "tokens" and not m.lossless for m in methods):
            caps = expected_layer_caps(self.loaded, split)
            for fraction in fractions:
                check_feasible(len(caps), average_budget(fraction, split, caps), split, min(window, split), caps=caps)
        return Request(prompt, input_ids, split, asked, methods, fractions, mode, window, max_new_tokens,
                       answer if answer and answer.strip() else None, bool(match_bytes))

    def reference(self, request: Request, share: tuple[float, float] = (0.0, 1.0)) -> Reference:
        """The request's prompt prefilled once with its full-KV answer (from the cache when it was made before);
        progress spans `share` of the whole run."""
        start, width = share
        layers = self.loaded.num_layers

        def compute() -> Reference:
            self.report(start, f"prefill of {request.split} tokens and the full-KV answer")
            return prefill_reference(
                self.loaded, request.input_ids, request.split, request.question, request.mode, request.window,
                request.max_new_tokens, needs=request.needs,
                progress=lambda layer: self.report(start + width * (layer + 1) / layers,
                                                   f"prefill: layer {layer + 1} of {layers}"),
            )

        return self.cache.reference(request.reference_key(self.loaded.name), compute)

    def prepare_row(self, request: Request, reference: Reference, method: CompressionMethod, budget: float,
                    at: float = 0.0) -> tuple[CompressionContext, float]:
        """A method's context for one budget: warm-up first (calibration, reported at fraction `at`), then its
        layer budgets, computed once here (raising BudgetError when impossible) and timed, with the signal
        capture, as the row's analysis seconds."""

        def heard(fraction: float, message: str) -> None:
            self.report(at, f"{message} ({min(max(float(fraction), 0.0), 1.0):.0%}; once per model)")

        context = CompressionContext(reference.pre.analysis, budget, loaded=self.loaded, progress=heard)
        method.warm_up(context)
        started = time.perf_counter()
        method.budgets(context)
        return context, reference.pre.analysis_s + time.perf_counter() - started

    def row(self, request: Request, reference: Reference, method: CompressionMethod, budget: float,
            prepared: tuple[CompressionContext, float] | None = None) -> MethodResult:
        """One (method, budget) row against the reference: compression, decoding and metrics (from the cache
        when it was made before); `prepared` is what `prepare_row` returned, made here when absent."""

        def compute() -> MethodResult:
            context, analysis_s = prepared or self.prepare_row(request, reference, method, budget)
            return method_row(self.loaded, reference, method, context, analysis_s, request.answer)

        return self.cache.row(request.row_key(self.loaded.name, method.spec, budget), compute)

    def byte_share(self, request: Request, reference: Reference, method: CompressionMethod, budget: float) -> float:
        """Share of full KV's bytes that `method` holds at kept fraction `budget` on this prompt: a copy of the
        prefilled cache compressed, nothing decoded (BudgetError when the budget is impossible)."""
        context, _ = self.prepare_row(request, reference, method, budget)
        cache = kvcache.clone(reference.pre.cache)
        method.compress(cache, context)
        return kvcache.kv_bytes(cache) / reference.full_bytes

    def matched(self, request: Request, reference: Reference, method: CompressionMethod, target: float) -> Matched:
        """`method` brought to `target` of full KV's bytes on this prompt (see evaluation.matching)."""
        analysis = reference.pre.analysis
        low = smallest_kept_fraction(analysis.num_layers, analysis.n_tokens, analysis.window, analysis.layer_caps)
        return match_method(method, target, low, lambda m, b: self.byte_share(request, reference, m, b))

    def planned(self, request: Request, reference: Reference) -> list[tuple[CompressionMethod, float]]:
        """(method, kept fraction) of every row in order: as asked, or with `match_bytes` each method brought to
        each asked fraction of full KV's bytes (reported as it is solved)."""
        if not request.match_bytes:
            return [(method, budget) for budget in request.budgets for method in request.methods]
        pairs = []
        for budget in request.budgets:
            for method in request.methods:
                matched = self.matched(request, reference, method, budget)
                self.report(0.0, f"{method.spec} at {budget:.0%} of the bytes: {matched.method.spec} keeps "
                                 f"{matched.budget:g}{' (' + matched.note + ')' if matched.note else ''}")
                pairs.append((matched.method, matched.budget))
        return pairs

    def rows(self, request: Request, reference: Reference | None = None) -> Iterator[MethodResult]:
        """Every (budget, method) row of the request, each yielded as soon as it is ready; one prefill for all
        (`reference`, made here when not given). Every method's budgets are computed (and calibrations run)
        before the first row is decoded, so an impossible budget stops the request early."""
        count = len(request.methods) * len(request.budgets)
        step = 1.0 / (count + 1)
        reference = reference or self.reference(request, (0.0, step))
        pairs = self.planned(request, reference)
        prepared = [self.prepare_row(request, reference, method, budget, at=step) for method, budget in pairs]
        for done, ((method, budget), ready) in enumerate(zip(pairs, prepared), start=1):
            self.report(step * done, f"{method.spec} at {budget:g}: compress and decode")
            yield self.row(request, reference, method, budget, ready)
        self.report(1.0, "done")

    def compare(self, request: Request, on_row: Callable[[MethodResult], None] | None = None) -> Comparison:
        """All rows of a one-budget request as a Comparison; `on_row(row)` hears each row as it lands."""
        if len(request.budgets) != 1:
            raise InputError("a comparison holds one budget: ask for one, or iterate rows()")
        reference = self.reference(request, (0.0, 1.0 / (len(request.methods) + 1)))
        results = []
        for row in self.rows(request, reference):
            results.append(row)
            if on_row is not None:
                on_row(row)
        return assemble(reference, request.budgets[0], request.answer, results)


def compare(
    loaded: LoadedModel, prompt: str, methods: str | Sequence[CompressionMethod], budget: float = 0.2,
    max_new_tokens: int = 32, window: int = 32, answer: str | None = None, progress: Progress | None = None,
    mode: str = "aware", question: str | None = None,
) -> Comparison:
    """Full KV and each method on one prompt, through a Runner without a cache.

    Seconds per row: `prefill_s` is the forward pass (and, in context mode, feeding the question through that
    method's cache), `analysis_s` the signal capture and the method's budget rule (0 for full KV),
    `compress_s` eviction, `decode_s` greedy decoding.
    """
    runner = Runner(loaded, progress)
    return runner.compare(runner.request(prompt, methods, budget, mode, question, window, max_new_tokens, answer))
