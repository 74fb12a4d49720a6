"""Expected Attention: keep the tokens that future queries are expected to attend to, whatever the question."""

from .base import TokenBudgetMethod, register


@register
class ExpectedAttention(TokenBudgetMethod):
    name = "expected"
    summary = ("tokens scored by the attention the next queries are expected to give them (moments of the prompt's "
               "last queries moved to future positions, weighted by value norm); question-agnostic")
    paper = "Expected Attention (NVIDIA kvpress, ExpectedAttentionPress)"
    default_select = "expected"
    parameters = {"alloc": TokenBudgetMethod.alloc_parameter}

    def layer_budgets(self, context):
        return self.allocated_budgets(context)
