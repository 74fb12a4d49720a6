"""Stage 7, charts: Plotly figures and display snippets built from numbers and dataframes only."""

from __future__ import annotations

import html
from typing import Mapping, Sequence

import numpy as np
import plotly.graph_objects as go
from plotly.subplots import make_subplots

# One colour per method on every page (Okabe–Ito and Tableau tones, readable on light and dark themes).
METHOD_COLOURS: dict[str, str] = {
    "full": "#4d4d4d",
    "zigzag": "#d55e00",
    "pyramid": "#0072b2",
    "uniform": "#009e73",
    "streaming": "#cc79a7",
    "l2norm": "#e69f00",
    "adakv": "#56b4e9",
    "baklava": "#8c564b",
    "kvsharer": "#9467bd",
    "minicache": "#bcbd22",
    "think": "#17becf",
    "kivi": "#7f7f7f",
    "less": "#f0e442",
}
SIGNAL_COLOURS = {"entropy": "#6a3d9a", "lmba": "#d55e00", "hidden": "#1f78b4"}
_FALLBACK = ["#1b9e77", "#e7298a", "#66a61e", "#a6761d", "#7570b3"]


def method_colour(spec: str) -> str:
    """Colour of a method spec, by its base name (`zigzag[rho=0.5]` is drawn like `zigzag`)."""
    base = spec.split("[", 1)[0].split("+", 1)[0].strip().lower()
    return METHOD_COLOURS.get(base, _FALLBACK[sum(map(ord, base)) % len(_FALLBACK)])


def _layout(fig: go.Figure, title: str, height: int = 380) -> go.Figure:
    fig.update_layout(
        title=title, height=height, template="plotly_white", margin=dict(l=60, r=20, t=60, b=50),
        legend=dict(orientation="h", yanchor="bottom", y=1.02, xanchor="right", x=1),
    )
    return fig


def signals_figure(entropy: np.ndarray, lmba: np.ndarray, hidden: np.ndarray, tau: float) -> go.Figure:
    """Three per-layer curves (L,): attention entropy (nats), LMBA (share of tokens), hidden-state change."""
    layers = np.arange(len(entropy))
    fig = make_subplots(
        rows=1, cols=3, horizontal_spacing=0.08,
        subplot_titles=("Attention entropy (nats)", f"LMBA at τ = {tau:g} (share of tokens)", "Hidden-state change 1 − cos"),
    )
    for col, (name, values) in enumerate((("entropy", entropy), ("lmba", lmba), ("hidden", hidden)), start=1):
        fig.add_trace(
            go.Scatter(x=layers, y=values, mode="lines+markers", name=name, line=dict(color=SIGNAL_COLOURS[name]),
                       hovertemplate="layer %{x}<br>%{y:.4f}<extra>" + name + "</extra>"),
            row=1, col=col,
        )
        fig.update_xaxes(title_text="layer", tickformat="d", dtick=1 if len(layers) <= 16 else None, row=1, col=col)
    fig.update_layout(showlegend=False)
    return _layout(fig, "Layer uncertainty", height=340)


def budget_figure(curves: Mapping[str, Sequence[int]], n_tokens: int) -> go.Figure:
    """Tokens kept per layer under each allocation rule, with the prompt length as a ceiling."""
    fig = go.Figure()
    for name, budgets in curves.items():
        budgets = np.asarray(budgets)
        fig.add_trace(go.Scatter(
            x=np.arange(len(budgets)), y=budgets, mode="lines+markers", name=name,
            line=dict(color=method_colour(name), width=2.5),
            hovertemplate="layer %{x}<br>%{y} tokens<extra>" + name + "</extra>",
        ))
    fig.add_hline(y=n_tokens, line=dict(color="#999", dash="dot"), annotation_text=f"prompt: {n_tokens} tokens")
    fig.update_xaxes(title_text="layer", tickformat="d", dtick=1 if len(curves) and len(next(iter(curves.values()))) <= 16 else None)
    fig.update_yaxes(title_text="tokens kept", rangemode="tozero")
    return _layout(fig, "Budget per layer")


def kv_bytes_figure(methods: Sequence[str], kv_bytes: Sequence[int]) -> go.Figure:
    """KV-cache size held by each method (MiB), labelled with its share of full KV."""
    full = max(kv_bytes) if kv_bytes else 1
    mib = [b / 2**20 for b in kv_bytes]
    fig = go.Figure(go.Bar(
        x=list(methods), y=mib, marker_color=[method_colour(m) for m in methods],
        text=[f"{b / full:.0%}" for b in kv_bytes], textposition="outside",
        hovertemplate="%{x}<br>%{y:.2f} MiB<extra></extra>",
    ))
    fig.update_yaxes(title_text="KV cache (MiB)", rangemode="tozero")
    return _layout(fig, "KV cache held", height=340)


def divergence_html(token_texts: Sequence[str], divergence: int | None, colour: str) -> str:
    """The generated text as HTML, tokens from the first divergence on highlighted in `colour`."""
    if divergence is None:
        return f"<div class='zz-out'>{html.escape(''.join(token_texts))}</div>"
    same = html.escape("".join(token_texts[:divergence]))
    rest = html.escape("".join(token_texts[divergence:])) or "∅"
    return (
        f"<div class='zz-out'>{same}<mark style='background:{colour}33;border-bottom:2px solid {colour};"
        f"padding:0 1px' title='differs from full KV from token {divergence} on'>{rest}</mark></div>"
    )
