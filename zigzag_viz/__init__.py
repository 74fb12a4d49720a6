"""zigzag_viz: per-layer KV-cache budgets from layer uncertainty (ZigZagKV), compared with other methods.

Subpackages, in pipeline order: `pipeline` (load model → capture signals → allocate budgets → compressed
cache), `methods` (one compression method per file), `evaluation` (prompts, metrics, comparisons and the
runner every caller uses), `presentation` (Plotly charts and the Streamlit helpers); `cli` is the command line.
The library never imports Streamlit; `zigzag_viz.presentation.ui` is the only module that does, for the pages.
"""

__version__ = "0.1.0"
