"""Stage 5, generate and compare: the full-KV reference of a prompt (one prefill, its greedy answer), one
method's row on a copy of that prefilled cache, and the records they make. The runner (`runner.py`) drives them.

Two settings (METHOD §6): `aware` compresses after the whole prompt, question included (SnapKV's setting);
`context` compresses the context alone and then feeds the question through the compressed cache (kvpress's).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np
import torch

from ..pipeline import cache as kvcache
from ..pipeline import runtime
from ..pipeline.capture import MAX_BINS, PromptAnalysis, bin_columns, bin_edges, bin_texts
from ..methods import CompressionContext, CompressionMethod
from .metrics import (
    answer_token_positions, first_divergence, kept_token_map, kl_per_step, kv_fraction, rouge_l, task_score,
    token_agreement, top1_per_step,
)
from ..pipeline.models import LoadedModel

MODES = ("aware", "context")


NOISE_FLOOR = 1e-6  # divergences below this are float rounding, shown as 0


@dataclass
class MethodResult:
    """One method's answer, what its cache cost and what it kept.

    `first_divergence` is a generated-token index or None; seconds are wall time; `kept_map` (L, n_context)
    is the share of each layer's KV heads that kept each compressed prompt token; `peak_gpu_bytes` the most GPU
    memory allocated while the row ran (compression, question, decoding; None off the GPU).
    """

    method: str
    mode: str
    budget: float
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
    peak_gpu_bytes: int | None = None

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
            "budget": self.budget,
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
            "peak_gpu_bytes": self.peak_gpu_bytes,
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

    def verdict(self, equal_memory: float = 0.02) -> str:
        """One or two sentences for the top of a page: which methods kept the answer (the known answer in their
        text, else the full-KV text token for token), the one closest to full KV by mean KL among those holding
        the asked share of the bytes (± `equal_memory`), and the methods that hold another share."""
        rows = [r for r in self.results if r.method != "full"]
        if not rows:
            return "Only full KV ran: add a method to compare."
        by_answer = self.answer is not None and all(r.task_score is not None for r in rows)
        kept = [r for r in rows if (r.task_score == 1.0 if by_answer else r.first_divergence is None)]
        what = f"the answer “{self.answer}”" if by_answer else "full KV's answer token for token"
        if not kept:
            first = f"No method kept {what} at {self.budget:.0%} kept."
        elif len(kept) == len(rows):
            first = f"Every method kept {what} at {self.budget:.0%} kept."
        else:
            lost = [r.method for r in rows if r not in kept]
            first = (f"At {self.budget:.0%} kept, {', '.join(r.method for r in kept)} kept {what}; "
                     f"{', '.join(lost)} lost it.")
        equal = [r for r in rows if abs(r.kv_fraction - self.budget) <= equal_memory]
        other = [r for r in rows if r not in equal]
        parts = [first]
        if equal:
            best = min(equal, key=lambda r: r.kl_mean)
            kl = f"{best.kl_mean:.3g}" if best.kl_mean >= NOISE_FLOOR else "0"
            parts.append(f"Closest to full KV at {self.budget:.0%} of its bytes: {best.method} (mean KL {kl} nats).")
        if other:
            parts.append("At other memory, so not comparable head to head: "
                         + ", ".join(f"{r.method} holds {r.kv_fraction:.0%} of the bytes" for r in other) + ".")
        return " ".join(parts)

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
    peak_gpu_bytes: int | None = None


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
    runtime.reset_peak_memory(loaded.device)
    cache = kvcache.clone(pre.cache)
    started = time.perf_counter()
    report = method.compress(cache, context)
    compress_s = time.perf_counter() - started
    held = kvcache.kv_bytes(cache)
    next_logits, position, question_s = feed_question(loaded, cache, pre, question_ids)
    forced = None
    if reference:
        forced = runtime.teacher_forced_logits(loaded, kvcache.clone(cache), next_logits, position, reference)
    started = time.perf_counter()
    tokens, _ = runtime.greedy_decode(loaded, cache, next_logits, position, max_new_tokens)
    decode_s = time.perf_counter() - started
    budgets = [int(b) for b in report.layer_budgets]
    return CompressedRun(tokens, held, budgets, report.kept, compress_s, question_s, decode_s, forced,
                         runtime.peak_memory(loaded.device))


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
    peak_gpu_bytes: int | None = None

    @property
    def n_context(self) -> int:
        return self.pre.n_tokens

    @property
    def run(self) -> CompressedRun:
        """Full KV's own run: what a lossless method's row is made of."""
        return CompressedRun(self.tokens, self.full_bytes, self.full_lengths, {}, 0.0, self.question_s,
                             self.decode_s, self.logits, self.peak_gpu_bytes)


def prefill_reference(
    loaded: LoadedModel, input_ids: torch.Tensor, split: int, question: str | None, mode: str, window: int,
    max_new_tokens: int, needs: frozenset[str] = frozenset(), progress=None,
) -> Reference:
    """Prefill `input_ids[:, :split]` once (recording signals and the `needs` methods declared), feed the rest
    (the question, in context mode) and decode the full-KV answer; `progress(layer)` hears from the prefill."""
    question_ids = input_ids[:, split:] if split < input_ids.shape[1] else None
    runtime.reset_peak_memory(loaded.device)
    pre = runtime.prefill(loaded, input_ids[:, :split], window, progress=progress, needs=needs)
    cache = kvcache.clone(pre.cache)
    next_logits, position, question_s = feed_question(loaded, cache, pre, question_ids)
    started = time.perf_counter()
    tokens, logits = runtime.greedy_decode(loaded, cache, next_logits, position, int(max_new_tokens))
    decode_s = time.perf_counter() - started
    return Reference(
        loaded.name, mode, int(max_new_tokens), question, question_ids, int(input_ids.shape[1]),
        loaded.token_texts(input_ids[0].tolist()), pre, kvcache.kv_bytes(pre.cache), kvcache.layer_lengths(pre.cache),
        tokens, torch.stack(logits).float().cpu().numpy(), loaded.decode(tokens), question_s, decode_s,
        runtime.peak_memory(loaded.device),
    )


def method_row(
    loaded: LoadedModel, reference: Reference, method: CompressionMethod, context: CompressionContext,
    analysis_s: float, answer: str | None = None,
) -> MethodResult:
    """One method on a copy of the reference's prefilled cache (its layer budgets already computed in `context`),
    measured against the full-KV answer; a lossless method's row is the reference's own run."""
    if method.lossless:
        run = reference.run
    else:
        run = run_method(loaded, reference.pre, method, context, reference.max_new_tokens,
                         reference=reference.tokens, question_ids=reference.question_ids)
    text = loaded.decode(run.tokens)
    return MethodResult(
        method=method.spec,
        mode=reference.mode,
        budget=float(context.budget),
        text=text,
        token_ids=run.tokens,
        kv_bytes=run.kv_bytes,
        kv_fraction=kv_fraction(run.kv_bytes, reference.full_bytes),
        token_agreement=token_agreement(reference.tokens, run.tokens),
        first_divergence=first_divergence(reference.tokens, run.tokens),
        rouge_l=rouge_l(reference.text, text),
        layer_budgets=[int(b) for b in run.layer_budgets],
        task_score=task_score(text, answer),
        prefill_s=reference.pre.seconds - reference.pre.analysis_s + run.question_s,
        analysis_s=0.0 if method.lossless else analysis_s,
        compress_s=run.compress_s,
        decode_s=run.decode_s,
        kl_curve=kl_per_step(reference.logits, run.forced_logits).tolist(),
        top1_curve=top1_per_step(reference.logits, run.forced_logits).tolist(),
        kept_map=kept_token_map(run.kept, reference.full_lengths, reference.n_context,
                                loaded.num_kv_heads).astype(np.float32),
        peak_gpu_bytes=run.peak_gpu_bytes,
    )


def assemble(reference: Reference, budget: float, answer: str | None, results: list[MethodResult]) -> Comparison:
    """A Comparison of the reference's prompt from its rows."""
    pre = reference.pre
    return Comparison(
        reference.model, reference.mode, reference.n_tokens, reference.n_context, reference.question, budget,
        pre.analysis.window, reference.full_bytes, pre.analysis, reference.prompt_tokens, answer=answer,
        results=list(results),
    )
