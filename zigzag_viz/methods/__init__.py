"""Compression methods, one file each, registered by name in METHODS."""

from . import (  # noqa: F401  (each module registers its method)
    adakv, baklava, full, kivi, kvsharer, l2norm, less, minicache, pyramid, streaming, think, uniform, zigzag,
)
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

# Display order everywhere (pickers, listings): the reference, the budget rules, then the other axes.
_ORDER = ("full", "zigzag", "pyramid", "uniform", "adakv", "baklava", "streaming", "l2norm", "kvsharer", "minicache",
          "less", "think", "kivi")
for _name in sorted(METHODS, key=lambda n: _ORDER.index(n) if n in _ORDER else len(_ORDER)):
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
