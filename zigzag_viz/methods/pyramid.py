"""PyramidKV: budgets fall linearly with depth."""

from ..pipeline.budgets import DEFAULT_BETA, pyramid_budgets
from .base import Parameter, TokenBudgetMethod, register


@register
class Pyramid(TokenBudgetMethod):
    name = "pyramid"
    summary = "budgets fall linearly from the first to the last layer (B_min = B_avg/β)"
    paper = "PyramidKV (arXiv 2406.02069)"
    parameters = {
        "beta": Parameter(float, DEFAULT_BETA, "ratio of average to last-layer budget", low=1.0, high=1000.0),
        "select": TokenBudgetMethod.select_parameter,
    }

    def layer_budgets(self, context):
        a = context.analysis
        return pyramid_budgets(a.num_layers, context.avg_budget, a.n_tokens, a.window, beta=self.params["beta"], caps=a.layer_caps)
