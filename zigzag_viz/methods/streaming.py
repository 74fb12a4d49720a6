"""StreamingLLM: a few attention-sink tokens at the start plus the most recent tokens."""

import torch

from ..pipeline.budgets import uniform_budgets
from .base import Parameter, TokenBudgetMethod, register


@register
class Streaming(TokenBudgetMethod):
    name = "streaming"
    summary = "the first `sinks` tokens (attention sinks) plus the most recent ones, same budget per layer"
    paper = "StreamingLLM (arXiv 2309.17453)"
    parameters = {"sinks": Parameter(int, 4, "attention-sink tokens kept at the start", low=0, high=64)}

    def layer_budgets(self, context):
        a = context.analysis
        return uniform_budgets(a.num_layers, context.avg_budget, a.n_tokens, a.window, caps=a.layer_caps)

    def scores(self, cache, layer, context):
        """Recency (later is better), with the first `sinks` tokens of the prompt ranked above all."""
        keys = cache.layers[layer].keys
        held, n = keys.shape[-2], context.analysis.n_tokens
        positions = torch.arange(n - held, n, device=keys.device, dtype=torch.float32)
        scores = positions.clone()
        scores[positions < self.params["sinks"]] = float(n + 1)
        return scores.expand(keys.shape[1], held)
