"""AdaKV: within each layer, KV heads get different budgets by pooling all heads' scores (with a safeguard).

Any selector's scores pool (`select=`): each head's finite scores are shifted to start at 0 when some are negative
(key-norm scores are −‖k‖), then divided by their sum so heads compare; +inf (expected attention's sink tokens)
stays a must-keep."""

import math

import numpy as np
import torch

from ..pipeline import cache as kvcache
from .base import CompressionReport, Parameter, TokenBudgetMethod, prompt_positions, register



@register
class AdaKV(TokenBudgetMethod):
    name = "adakv"
    summary = "layer budget split across KV heads by pooled SnapKV scores, each head keeping a safeguard share"
    paper = "Ada-KV (arXiv 2407.11550)"
    compresses = "tokens per KV head"
    leaves_dense = False
    parameters = {
        "alloc": TokenBudgetMethod.alloc_parameter,
        "alpha": Parameter(float, 0.2, "share of each layer's budget spread evenly over heads", low=0.0, high=1.0),
        "select": TokenBudgetMethod.select_parameter,
    }

    def layer_budgets(self, context):
        return self.allocated_budgets(context)

    def compress(self, cache, context):
        budgets = self.budgets(context)
        window = context.analysis.window
        spreads, kept = [], {}
        for layer, budget in enumerate(budgets):
            keys = kvcache.layer_keys(cache, layer)
            held = keys.shape[-2]
            if budget >= held:
                continue
            scores = self.scores(cache, layer, context)  # (H_kv, held)
            keep = head_split(scores, int(budget), min(window, int(budget)), self.params["alpha"])
            spreads.append(max(len(k) for k in keep) - min(len(k) for k in keep))
            entry = cache.layers[layer]
            cache.layers[layer] = kvcache.PerHeadLayer.from_dense(entry.keys, entry.values, keep)
            kept[layer] = prompt_positions(keep, held, context.analysis.n_tokens)
        notes = [f"largest head-length spread in a layer: {max(spreads)} tokens"] if spreads else []
        return CompressionReport(layer_budgets=np.asarray(budgets), notes=notes, kept=kept)


def head_split(scores: torch.Tensor, budget: int, window: int, alpha: float) -> list[torch.Tensor]:
    """Kept indices per KV head (ascending) for a layer budget of `budget` tokens per head on average.

    Each head keeps its last `window` tokens and its own top ⌊α·(budget − window)⌋; the remaining
    H·budget tokens in all are the best of the pooled, per-head-normalised scores of every head.
    """
    heads, n = scores.shape
    scores = scores.float()
    finite = torch.isfinite(scores)
    shift = torch.where(finite, scores, torch.inf).amin(dim=-1, keepdim=True).clamp(max=0.0)
    shifted = torch.where(finite, scores - shift, torch.zeros_like(scores))
    ranked = shifted / shifted.sum(dim=-1, keepdim=True).clamp_min(1e-12)
    ranked = torch.where(finite, ranked, scores)  # +inf stays a must-keep
    ranked[:, n - window :] = float("inf")
    order = torch.argsort(ranked, dim=-1, descending=True)
    guaranteed = window + math.floor(alpha * (budget - window))
    chosen = torch.zeros_like(ranked, dtype=torch.bool)
    chosen.scatter_(1, order[:, :guaranteed], True)
    remaining = heads * budget - heads * guaranteed
    if remaining > 0:
        pooled = ranked.masked_fill(chosen, float("-inf")).flatten()
        chosen.view(-1)[torch.topk(pooled, remaining).indices] = True
    return [torch.nonzero(row).flatten() for row in chosen]
