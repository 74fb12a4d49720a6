"""BaKlaVa: per-(layer, KV head) token budgets from a one-off profiling pass, then SnapKV selection per head.

BaKlaVa (arXiv 2502.13176) profiles, once per model, how much each KV head matters and gives each head a
share of the total budget accordingly; later prompts reuse the profile. Here the importance of a KV head is
the mean LMBA (METHOD §2, τ = 0.9: the share of keys that hold 90 % of the window's attention) of the query
heads that read it, averaged over generated calibration prompts: a head that spreads its attention needs
more tokens. (The paper derives importance from other attention-head statistics; LMBA keeps one signal
family across this project's methods.) The profile is stored as JSON per model and reused.

Budgets: total T = round(L·H_kv·B_avg) tokens with B_avg = budget·n, split as
    B_lh = floor·B_avg + (1 − floor)·B_avg·(L·H_kv)·u_lh,   u = importance / Σ importance,
clipped to [min(window, held_l), held_l] with the excess handed to the other heads (`fit_to_bounds` on the
flattened L·H_kv array) and rounded so the heads sum to T exactly. Each head then keeps its top tokens by the
chosen score (SnapKV by default), always with the window, in a `PerHeadLayer`: heads of different lengths,
nothing padded. A sliding-window layer becomes a PerHeadLayer too, which no longer slides: decoded tokens
are appended (for the short generations here that matters little; noted in the report).
"""

from __future__ import annotations

import time
from typing import ClassVar

import numpy as np

from ..pipeline import cache as kvcache
from ..pipeline import runtime
from ..pipeline.budgets import check_feasible, fit_to_bounds
from ..errors import InputError
from ..pipeline.models import LoadedModel
from ..pipeline.selection import keep_top
from .base import CompressionReport, Parameter, TokenBudgetMethod, prompt_positions, register
from .calibration import CalibratedMethod, CalibrationSet, Progress, context_model, model_fingerprint, report_progress

PROFILE_TAU = 0.9
PROFILE_WINDOW = 32


def head_budgets(importance: np.ndarray, avg_budget: float, held: np.ndarray, window: int, floor: float) -> np.ndarray:
    """(L, H_kv) integer tokens per head summing to round(L·H_kv·avg_budget); held (L,) tokens per layer."""
    importance = np.clip(np.asarray(importance, dtype=np.float64), 0.0, None)
    layers, heads = importance.shape
    held = np.asarray(held, dtype=np.int64)
    caps = np.repeat(held, heads)
    count = layers * heads
    total = check_feasible(count, avg_budget, int(held.max()), window, caps=caps)
    low = np.minimum(window, caps)
    share = importance.flatten() / importance.sum() if importance.sum() > 0 else np.full(count, 1.0 / count)
    raw = floor * avg_budget + (1 - floor) * avg_budget * count * share
    return fit_to_bounds(raw, share, low, caps, total).reshape(layers, heads)


@register
class BaKlaVa(CalibratedMethod, TokenBudgetMethod):
    name = "baklava"
    summary = "token budgets per KV head from a one-off profile of head importance (LMBA), SnapKV selection per head"
    paper = "BaKlaVa (arXiv 2502.13176)"
    compresses = "tokens per KV head (profiled)"
    calibration = "once per model: head importance (mean LMBA) profiled on generated prompts"
    leaves_dense = False
    parameters = {
        "floor": Parameter(float, 0.3, "share of the budget spread evenly over heads", low=0.0, high=1.0),
        "select": TokenBudgetMethod.select_parameter,
    }
    calibration_set: ClassVar[CalibrationSet] = CalibrationSet()

    def calibration_key(self, loaded: LoadedModel) -> str:
        return f"{model_fingerprint(loaded)}|lmba tau={PROFILE_TAU} w={PROFILE_WINDOW}|{self.calibration_set.key}"

    def compute_calibration(self, loaded: LoadedModel, progress: Progress | None) -> dict:
        """The head-importance profile: {"importance": (L, H_kv) mean LMBA per KV head, "prompts", "seconds"}."""
        started = time.perf_counter()
        texts = self.calibration_set.texts()
        total = None
        for index, text in enumerate(texts):
            report_progress(progress, index / len(texts), f"baklava: profiling prompt {index + 1}/{len(texts)}")
            analysis = runtime.prefill(loaded, loaded.encode(text), PROFILE_WINDOW).analysis
            lmba = analysis.lmba(PROFILE_TAU)  # (L, H_q)
            groups = analysis.kv_group
            per_kv = np.stack([lmba[:, groups == h].mean(axis=1) for h in range(int(groups.max()) + 1)], axis=1)
            total = per_kv if total is None else total + per_kv
        importance = total / len(texts)
        seconds = time.perf_counter() - started
        report_progress(progress, 1.0, f"baklava: profiled in {seconds:.1f} s")
        return {"importance": importance.round(6).tolist(), "prompts": len(texts), "seconds": round(seconds, 3)}

    def check_calibration(self, loaded: LoadedModel, result: dict) -> None:
        importance = np.asarray(result["importance"], dtype=np.float64)
        if importance.shape != (loaded.num_layers, loaded.num_kv_heads) or not np.isfinite(importance).all():
            raise ValueError(f"the importance is not {loaded.num_layers}×{loaded.num_kv_heads} finite numbers")

    def importance(self, context) -> np.ndarray:
        """(L, H_kv) head importance from the profile."""
        profile = self.calibrate(context_model(context, self.name), context.progress)
        importance = np.asarray(profile["importance"], dtype=np.float64)
        if importance.shape[0] != context.analysis.num_layers:
            raise InputError(f"baklava: the profile has {importance.shape[0]} layers, the prompt's model "
                             f"{context.analysis.num_layers}")
        return importance

    def head_budgets(self, context, held=None) -> np.ndarray:
        """(L, H_kv) tokens kept per KV head for this prompt."""
        a = context.analysis
        held = a.layer_caps if held is None else held
        return head_budgets(self.importance(context), context.avg_budget, np.asarray(held), a.window,
                            self.params["floor"])

    def layer_budgets(self, context) -> np.ndarray:
        """(L,) mean tokens per KV head in each layer, rounded (heads differ: see `head_budgets`)."""
        return np.rint(self.head_budgets(context).mean(axis=1)).astype(np.int64)

    def compress(self, cache, context) -> CompressionReport:
        num_layers = kvcache.layer_count(cache)
        for layer in range(num_layers):
            if not kvcache.is_dense(cache, layer):
                raise InputError("baklava evicts from dense layers: it cannot follow a method that changed their storage")
        held = np.asarray(kvcache.layer_lengths(cache))
        budgets = self.head_budgets(context, held)
        window = context.analysis.window
        kept = {}
        for layer in range(num_layers):
            entry = cache.layers[layer]
            scores = self.scores(cache, layer, context)  # (H_kv, held)
            keep = [keep_top(scores[h : h + 1], int(b), window)[0] for h, b in enumerate(budgets[layer])]
            cache.layers[layer] = kvcache.PerHeadLayer.from_dense(entry.keys, entry.values, keep)
            kept[layer] = prompt_positions(keep, int(held[layer]), context.analysis.n_tokens)
        per_layer = np.rint(budgets.mean(axis=1)).astype(np.int64)
        spread = budgets.max(axis=1) - budgets.min(axis=1)
        notes = [
            f"baklava: {int(budgets.sum())} tokens over {budgets.size} KV heads, {int(budgets.min())}–{int(budgets.max())} "
            f"per head; largest spread within a layer {int(spread.max())} tokens (layer {int(spread.argmax())})"
        ]
        if context.analysis.sliding_layers.any():
            notes.append("baklava: sliding-window layers become per-head layers that no longer slide during decoding")
        notes += self.calibration_notes(context_model(context, self.name))
        return CompressionReport(layer_budgets=per_layer, notes=notes, kept=kept)
