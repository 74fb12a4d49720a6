"""Errors that carry a message meant for the user (one line, no traceback)."""


class UserError(Exception):
    """A problem with what the user asked for; its message is shown as is."""


class InputError(UserError):
    """Bad prompt, budget or option."""


class ModelLoadError(UserError):
    """Unknown model name, or weights that cannot be loaded offline."""


class BudgetError(InputError):
    """A budget that the allocation rules cannot satisfy."""


class OutOfMemoryError(UserError):
    """The device ran out of memory; the request was dropped and nothing else lost."""
