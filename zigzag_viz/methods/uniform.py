"""Uniform budgets with SnapKV selection: every layer keeps the same number of tokens."""

from ..pipeline.budgets import uniform_budgets
from .base import TokenBudgetMethod, register


@register
class Uniform(TokenBudgetMethod):
    name = "uniform"
    summary = "same budget in every layer, SnapKV selection"
    paper = "SnapKV (arXiv 2404.14469)"
    parameters = {"select": TokenBudgetMethod.select_parameter}

    def layer_budgets(self, context):
        a = context.analysis
        return uniform_budgets(a.num_layers, context.avg_budget, a.n_tokens, a.window, caps=a.layer_caps)
