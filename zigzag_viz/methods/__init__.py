"""Compression methods, one file each, registered by name in METHODS.

Every module of this folder is imported here, so a method registers by its file's presence: a new method is
one new file with a `@register`ed subclass of `CompressionMethod` (see `base.py` for the contract).
"""

import importlib
import pkgutil

from .base import (
    METHODS,
    STAGES,
    CompositeMethod,
    CompressionContext,
    CompressionMethod,
    CompressionReport,
    Parameter,
    TokenBudgetMethod,
    parse_spec,
    parse_specs,
)

_SUPPORT_MODULES = {"base", "calibration"}
for _module in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
    if _module.name not in _SUPPORT_MODULES:
        importlib.import_module(f"{__name__}.{_module.name}")

# Display order everywhere (pickers, listings): the reference, the budget rules, then the other axes; methods
# added later follow in name order.
_ORDER = ("full", "zigzag", "pyramid", "uniform", "adakv", "baklava", "streaming", "l2norm", "kvsharer", "minicache",
          "less", "think", "kivi")
for _name in sorted(METHODS, key=lambda n: (_ORDER.index(n) if n in _ORDER else len(_ORDER), n)):
    METHODS[_name] = METHODS.pop(_name)

__all__ = [
    "METHODS",
    "STAGES",
    "CompositeMethod",
    "CompressionContext",
    "CompressionMethod",
    "CompressionReport",
    "Parameter",
    "TokenBudgetMethod",
    "parse_spec",
    "parse_specs",
]
