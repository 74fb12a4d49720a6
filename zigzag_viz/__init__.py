"""zigzag_viz: per-layer KV-cache budgets from layer uncertainty (ZigZagKV), compared with other methods.

Pipeline, one module per stage: models → capture → budgets → methods/cache → compare → charts.
The library never imports Streamlit; `zigzag_viz.ui` is the only module that does, for the pages.
"""

__version__ = "0.1.0"
