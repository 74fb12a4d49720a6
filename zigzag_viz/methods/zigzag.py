"""ZigZagKV: per-layer budgets in proportion to layer uncertainty, with a floor share ρ."""

from ..pipeline.budgets import DEFAULT_RHO, zigzag_budgets
from ..pipeline.budgets import SIGNALS
from .base import Parameter, TokenBudgetMethod, register


@register
class ZigZag(TokenBudgetMethod):
    name = "zigzag"
    summary = "budgets in proportion to each layer's uncertainty (LMBA, entropy or hidden-state change)"
    paper = "ZigZagKV (arXiv 2412.09036)"
    parameters = {
        "rho": Parameter(float, DEFAULT_RHO, "share of the budget spread evenly", low=0.0, high=1.0),
        "signal": Parameter(str, "lmba", "layer uncertainty", choices=SIGNALS),
        "tau": Parameter(float, 0.9, "attention mass that LMBA must cover", low=0.01, high=1.0),
        "select": TokenBudgetMethod.select_parameter,
    }

    def layer_budgets(self, context):
        a = context.analysis
        signal = a.layer_signal(self.params["signal"], tau=self.params["tau"])
        return zigzag_budgets(signal, context.avg_budget, a.n_tokens, a.window, rho=self.params["rho"], caps=a.layer_caps)
