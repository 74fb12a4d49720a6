"""Stage 5, generate and compare: one prefill shared by every method, greedy decoding, metrics against full KV.

Two settings (METHOD §6): `aware` compresses after the whole prompt, question included (SnapKV's setting);
`context` compresses the context alone and then feeds the question through the compressed cache (kvpress's).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, NamedTuple, Sequence

import numpy as np
import torch

from ..pipeline import cache as kvcache
from ..pipeline import runtime
from ..pipeline.budgets import average_budget
from ..pipeline.capture import MAX_BINS, PREFILL_RECORDS, PromptAnalysis, bin_columns, bin_edges, bin_texts
from ..methods import CompressionContext, CompressionMethod, parse_specs
from .metrics import (
    answer_token_positions, first_divergence, kept_token_map, kl_per_step, kv_fraction, rouge_l, task_score,
    token_agreement, top1_per_step,
)
from ..errors import InputError
from ..pipeline.models import LoadedModel
from .prompts import split_question

Progress = Callable[[float, str], None]
MODES = ("aware", "context")


@dataclass
class MethodResult:
    """One method's answer, what its cache cost and what it kept.

    `first_divergence` is a generated-token index or None; seconds are wall time; `kept_map` (L, n_context)
    is the share of each layer's KV heads that kept each compressed prompt token.
    """

    method: str
    mode: str
    text: str
    token_ids: list[int]
    kv_bytes: int
    kv_fraction: float
    token_agreement: float
    first_divergence: int | None
    rouge_l: float
    layer_budgets: list[int]
    task_score: float | None
    prefill_s: float
    analysis_s: float
    compress_s: float
    decode_s: float
    kl_curve: list[float]
    top1_curve: list[float]
    kept_map: np.ndarray = field(repr=False, default_factory=lambda: np.zeros((0, 0)))

    @property
    def kl_mean(self) -> float:
        return float(np.mean(self.kl_curve)) if self.kl_curve else 0.0

    @property
    def top1_agreement(self) -> float:
        return float(np.mean(self.top1_curve)) if self.top1_curve else 1.0

    @property
    def ms_per_token(self) -> float:
        """Decoding wall time per generated token, in milliseconds."""
        return 1000.0 * self.decode_s / max(len(self.token_ids), 1)

    def to_json(self) -> dict:
        return {
            "method": self.method,
            "mode": self.mode,
            "text": self.text,
            "token_ids": self.token_ids,
            "kv_bytes": self.kv_bytes,
            "kv_fraction": round(self.kv_fraction, 6),
            "token_agreement": round(self.token_agreement, 6),
            "first_divergence": self.first_divergence,
            "rouge_l": round(self.rouge_l, 6),
            "task_score": self.task_score,
            "kl_mean": round(self.kl_mean, 6),
            "top1_agreement": round(self.top1_agreement, 6),
            "layer_budgets": self.layer_budgets,
            "prefill_s": round(self.prefill_s, 4),
            "analysis_s": round(self.analysis_s, 4),
            "compress_s": round(self.compress_s, 4),
            "decode_s": round(self.decode_s, 4),
            "ms_per_token": round(self.ms_per_token, 3),
            "kl_curve": [round(v, 6) for v in self.kl_curve],
            "top1_curve": self.top1_curve,
        }


@dataclass
class Comparison:
    """Full KV and each requested method on one prompt. `n_tokens` counts the whole prompt, `n_context` the
    tokens that were compressed (all of them in aware mode, those before the question in context mode)."""

    model: str
    mode: str
    n_tokens: int
    n_context: int
    question: str | None
    budget: float
    window: int
    full_bytes: int
    analysis: PromptAnalysis
    prompt_tokens: list[str]
    answer: str | None = None
    results: list[MethodResult] = field(default_factory=list)

    @property
    def answer_positions(self) -> list[int]:
        """Compressed prompt tokens that spell the known answer."""
        return [p for p in answer_token_positions(self.prompt_tokens, self.answer) if p < self.n_context]

    def table(self):
        """One row per method (pandas DataFrame) with the headline numbers."""
        import pandas as pd

        hidden = {"layer_budgets", "kl_curve", "top1_curve", "token_ids"}
        rows = [{k: v for k, v in r.to_json().items() if k not in hidden} for r in self.results]
        return pd.DataFrame(rows)

    def binned_kept_maps(self, max_bins: int = MAX_BINS) -> tuple[np.ndarray, list[str], dict[str, np.ndarray]]:
        """Bin edges (bins + 1,), bin texts (bins,) and each method's kept-token map averaged per bin (L, bins)."""
        edges = bin_edges(self.n_context, max_bins)
        texts = bin_texts(self.prompt_tokens[: self.n_context], edges)
        return edges, texts, {r.method: bin_columns(r.kept_map, edges, "mean") for r in self.results}

    def to_json(self, max_bins: int = MAX_BINS) -> dict:
        """Everything about this comparison: settings, every row, and each method's kept-token map binned to
        at most `max_bins` columns (bin edges and texts included)."""
        edges, texts, maps = self.binned_kept_maps(max_bins)
        return {
            "model": self.model,
            "mode": self.mode,
            "n_tokens": self.n_tokens,
            "n_context": self.n_context,
            "question": self.question,
            "answer": self.answer,
            "budget": self.budget,
            "window": self.window,
            "full_bytes": self.full_bytes,
            "answer_positions": self.answer_positions,
            "kept_map": {
                "bin_edges": edges.tolist(),
                "bin_texts": texts,
                "methods": {method: np.round(binned, 4).tolist() for method, binned in maps.items()},
            },
            "results": [r.to_json() for r in self.results],
        }


class CompressedRun(NamedTuple):
    """Greedy tokens from one compressed copy of a prefilled cache, the bytes it held, what it kept and the
    seconds taken; with `reference` tokens given, also its next-token logits (T, V) teacher-forced along them."""

    tokens: list[int]
    kv_bytes: int
    layer_budgets: list[int]
    kept: dict
    compress_s: float
    question_s: float
    decode_s: float
    forced_logits: np.ndarray | None = None


def feed_question(loaded: LoadedModel, cache, pre: runtime.Prefill, question_ids: torch.Tensor | None):
    """Next-token logits (V,), the next position and the seconds taken, after feeding `question_ids` (1, k)
    through `cache` (context mode); the prefill's own logits when there is no question to feed."""
    if question_ids is None or question_ids.shape[1] == 0:
        return pre.next_logits, pre.n_tokens, 0.0
    started = time.perf_counter()
    with loaded.lock:
        logits = runtime.forward_tokens(loaded, cache, question_ids, pre.n_tokens, last_only=True)[-1]
    return logits, pre.n_tokens + question_ids.shape[1], time.perf_counter() - started


def run_method(
    loaded: LoadedModel, pre: runtime.Prefill, method: CompressionMethod, context: CompressionContext,
    max_new_tokens: int, reference: list[int] | None = None, question_ids: torch.Tensor | None = None,
) -> CompressedRun:
    """Compress a copy of the prefilled cache with `method`, feed the question if any, then decode greedily."""
    cache = kvcache.clone(pre.cache)
    started = time.perf_counter()
    report = method.compress(cache, context)
    compress_s = time.perf_counter() - started
    held = kvcache.kv_bytes(cache)
    next_logits, position, question_s = feed_question(loaded, cache, pre, question_ids)
    forced = None
    if reference:
        forced = teacher_forced_logits(loaded, kvcache.clone(cache), next_logits, position, reference)
    started = time.perf_counter()
    tokens, _ = runtime.greedy_decode(loaded, cache, next_logits, position, max_new_tokens)
    decode_s = time.perf_counter() - started
    budgets = [int(b) for b in report.layer_budgets]
    return CompressedRun(tokens, held, budgets, report.kept, compress_s, question_s, decode_s, forced)


def teacher_forced_logits(
    loaded: LoadedModel, cache, first_logits: torch.Tensor, start: int, reference: list[int]
) -> np.ndarray:
    """Next-token logits (T, V) at each step of `reference`, feeding its tokens through `cache` from `start` at once."""
    first = first_logits[None].float().cpu()
    if len(reference) == 1:
        return first.numpy()
    fed = torch.tensor([reference[:-1]], device=loaded.device)
    with loaded.lock:
        rest = runtime.forward_tokens(loaded, cache, fed, start).float().cpu()
    return torch.cat([first, rest]).numpy()


def _report(progress: Progress | None, fraction: float, message: str) -> None:
    if progress is not None:
        progress(fraction, message)


def _timed_budgets(method: CompressionMethod, context: CompressionContext) -> float:
    """Seconds the method's budget rule takes (0 for methods without one); raises on an impossible budget."""
    if not hasattr(method, "layer_budgets"):
        return 0.0
    started = time.perf_counter()
    method.layer_budgets(context)
    return time.perf_counter() - started


@dataclass
class Reference:
    """A prompt prefilled once and answered greedily with full KV: what every method is measured against.

    `pre` holds the compressed part of the prompt (all of it in aware mode, the context in context mode) with
    its full cache, which is only ever cloned; `logits` (T, V) are full KV's next-token logits per step.
    """

    model: str
    mode: str
    max_new_tokens: int
    question: str | None
    question_ids: torch.Tensor | None
    n_tokens: int
    prompt_tokens: list[str]
    pre: runtime.Prefill
    full_bytes: int
    full_lengths: list[int]
    tokens: list[int]
    logits: np.ndarray
    text: str
    question_s: float
    decode_s: float

    @property
    def n_context(self) -> int:
        return self.pre.n_tokens


def prepare(
    loaded: LoadedModel, prompt: str, max_new_tokens: int = 32, window: int = 32, mode: str = "aware",
    question: str | None = None,
) -> Reference:
    """Prefill the prompt once (recording signals) and decode the full-KV answer.

    With `question` given the model reads the prompt, a blank line and the question; in context mode without
    one, the question is the prompt's last paragraph, and only the tokens before it are prefilled here.
    """
    if mode not in MODES:
        raise InputError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
    if not 1 <= int(max_new_tokens) <= 4096:
        raise InputError("max_new_tokens must lie in [1, 4096]")
    text, asked = prompt, None
    if mode == "context" or (question and question.strip()):
        _, asked, text = split_question(prompt, question)
    input_ids = loaded.encode(text)
    n = input_ids.shape[1]
    split = loaded.question_start(text, asked, input_ids) if mode == "context" else n
    if split < 1:
        raise InputError("context mode needs some context before the question")
    question_ids = input_ids[:, split:] if mode == "context" else None
    pre = runtime.prefill(loaded, input_ids[:, :split], window, needs=frozenset(PREFILL_RECORDS))
    cache = kvcache.clone(pre.cache)
    next_logits, position, question_s = feed_question(loaded, cache, pre, question_ids)
    started = time.perf_counter()
    tokens, logits = runtime.greedy_decode(loaded, cache, next_logits, position, int(max_new_tokens))
    decode_s = time.perf_counter() - started
    return Reference(
        loaded.name, mode, int(max_new_tokens), asked, question_ids, n, loaded.token_texts(input_ids[0].tolist()),
        pre, kvcache.kv_bytes(pre.cache), kvcache.layer_lengths(pre.cache), tokens,
        torch.stack(logits).float().cpu().numpy(), loaded.decode(tokens), question_s, decode_s,
    )


def evaluate(
    loaded: LoadedModel, reference: Reference, method: CompressionMethod, budget: float, answer: str | None = None,
    progress: Progress | None = None,
) -> MethodResult:
    """One method on a copy of the reference's prefilled cache, measured against its full-KV answer.
    `progress(fraction, message)` hears from methods that calibrate on the model first."""
    pre = reference.pre
    forward_s = pre.seconds - pre.analysis_s
    if method.name == "full":
        run = CompressedRun(reference.tokens, reference.full_bytes, reference.full_lengths, {}, 0.0,
                            reference.question_s, reference.decode_s, reference.logits)
        analysis_s = 0.0
    else:
        average_budget(budget, reference.n_context)
        context = CompressionContext(pre.analysis, budget, loaded=loaded, progress=progress)
        analysis_s = pre.analysis_s + _timed_budgets(method, context)
        run = run_method(loaded, pre, method, context, reference.max_new_tokens, reference=reference.tokens,
                         question_ids=reference.question_ids)
    text = loaded.decode(run.tokens)
    return MethodResult(
        method=method.spec,
        mode=reference.mode,
        text=text,
        token_ids=run.tokens,
        kv_bytes=run.kv_bytes,
        kv_fraction=kv_fraction(run.kv_bytes, reference.full_bytes),
        token_agreement=token_agreement(reference.tokens, run.tokens),
        first_divergence=first_divergence(reference.tokens, run.tokens),
        rouge_l=rouge_l(reference.text, text),
        layer_budgets=[int(b) for b in run.layer_budgets],
        task_score=task_score(text, answer),
        prefill_s=forward_s + run.question_s,
        analysis_s=analysis_s,
        compress_s=run.compress_s,
        decode_s=run.decode_s,
        kl_curve=kl_per_step(reference.logits, run.forced_logits).tolist(),
        top1_curve=top1_per_step(reference.logits, run.forced_logits).tolist(),
        kept_map=kept_token_map(run.kept, reference.full_lengths, reference.n_context,
                                loaded.num_kv_heads).astype(np.float32),
    )


def assemble(reference: Reference, budget: float, answer: str | None, results: list[MethodResult]) -> Comparison:
    """A Comparison of the reference's prompt from rows computed by `evaluate`."""
    pre = reference.pre
    return Comparison(
        reference.model, reference.mode, reference.n_tokens, reference.n_context, reference.question, budget,
        pre.analysis.window, reference.full_bytes, pre.analysis, reference.prompt_tokens, answer=answer,
        results=list(results),
    )


def check_budget(
    loaded: LoadedModel, reference: Reference, methods: Sequence[CompressionMethod], budget: float
) -> None:
    """Raise a BudgetError before any compressed decoding when `budget` is impossible for the prompt or a method."""
    average_budget(budget, reference.n_context)
    context = CompressionContext(reference.pre.analysis, budget, loaded=loaded)
    for method in methods:
        if hasattr(method, "layer_budgets"):
            method.layer_budgets(context)


def compare(
    loaded: LoadedModel,
    prompt: str,
    methods: str | Sequence[CompressionMethod],
    budget: float = 0.2,
    max_new_tokens: int = 32,
    window: int = 32,
    answer: str | None = None,
    progress: Progress | None = None,
    mode: str = "aware",
    question: str | None = None,
) -> Comparison:
    """Full KV once (`prepare`), then each method on a copy of the same prefilled cache (`evaluate`).

    Seconds per row: `prefill_s` is the forward pass (and, in context mode, feeding the question through that
    method's cache), `analysis_s` the signal capture and the method's budget rule (0 for full KV),
    `compress_s` eviction, `decode_s` greedy decoding.
    """
    if isinstance(methods, str):
        methods = parse_specs(methods)
    _report(progress, 0.0, "prefill and the full-KV answer")
    reference = prepare(loaded, prompt, max_new_tokens, window, mode, question)
    check_budget(loaded, reference, methods, budget)
    results = []
    for index, method in enumerate(methods):
        _report(progress, (index + 1) / (len(methods) + 1), f"{method.spec}: compress and decode")
        results.append(evaluate(loaded, reference, method, budget, answer))
    _report(progress, 1.0, "done")
    return assemble(reference, budget, answer, results)
