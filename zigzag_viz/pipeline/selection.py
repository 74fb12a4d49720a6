"""Choosing which tokens a layer keeps, given its budget (METHOD §4). Scores are per KV head.

Each selector maps (layer context) → scores (H_kv, n), higher = keep; `keep_top` then always keeps the
last `window` positions, takes the best of the rest and returns indices in their original order.
"""

from __future__ import annotations

from typing import Callable

import torch

SNAPKV_KERNEL = 7


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


SELECTORS: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "snapkv": lambda window_scores, keys: snapkv_scores(window_scores),
    "knorm": lambda window_scores, keys: knorm_scores(keys),
    "hybrid": hybrid_scores,
}
