"""zigzag_viz: per-layer KV-cache budgets from layer uncertainty (ZigZagKV), compared with other methods.

Subpackages, in pipeline order: `pipeline` (load model → capture signals → allocate budgets → compressed
cache), `methods` (one compression method per file), `evaluation` (prompts, metrics, comparisons and the
runner every caller uses, tasks, sweeps and the run store), `presentation` (Plotly charts, the pages' results, where
they run the model, and the Streamlit helpers), `serving` (the model server and its clients); `cli` is the command
line.
The library never imports Streamlit; `zigzag_viz.presentation.ui` is the only module that does, for the pages.
"""

__version__ = "0.1.0"
