"""Stage 5, generate and compare: one prefill shared by every method, greedy decoding, metrics against full KV."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, NamedTuple, Sequence

import numpy as np
import torch

from . import cache as kvcache
from . import runtime
from .budgets import average_budget
from .capture import PromptAnalysis
from .methods import CompressionContext, CompressionMethod, parse_specs
from .metrics import first_divergence, kl_per_step, kv_fraction, task_score, token_agreement, top1_per_step
from .models import LoadedModel

Progress = Callable[[float, str], None]


@dataclass
class MethodResult:
    """One method's answer and what its cache cost. `first_divergence` is a generated-token index or None."""

    method: str
    text: str
    token_ids: list[int]
    kv_bytes: int
    kv_fraction: float
    token_agreement: float
    first_divergence: int | None
    layer_budgets: list[int]
    task_score: float | None
    compress_s: float
    decode_s: float
    kl_curve: list[float]
    top1_curve: list[float]

    @property
    def kl_mean(self) -> float:
        return float(np.mean(self.kl_curve)) if self.kl_curve else 0.0

    @property
    def top1_agreement(self) -> float:
        return float(np.mean(self.top1_curve)) if self.top1_curve else 1.0

    def to_json(self) -> dict:
        return {
            "method": self.method,
            "text": self.text,
            "kv_bytes": self.kv_bytes,
            "kv_fraction": round(self.kv_fraction, 6),
            "token_agreement": round(self.token_agreement, 6),
            "first_divergence": self.first_divergence,
            "task_score": self.task_score,
            "layer_budgets": self.layer_budgets,
            "compress_s": round(self.compress_s, 4),
            "decode_s": round(self.decode_s, 4),
            "kl_mean": round(self.kl_mean, 6),
            "top1_agreement": round(self.top1_agreement, 6),
            "kl_curve": [round(v, 6) for v in self.kl_curve],
            "top1_curve": self.top1_curve,
        }


@dataclass
class Comparison:
    """Full KV and each requested method on one prompt."""

    model: str
    n_tokens: int
    budget: float
    window: int
    prefill_s: float
    full_bytes: int
    analysis: PromptAnalysis
    results: list[MethodResult] = field(default_factory=list)

    def table(self):
        """One row per method (pandas DataFrame) with the headline numbers."""
        import pandas as pd

        hidden = {"layer_budgets", "kl_curve", "top1_curve"}
        rows = [{k: v for k, v in r.to_json().items() if k not in hidden} for r in self.results]
        return pd.DataFrame(rows)


class CompressedRun(NamedTuple):
    """Greedy tokens from one compressed copy of a prefilled cache, the bytes it held and the seconds taken;
    with `reference` tokens given, also its next-token logits (T, V) teacher-forced along them."""

    tokens: list[int]
    kv_bytes: int
    layer_budgets: list[int]
    compress_s: float
    decode_s: float
    forced_logits: np.ndarray | None = None


def run_method(
    loaded: LoadedModel, pre: runtime.Prefill, method: CompressionMethod, context: CompressionContext,
    max_new_tokens: int, reference: list[int] | None = None,
) -> CompressedRun:
    """Compress a copy of the prefilled cache with `method`, then decode greedily from the prompt's next token."""
    cache = kvcache.clone(pre.cache)
    started = time.perf_counter()
    report = method.compress(cache, context)
    compress_s = time.perf_counter() - started
    held = kvcache.kv_bytes(cache)
    forced = teacher_forced_logits(loaded, kvcache.clone(cache), pre, reference) if reference else None
    started = time.perf_counter()
    tokens, _ = runtime.greedy_decode(loaded, cache, pre.next_logits, pre.n_tokens, max_new_tokens)
    decode_s = time.perf_counter() - started
    return CompressedRun(tokens, held, [int(b) for b in report.layer_budgets], compress_s, decode_s, forced)


def teacher_forced_logits(loaded: LoadedModel, cache, pre: runtime.Prefill, reference: list[int]) -> np.ndarray:
    """Next-token logits (T, V) at each step of `reference`, feeding its tokens through `cache` all at once."""
    first = pre.next_logits[None].float().cpu()
    if len(reference) == 1:
        return first.numpy()
    fed = torch.tensor([reference[:-1]], device=loaded.device)
    with loaded.lock:
        rest = runtime.forward_tokens(loaded, cache, fed, pre.n_tokens).float().cpu()
    return torch.cat([first, rest]).numpy()


def _report(progress: Progress | None, fraction: float, message: str) -> None:
    if progress is not None:
        progress(fraction, message)


def compare(
    loaded: LoadedModel,
    prompt: str,
    methods: str | Sequence[CompressionMethod],
    budget: float = 0.2,
    max_new_tokens: int = 32,
    window: int = 32,
    answer: str | None = None,
    progress: Progress | None = None,
) -> Comparison:
    """Run full KV once, then each method on a copy of the same prefilled cache; metrics are against full KV."""
    if isinstance(methods, str):
        methods = parse_specs(methods)
    if not 1 <= int(max_new_tokens) <= 4096:
        raise ValueError("max_new_tokens must lie in [1, 4096]")
    input_ids = loaded.encode(prompt)
    n = input_ids.shape[1]
    average_budget(budget, n)

    _report(progress, 0.0, f"prefill of {n} tokens")
    pre = runtime.prefill(loaded, input_ids, window)
    context = CompressionContext(pre.analysis, budget, loaded=loaded)
    for method in methods:  # fail on a bad budget before any decoding
        if hasattr(method, "layer_budgets"):
            method.layer_budgets(context)

    full_bytes = kvcache.kv_bytes(pre.cache)
    comparison = Comparison(loaded.name, n, budget, pre.analysis.window, pre.seconds, full_bytes, pre.analysis)
    steps = len(methods) + 1
    _report(progress, 1 / steps, "decoding with full KV")
    reference_cache = kvcache.clone(pre.cache)
    started = time.perf_counter()
    reference, reference_logits = runtime.greedy_decode(loaded, reference_cache, pre.next_logits, n, max_new_tokens)
    reference_logits = torch.stack(reference_logits).float().cpu().numpy()
    reference_s = time.perf_counter() - started
    del reference_cache

    for index, method in enumerate(methods):
        _report(progress, (index + 1) / steps, f"{method.spec}: compress and decode")
        if method.name == "full":
            run = CompressedRun(reference, full_bytes, kvcache.layer_lengths(pre.cache), 0.0, reference_s, reference_logits)
        else:
            run = run_method(loaded, pre, method, context, max_new_tokens, reference=reference)
        tokens, held, budgets, compress_s, decode_s, forced = run
        text = loaded.decode(tokens)
        comparison.results.append(
            MethodResult(
                method=method.spec,
                text=text,
                token_ids=tokens,
                kv_bytes=held,
                kv_fraction=kv_fraction(held, full_bytes),
                token_agreement=token_agreement(reference, tokens),
                first_divergence=first_divergence(reference, tokens),
                layer_budgets=[int(b) for b in budgets],
                task_score=task_score(text, answer),
                compress_s=compress_s,
                decode_s=decode_s,
                kl_curve=kl_per_step(reference_logits, forced).tolist(),
                top1_curve=top1_per_step(reference_logits, forced).tolist(),
            )
        )
    _report(progress, 1.0, "done")
    return comparison
