"""Stage 2, capture layer-uncertainty signals during the prefill that fills the cache (METHOD §2).

Window attention softmax(q_win Kᵀ/√d + the layer's own causal / sliding mask) is computed per layer from
the last `w` RoPE'd queries and the layer's keys: O(w·n) memory, reduced at once and freed. Hidden-state
change is reduced on the fly by forward hooks on the decoder layers. No `output_attentions`, no eager
attention, no n × n matrix. The optional deep mode (LMBO) also measures, per layer, how small a SnapKV
budget keeps that layer's window output close to the full-cache output.
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from . import attention
from .budgets import SIGNALS
from .selection import keep_top, snapkv_scores

LMBO_GRID = (0.02, 0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)
LMBO_THRESHOLD = 0.99
MAX_BINS = 512


# Records a prefill keeps only for the methods that declare them (`CompressionMethod.prefill_needs`).
PREFILL_RECORDS = {
    "query_energy": "Σ over window queries of q_c² per channel and query head (ThinK)",
    "window_queries": "the window's queries per query head, RoPE applied (Expected Attention)",
    "reconstruction": "the most attention each prompt token gets while the model repeats the prompt (KVzip)",
}
RECONSTRUCTION_QUERY_CHUNK = 128  # queries scored at once while the prompt is repeated (bounds the memory)


class Cancelled(Exception):
    """Raised from a progress callback to stop a capture."""


@dataclass
class PromptAnalysis:
    """Signals of one prompt. L layers, H_q query heads, n prompt tokens, w window queries, G LMBO grid points.

    entropy, entropy_norm: (L, H_q) nats, and nats / log(#visible keys), mean over window queries.
    attention_rows: (L, H_q, n) mean attention of the window queries to each key (rows sum to 1).
    hidden_change: (L, n) 1 − cos(residual in, residual out) of each decoder layer, per token.
    kv_group: (H_q,) index of the KV head each query head reads.
    layer_caps: (L,) most tokens a layer's cache holds after prefill (n, or sliding window − 1 when smaller).
    query_channel_energy: (L, H_q, d) Σ over window queries of q_c² per channel (RoPE applied); recorded only
        when the prefill is asked for "query_energy" (ThinK declares it), else None.
    window_queries: (L, H_q, w, d) the last w queries, RoPE applied, at positions n − w … n − 1; recorded only
        when asked for "window_queries" (the expected-attention selector declares it), else None.
    reconstruction: (L, H_kv, n) the largest attention probability each prompt token receives from any query of
        the KV head's group while the model reads the prompt a second time after a "repeat it" instruction
        (KVzip's score); recorded only when asked for "reconstruction", else None.
    lmbo_cos: (L, G) deep mode only: cosine of the window output with only this layer compressed to
        each fraction of LMBO_GRID, against its full-cache output.
    """

    n_tokens: int
    window: int
    entropy: np.ndarray
    entropy_norm: np.ndarray
    attention_rows: np.ndarray
    hidden_change: np.ndarray
    kv_group: np.ndarray
    layer_caps: np.ndarray
    query_channel_energy: np.ndarray | None = None
    window_queries: np.ndarray | None = None
    reconstruction: np.ndarray | None = None
    lmbo_cos: np.ndarray | None = None

    @property
    def num_layers(self) -> int:
        return self.entropy.shape[0]

    @property
    def sliding_layers(self) -> np.ndarray:
        """(L,) True where the layer only sees a sliding window shorter than the prompt."""
        return self.layer_caps < self.n_tokens

    def lmba(self, tau: float = 0.9) -> np.ndarray:
        """(L, H_q) minimum attention budget as a fraction of n."""
        return min_budget_fraction(self.attention_rows, tau)

    def lmbo(self, threshold: float = LMBO_THRESHOLD) -> np.ndarray:
        """(L,) smallest grid fraction at which the layer's window output keeps cos ≥ threshold (deep mode)."""
        if self.lmbo_cos is None:
            raise ValueError("LMBO needs the deep capture (--deep, or 'Compute LMBO' in the app)")
        return min_output_budget(self.lmbo_cos, np.asarray(LMBO_GRID), threshold)

    def layer_signal(self, name: str, tau: float = 0.9, threshold: float = LMBO_THRESHOLD) -> np.ndarray:
        """(L,) per-layer uncertainty: 'lmba' and 'entropy' are means over query heads."""
        if name == "lmba":
            return self.lmba(tau).mean(axis=1)
        if name == "entropy":
            return self.entropy.mean(axis=1)
        if name == "hidden":
            return self.hidden_change.mean(axis=1)
        if name == "lmbo":
            return self.lmbo(threshold)
        raise ValueError(f"unknown signal '{name}': choose {', '.join(SIGNALS)}")

    def kv_scores(self, layer: int) -> np.ndarray:
        """(H_kv, n) SnapKV scores of one layer: attention mass each key gets from the window, summed over a KV group."""
        scores = np.zeros((int(self.kv_group.max()) + 1, self.n_tokens), dtype=np.float64)
        np.add.at(scores, self.kv_group, self.attention_rows[layer])
        return scores

    def token_importance(self) -> np.ndarray:
        """(L, n) attention mass each key receives from the window, summed over query heads."""
        return self.attention_rows.sum(axis=1)


def min_budget_fraction(rows: np.ndarray, tau: float) -> np.ndarray:
    """Smallest share of keys whose attention mass reaches tau of the row's total; rows (..., n) → (...)."""
    if not 0.0 < tau <= 1.0:
        raise ValueError(f"tau must lie in (0, 1], got {tau}")
    ordered = -np.sort(-rows, axis=-1)
    cumulative = np.cumsum(ordered, axis=-1)
    target = tau * cumulative[..., -1:]
    count = (cumulative < target * (1 - 1e-9)).sum(axis=-1) + 1
    return np.minimum(count, rows.shape[-1]) / rows.shape[-1]


def min_output_budget(cosines: np.ndarray, grid: np.ndarray, threshold: float) -> np.ndarray:
    """(L,) first grid fraction whose cosine (L, G) reaches `threshold`; 1.0 where none does."""
    reached = cosines >= threshold
    first = np.where(reached.any(axis=1), reached.argmax(axis=1), len(grid) - 1)
    return np.where(reached.any(axis=1), grid[first], 1.0)


def bin_edges(n_tokens: int, max_bins: int = MAX_BINS) -> np.ndarray:
    """Start index of each of ≤ max_bins contiguous token bins, plus n at the end: (bins + 1,)."""
    bins = min(n_tokens, max_bins)
    return np.linspace(0, n_tokens, bins + 1).round().astype(np.int64)


def bin_columns(matrix: np.ndarray, edges: np.ndarray, reduce: str = "sum") -> np.ndarray:
    """(rows, n) → (rows, bins): each bin the sum (or mean) of its tokens' values."""
    sums = np.add.reduceat(matrix, edges[:-1], axis=-1)
    if reduce == "mean":
        return sums / np.diff(edges)
    return sums


def bins_of(positions, edges: np.ndarray) -> list[int]:
    """Indices of the bins (from `bin_edges`) that hold the given token positions, ascending and unique."""
    return sorted({int(b) for b in np.searchsorted(edges, np.asarray(positions, dtype=np.int64), side="right") - 1})


def bin_texts(token_texts: list[str], edges: np.ndarray, limit: int = 80) -> list[str]:
    """The text of each bin (its tokens joined), cut to `limit` characters, for hover labels."""
    texts = []
    for start, stop in zip(edges[:-1], edges[1:]):
        text = "".join(token_texts[start:stop]).replace("\n", "⏎")
        texts.append(text if len(text) <= limit else text[: limit - 1] + "…")
    return texts


def _unseen(query_pos: torch.Tensor, key_pos: torch.Tensor, sliding_window: int | None) -> torch.Tensor:
    """True where a query at `query_pos` may not see a key at `key_pos` (future, or beyond its sliding window)."""
    hidden = key_pos > query_pos
    if sliding_window is not None:
        hidden |= (query_pos - key_pos) >= sliding_window
    return hidden


def window_attention(
    query: torch.Tensor, key: torch.Tensor, scaling: float, window: int, sliding_window: int | None = None
) -> torch.Tensor:
    """Softmax rows of the last `window` queries over the keys they may see: (H_q, w, n) float32.

    query (1, H_q, q, d) holds the last q ≤ n positions (all n during a prefill), key (1, H_kv, n, d); grouped
    heads share keys without repeating them.
    """
    _, num_q, q_len, dim = query.shape
    num_kv, n = key.shape[1], key.shape[2]
    group = num_q // num_kv
    w = min(window, q_len)
    q_win = query[0, :, q_len - w :, :].float().reshape(num_kv, group * w, dim)
    scores = torch.matmul(q_win, key[0].float().transpose(-1, -2)).mul_(scaling).view(num_q, w, n)
    query_pos = torch.arange(n - w, n, device=query.device)[:, None]
    key_pos = torch.arange(n, device=query.device)[None, :]
    scores.masked_fill_(_unseen(query_pos, key_pos, sliding_window), float("-inf"))
    return torch.softmax(scores, dim=-1)


def _window_output(module, query, key, value, scaling, window, keep: torch.Tensor | None, sliding_window) -> torch.Tensor:
    """The attention module's output (w, hidden) for the last `window` queries over all keys or only `keep` (H_kv, B)."""
    _, num_q, n, dim = query.shape
    num_kv = key.shape[1]
    group = num_q // num_kv
    w = min(window, n)
    positions = torch.arange(n, device=query.device).expand(num_kv, n) if keep is None else keep
    k = key[0].float().gather(1, positions[..., None].expand(-1, -1, dim)) if keep is not None else key[0].float()
    v = value[0].float().gather(1, positions[..., None].expand(-1, -1, value.shape[-1])) if keep is not None else value[0].float()
    q_win = query[0, :, n - w :, :].float().reshape(num_kv, group * w, dim)
    scores = torch.matmul(q_win, k.transpose(-1, -2)) * scaling  # (H_kv, g·w, B)
    query_pos = torch.arange(n - w, n, device=query.device).repeat(group)[None, :, None]
    hidden = _unseen(query_pos, positions[:, None, :], sliding_window)
    out = torch.matmul(torch.softmax(scores.masked_fill(hidden, float("-inf")), dim=-1), v)
    out = out.view(num_q, w, -1).transpose(0, 1).reshape(w, -1)
    return module.o_proj(out.to(module.o_proj.weight.dtype)).float()


class SignalRecorder:
    """Collects per-layer signals during one prefill; `analysis()` returns them as a PromptAnalysis.

    `progress(layer)` is called after each layer; raising `Cancelled` from it stops the prefill.
    `seconds` is the wall time spent computing signals inside the prefill (progress callbacks excluded).
    """

    def __init__(self, num_layers: int, window: int, deep: bool = False, progress: Callable[[int], None] | None = None,
                 needs: frozenset[str] = frozenset()):
        unknown = sorted(set(needs) - set(PREFILL_RECORDS))
        if unknown:
            raise ValueError(f"unknown prefill record {unknown[0]!r}: choose from {', '.join(PREFILL_RECORDS)}")
        self.window = window
        self.deep = deep
        self.needs = frozenset(needs)
        self.progress = progress
        self.num_layers = num_layers
        self.entropy: list[np.ndarray | None] = [None] * num_layers
        self.entropy_norm: list[np.ndarray | None] = [None] * num_layers
        self.rows: list[np.ndarray | None] = [None] * num_layers
        self.hidden: list[np.ndarray | None] = [None] * num_layers
        self.caps = np.zeros(num_layers, dtype=np.int64)
        self.query_energy: list[np.ndarray | None] = [None] * num_layers
        self.window_queries: list[np.ndarray | None] = [None] * num_layers
        self.lmbo_cos = np.zeros((num_layers, len(LMBO_GRID))) if deep else None
        self.kv_group: np.ndarray | None = None
        self.n_tokens = 0
        self.seconds = 0.0

    def on_attention(self, module, query, key, value, scaling, sliding_window) -> None:
        started = time.perf_counter()
        layer = module.layer_idx
        n = query.shape[2]
        probs = window_attention(query, key, scaling, self.window, sliding_window)  # (H_q, w, n)
        w = probs.shape[1]
        entropy = torch.special.entr(probs).sum(-1)  # (H_q, w)
        visible = torch.arange(n - w + 1, n + 1, device=probs.device, dtype=torch.float32)
        if sliding_window is not None:
            visible = visible.clamp(max=sliding_window)
        entropy_norm = torch.where(visible > 1, entropy / torch.log(visible).clamp_min(1e-12), torch.zeros_like(entropy))
        rows = probs.mean(1)
        self.entropy[layer] = entropy.mean(-1).cpu().numpy()
        self.entropy_norm[layer] = entropy_norm.mean(-1).cpu().numpy()
        self.rows[layer] = rows.cpu().numpy()
        if "query_energy" in self.needs:
            self.query_energy[layer] = query[0, :, n - w :, :].float().square().sum(1).cpu().numpy()
        if "window_queries" in self.needs:
            self.window_queries[layer] = query[0, :, n - w :, :].float().cpu().numpy()
        # A sliding layer's cache holds the last sliding_window − 1 tokens (the next token makes it sliding_window).
        self.caps[layer] = n if sliding_window is None else min(n, sliding_window - 1)
        group = query.shape[1] // key.shape[1]
        if self.kv_group is None:
            self.kv_group = np.arange(query.shape[1]) // group
        self.n_tokens = n
        if self.deep:
            self._lmbo(module, layer, query, key, value, scaling, sliding_window, rows, group)
        self.seconds += time.perf_counter() - started
        if self.progress is not None:
            self.progress(layer)

    def _lmbo(self, module, layer, query, key, value, scaling, sliding_window, rows, group) -> None:
        n = query.shape[2]
        w = min(self.window, n)
        kv_scores = snapkv_scores(rows.view(-1, group, n).sum(1))
        full = _window_output(module, query, key, value, scaling, w, None, sliding_window)
        for index, fraction in enumerate(LMBO_GRID):
            budget = max(int(math.ceil(fraction * n)), w)
            if budget >= n:
                self.lmbo_cos[layer, index] = 1.0
                continue
            keep = keep_top(kv_scores, budget, w)
            part = _window_output(module, query, key, value, scaling, w, keep, sliding_window)
            self.lmbo_cos[layer, index] = torch.nn.functional.cosine_similarity(full, part, dim=-1).mean().item()

    def on_layer(self, layer: int, hidden_in: torch.Tensor, hidden_out: torch.Tensor) -> None:
        started = time.perf_counter()
        cos = torch.nn.functional.cosine_similarity(hidden_in[0].float(), hidden_out[0].float(), dim=-1)
        self.hidden[layer] = (1.0 - cos).cpu().numpy()
        self.seconds += time.perf_counter() - started

    def analysis(self) -> PromptAnalysis:
        missing = [i for i, rows in enumerate(self.rows) if rows is None]
        if missing:
            raise RuntimeError(f"no attention was observed for layers {missing}")
        return PromptAnalysis(
            n_tokens=self.n_tokens,
            window=min(self.window, self.n_tokens),
            entropy=np.stack(self.entropy),
            entropy_norm=np.stack(self.entropy_norm),
            attention_rows=np.stack(self.rows),
            hidden_change=np.stack(self.hidden),
            kv_group=self.kv_group,
            layer_caps=self.caps.copy(),
            query_channel_energy=np.stack(self.query_energy) if "query_energy" in self.needs else None,
            window_queries=np.stack(self.window_queries) if "window_queries" in self.needs else None,
            lmbo_cos=self.lmbo_cos,
        )


class ReconstructionObserver:
    """Sees one prefill of [prompt (n tokens), repeat instruction, prompt again] and keeps, per layer, the largest
    attention probability each of the first n keys receives from the queries at positions ≥ `first_query`
    (the instruction and the repeated prompt), over the query heads of each KV head: (H_kv, n), as KVzip scores
    a KV pair. Queries are scored `RECONSTRUCTION_QUERY_CHUNK` at a time."""

    def __init__(self, num_layers: int, n_prompt: int, first_query: int):
        self.n_prompt = n_prompt
        self.first_query = first_query
        self.scores: list[np.ndarray | None] = [None] * num_layers

    def on_attention(self, module, query, key, value, scaling, sliding_window) -> None:
        heads_kv, total = key.shape[1], query.shape[2]
        best = torch.zeros(heads_kv, self.n_prompt, device=query.device)
        for start in range(self.first_query, total, RECONSTRUCTION_QUERY_CHUNK):
            stop = min(start + RECONSTRUCTION_QUERY_CHUNK, total)
            scores = attention.grouped_scores(attention.grouped_queries(query[:, :, start:stop], heads_kv),
                                              key[:, :, :stop], scaling)  # (1, H_kv, g·c, stop)
            probabilities = torch.softmax(attention.masked_scores(scores, stop - start, sliding_window), dim=-1)
            best = torch.maximum(best, probabilities[0, :, :, : self.n_prompt].amax(1))
        self.scores[module.layer_idx] = best.cpu().numpy()


def decoder_layers(model: torch.nn.Module) -> torch.nn.ModuleList:
    """The list of decoder blocks of a causal LM (the ModuleList whose items hold `self_attn`)."""
    for module in model.modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) and hasattr(module[0], "self_attn"):
            return module
    raise ValueError(f"cannot find decoder layers in {type(model).__name__}")


@contextlib.contextmanager
def recording(model: torch.nn.Module, window: int, deep: bool = False, progress: Callable[[int], None] | None = None,
              needs: frozenset[str] = frozenset()):
    """Within this block the next prefill of `model` is recorded (plus the extra `needs`, see PREFILL_RECORDS);
    yields the SignalRecorder."""
    layers = decoder_layers(model)
    recorder = SignalRecorder(len(layers), window, deep=deep, progress=progress, needs=needs)
    handles = []
    for index, layer in enumerate(layers):

        def hook(module, args, kwargs, output, index=index):
            hidden_in = args[0] if args else kwargs["hidden_states"]
            hidden_out = output[0] if isinstance(output, tuple) else output
            if hidden_in.shape[1] == recorder.n_tokens:
                recorder.on_layer(index, hidden_in, hidden_out)

        handles.append(layer.register_forward_hook(hook, with_kwargs=True))
    try:
        with attention.observing(recorder):
            yield recorder
    finally:
        for handle in handles:
            handle.remove()
