"""Compression methods, one file each, registered by name in METHODS."""

from . import adakv, full, l2norm, pyramid, streaming, uniform, zigzag  # noqa: F401  (each module registers its method)
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
