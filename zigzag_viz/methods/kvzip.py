"""KVzip: keep the tokens the model needs to reconstruct the prompt, whatever the question."""

from .base import TokenBudgetMethod, register


@register
class KVzip(TokenBudgetMethod):
    name = "kvzip"
    summary = ("tokens scored by the most attention they receive while the model repeats the prompt (one extra "
               "forward pass over prompt + 'repeat' + prompt, timed in analysis_s); question-agnostic")
    paper = "KVzip (arXiv 2505.23416, NeurIPS 2025)"
    default_select = "kvzip"
    parameters = {"alloc": TokenBudgetMethod.alloc_parameter}

    def layer_budgets(self, context):
        return self.allocated_budgets(context)
