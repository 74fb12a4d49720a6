"""L2-norm: keep the tokens whose keys have the lowest L2 norm (plus the recent window), same budget per layer."""

from ..pipeline.selection import SELECTORS
from .base import Parameter, register
from .uniform import Uniform


@register
class L2Norm(Uniform):
    name = "l2norm"
    summary = "keeps the lowest-key-norm tokens plus the window, same budget per layer"
    paper = "A Simple and Effective L2 Norm-Based Strategy for KV Cache Compression (arXiv 2406.11430)"
    parameters = {"select": Parameter(str, "knorm", "within-layer selection", choices=tuple(SELECTORS))}
