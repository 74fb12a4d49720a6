"""Full KV: the uncompressed reference."""

import numpy as np

from .base import CompressionMethod, CompressionReport, register


@register
class FullKV(CompressionMethod):
    name = "full"
    summary = "no compression (the reference every method is compared with)"
    compresses = "nothing (reference)"
    lossless = True

    def compress(self, cache, context) -> CompressionReport:
        return CompressionReport(layer_budgets=np.asarray(context.analysis.layer_caps))
