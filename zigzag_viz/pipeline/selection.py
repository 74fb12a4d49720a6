"""Choosing which tokens a layer keeps, given its budget (METHOD §4). Scores are per KV head.

Each selector maps one layer's inputs (`LayerInputs`) → scores (H_kv, n), higher = keep; `keep_top` then always
keeps the last `window` positions, takes the best of the rest and returns indices in their original order.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

SNAPKV_KERNEL = 7
EXPECTED_FUTURE = 512  # future positions the expected attention averages over (kvpress's default)
EXPECTED_SINKS = 4  # first tokens always kept by expected attention, as attention sinks
EXPECTED_EPSILON = 0.02  # added to expected attention before the value-norm weighting (kvpress's default)


@dataclass
class LayerInputs:
    """What a selector may read for one layer, whose cache holds the last `held` prompt tokens:
    window_scores (H_kv, held) window attention mass; keys, values (1, H_kv, held, d) as cached (RoPE applied);
    for question-agnostic scorers the window's queries (H_q, w, d, RoPE applied) at prompt positions (w,), the
    prompt length, `rotation(offsets) → (cos, sin)` each (len(offsets), d) for this layer's RoPE, and the
    attention scaling; for KVzip the reconstruction scores (H_kv, held) of the held tokens."""

    window_scores: torch.Tensor
    keys: torch.Tensor
    values: torch.Tensor | None = None
    queries: torch.Tensor | None = None
    query_positions: torch.Tensor | None = None
    n_tokens: int = 0
    rotation: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]] | None = None
    scaling: float = 1.0
    reconstruction: torch.Tensor | None = None


def keep_top(scores: torch.Tensor, budget: int, window: int) -> torch.Tensor:
    """Indices (H_kv, budget), ascending, of the `window` most recent tokens plus the top-scored others."""
    heads, n = scores.shape
    budget = int(min(budget, n))
    if budget >= n:
        return torch.arange(n, device=scores.device).expand(heads, n).clone()
    ranked = scores.clone().float()
    window = min(window, budget)
    if window > 0:
        ranked[:, n - window :] = float("inf")
    chosen = torch.topk(ranked, budget, dim=-1).indices
    return torch.sort(chosen, dim=-1).values


def snapkv_scores(window_scores: torch.Tensor, kernel: int = SNAPKV_KERNEL) -> torch.Tensor:
    """SnapKV: window attention mass per key (H_kv, n), smoothed by an average pool of width `kernel`."""
    pooled = torch.nn.functional.avg_pool1d(
        window_scores[None].float(), kernel_size=kernel, stride=1, padding=kernel // 2, count_include_pad=False
    )
    return pooled[0]


def knorm_scores(keys: torch.Tensor) -> torch.Tensor:
    """Key-norm: low L2 norm of a cached key (1, H_kv, n, d) means keep, so the score is −‖k‖ (H_kv, n)."""
    return -keys[0].float().norm(dim=-1)


def hybrid_scores(window_scores: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """Mean of the within-head ranks of SnapKV and key-norm scores (both in [0, 1]), so neither scale dominates."""
    def ranks(x):
        return torch.argsort(torch.argsort(x, dim=-1), dim=-1).float() / max(x.shape[-1] - 1, 1)

    return 0.5 * (ranks(snapkv_scores(window_scores)) + ranks(knorm_scores(keys)))


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def future_query_moments(queries: torch.Tensor, positions: torch.Tensor, n_tokens: int, rotation,
                         future: int = EXPECTED_FUTURE) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean (H_q, d) and covariance (H_q, d, d) of the window's queries (H_q, w, d, RoPE'd at `positions`) moved to
    each of the next `future` positions n … n + future − 1: RoPE composes, so a query at p seen at t is the
    query rotated by t − p."""
    offsets = (n_tokens + torch.arange(future, device=queries.device))[None, :] - positions.to(queries.device)[:, None]
    cos, sin = rotation(offsets.reshape(-1))  # (w·F, d)
    cos, sin = cos.view(*offsets.shape, -1).float(), sin.view(*offsets.shape, -1).float()
    q = queries.float()[:, :, None, :]  # (H_q, w, 1, d)
    moved = (q * cos + _rotate_half(q) * sin).flatten(1, 2)  # (H_q, w·F, d)
    mean = moved.mean(1)
    centred = moved - mean[:, None, :]
    covariance = centred.transpose(1, 2) @ centred / max(moved.shape[1] - 1, 1)
    return mean, covariance


def expected_scores(inputs: LayerInputs, future: int = EXPECTED_FUTURE, sinks: int = EXPECTED_SINKS,
                    epsilon: float = EXPECTED_EPSILON) -> torch.Tensor:
    """Expected Attention (kvpress): with future queries q ~ N(μ, Σ), E[exp(s·q·k)] = exp(s·μ·k + ½ s²·kᵀΣk), so
    each key's expected share of the attention is a softmax of that exponent over the held keys; it is weighted by
    the value norm (plus `epsilon`), averaged over the query heads of each KV head, and the first `sinks` prompt
    tokens are always kept. Question-agnostic: only the prompt's own last queries are read. (H_kv, held)."""
    keys = inputs.keys[0].float()  # (H_kv, held, d)
    heads_kv, held, _ = keys.shape
    mean, covariance = future_query_moments(inputs.queries, inputs.query_positions, inputs.n_tokens, inputs.rotation,
                                            future)
    group = mean.shape[0] // heads_kv
    grouped_keys = keys.repeat_interleave(group, dim=0)  # (H_q, held, d)
    linear = inputs.scaling * torch.einsum("hd,hnd->hn", mean, grouped_keys)
    quadratic = 0.5 * inputs.scaling**2 * torch.einsum("hnd,hde,hne->hn", grouped_keys, covariance, grouped_keys)
    expected = torch.softmax(linear + quadratic, dim=-1)  # (H_q, held)
    value_norm = inputs.values[0].float().norm(dim=-1).repeat_interleave(group, dim=0)
    scores = ((expected + epsilon) * value_norm).view(heads_kv, group, held).mean(1)
    first = inputs.n_tokens - held  # prompt position of the first held key
    if first < sinks:
        scores[:, : sinks - first] = float("inf")
    return scores


SELECTORS: dict[str, Callable[[LayerInputs], torch.Tensor]] = {
    "snapkv": lambda inputs: snapkv_scores(inputs.window_scores),
    "knorm": lambda inputs: knorm_scores(inputs.keys),
    "hybrid": lambda inputs: hybrid_scores(inputs.window_scores, inputs.keys),
    "expected": expected_scores,
    "kvzip": lambda inputs: inputs.reconstruction.float(),
}
# Prefill records a selector reads (`capture.PREFILL_RECORDS`).
SELECTOR_NEEDS: dict[str, frozenset[str]] = {"expected": frozenset({"window_queries"}),
                                             "kvzip": frozenset({"reconstruction"})}
