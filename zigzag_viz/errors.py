"""Errors that carry a message meant for the user (one line, no traceback), and the check every entry point
makes on the text it is given."""

import unicodedata


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


def check_text(text, what: str = "prompt") -> str:
    """`text` when it holds something to read; InputError when it is not text, holds NUL bytes, or is empty once
    whitespace, control characters and invisible marks (zero-width, direction marks) are set aside."""
    if not isinstance(text, str):
        raise InputError(f"the {what} must be text")
    if "\x00" in text:
        raise InputError(f"the {what} is not text (it contains NUL bytes)")
    if not any(unicodedata.category(char)[0] in "LNPSM" for char in text):
        raise InputError(f"the {what} is empty: type or load some text first")
    return text
