"""Stage 7, charts: Plotly figures and display snippets built from numbers and dataframes only."""

from __future__ import annotations

import html
from typing import Mapping, Sequence

import numpy as np
import pandas as pd
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
    "kivi": "#3535d0",
    "less": "#393b79",
    "expected": "#c51b7d",
    "kvzip": "#33a02c",
}
NOISE_FLOOR = 1e-6  # divergences below this are float rounding, drawn as 0
SIGNAL_COLOURS = {"entropy": "#d62ad6", "lmba": "#6d7328", "hidden": "#e3243f"}
_FALLBACK = ["#1b9e77", "#e7298a", "#66a61e", "#a6761d", "#7570b3"]


_VARIANT_SHADES = (-0.4, 0.35, -0.22, 0.2, 0.5)


def _shade(colour: str, amount: float) -> str:
    """`colour` (#rrggbb) mixed towards black (amount < 0) or white (amount > 0)."""
    rgb = [int(colour[i : i + 2], 16) for i in (1, 3, 5)]
    target = 255 if amount > 0 else 0
    return "#" + "".join(f"{round(c + (target - c) * abs(amount)):02x}" for c in rgb)


def method_colour(spec: str) -> str:
    """Colour of a method spec: its base method's colour (the first part of a composition), and for variants
    with parameters or compositions a darker or lighter shade of it, stable for that spec on every page."""
    spec = spec.strip().lower()
    base = spec.split("[", 1)[0].split("+", 1)[0].strip()
    colour = METHOD_COLOURS.get(base, _FALLBACK[sum(map(ord, base)) % len(_FALLBACK)])
    if spec == base:
        return colour
    return _shade(colour, _VARIANT_SHADES[sum(map(ord, spec)) % len(_VARIANT_SHADES)])


LEGEND_ON_TOP = 5  # more legend entries than this go below the plot, where they cannot cover the title


def _layout(fig: go.Figure, title: str, height: int = 380, top: int = 60, legend_y: float = 1.02) -> go.Figure:
    """Title, height and white template; the legend above the plot at `legend_y` (raised with `top`, the top
    margin in px, over subplot titles), or below it when it has more than LEGEND_ON_TOP entries."""
    entries = len({trace.name for trace in fig.data if trace.name and trace.showlegend is not False})
    if entries <= LEGEND_ON_TOP:
        legend, bottom = dict(orientation="h", yanchor="bottom", y=legend_y, xanchor="right", x=1), 50
    else:
        legend, bottom = dict(orientation="h", yanchor="top", y=-0.2, xanchor="left", x=0), 50 + 22 * (entries // 4 + 1)
        height, top = height + bottom - 50, 60
    fig.update_layout(title=title, height=height, template="plotly_white", margin=dict(l=60, r=20, t=top, b=bottom),
                      legend=legend)
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


def _bin_labels(edges: np.ndarray, texts: Sequence[str]) -> tuple[list[str], list[str]]:
    """Hover labels of token bins: the token range of each ("12–15", or "12") and its text with <> made harmless."""
    ranges = [f"{a}–{b - 1}" if b - a > 1 else f"{a}" for a, b in zip(edges[:-1], edges[1:])]
    return ranges, [t.replace("<", "‹").replace(">", "›") for t in texts]


def token_label(text: str, width: int = 10) -> str:
    """A token's text as an axis label: whitespace made visible (·, ⏎), cut to `width`, HTML escaped."""
    return html.escape(text.replace("\n", "⏎").replace(" ", "·")[:width]) or "∅"


def agreement_curves_figure(curves: Mapping[str, tuple[Sequence[float], Sequence[float]]],
                            tokens: Sequence[str] | None = None) -> go.Figure:
    """Per generated step, teacher-forced along the full-KV answer: KL(full ‖ method) in nats (top) and the
    running share of steps whose top-1 token matches full KV (bottom). curves: method → (kl (T,), top1 (T,));
    tokens: full KV's generated token texts (T,), written under their steps on the x axis."""
    fig = make_subplots(rows=2, cols=1, shared_xaxes=True, vertical_spacing=0.1,
                        subplot_titles=("KL(full ‖ method) per step (nats)", "Top-1 agreement with full KV, running mean"))
    for name, (kl, top1) in curves.items():
        kl = np.asarray(kl, dtype=float)
        kl = np.where(np.abs(kl) < NOISE_FLOOR, 0.0, kl)  # float rounding, not divergence
        steps = np.arange(len(kl))
        colour = method_colour(name)
        running = np.cumsum(top1) / np.arange(1, len(top1) + 1) if len(top1) else np.asarray([])
        fig.add_trace(go.Scatter(x=steps, y=kl, mode="lines+markers", name=name, legendgroup=name,
                                 line=dict(color=colour, width=2), marker=dict(size=5),
                                 hovertemplate="step %{x}<br>KL %{y:.4f} nats<extra>" + name + "</extra>"), row=1, col=1)
        fig.add_trace(go.Scatter(x=steps, y=running, mode="lines", name=name, legendgroup=name, showlegend=False,
                                 line=dict(color=colour, width=2, shape="hv"),
                                 hovertemplate="step %{x}<br>%{y:.0%} of steps agree<extra>" + name + "</extra>"), row=2, col=1)
    fig.update_yaxes(title_text="nats", rangemode="tozero", row=1, col=1)
    fig.update_yaxes(title_text="agreement", range=[-0.02, 1.05], tickformat=".0%", row=2, col=1)
    fig.update_xaxes(title_text="generated token", tickformat="d", row=2, col=1)
    if tokens:
        labels = [token_label(text) for text in tokens]
        fig.update_xaxes(tickmode="array", tickvals=list(range(len(labels))), ticktext=labels, tickangle=-45,
                         title_text="full KV's answer, token by token", row=2, col=1)
    _layout(fig, "Where each answer leaves full KV", height=520, top=100, legend_y=1.08)
    return fig


def layer_budget_bars_figure(budgets: Mapping[str, Sequence[int]], caps: Sequence[int]) -> go.Figure:
    """Tokens each method's cache holds per layer (grouped bars), against the most a layer can hold (dotted)."""
    caps = np.asarray(caps)
    layers = np.arange(len(caps))
    fig = go.Figure()
    for name, values in budgets.items():
        values = np.asarray(values)
        fig.add_trace(go.Bar(x=layers, y=values, name=name, marker_color=method_colour(name),
                             customdata=values / np.maximum(caps, 1),
                             hovertemplate="layer %{x}<br>%{y} tokens (%{customdata:.0%})<extra>" + name + "</extra>"))
    fig.add_trace(go.Scatter(x=layers, y=caps, mode="lines", name="most a layer holds",
                             line=dict(color="#999", dash="dot", shape="hvh"),
                             hovertemplate="layer %{x}<br>holds at most %{y}<extra></extra>"))
    fig.update_layout(barmode="group", bargap=0.15, bargroupgap=0.0)
    fig.update_yaxes(title_text="tokens kept", rangemode="tozero")
    fig.update_xaxes(title_text="layer", tickformat="d", dtick=1 if len(layers) <= 32 else None)
    return _layout(fig, "Tokens kept per layer, by method", height=400)


def kept_map_figure(
    maps: Mapping[str, np.ndarray], edges: np.ndarray, texts: Sequence[str], answer_bins: Sequence[int] = (),
    sliding: np.ndarray | None = None,
) -> go.Figure:
    """One layer × token-bin panel per method: the share of KV heads that kept each bin's tokens (0 = dropped).

    maps: method → (L, bins) in [0, 1]; edges (bins + 1,) and texts (bins,) as for `token_map_figure`;
    answer_bins: bins holding the known answer, marked on every panel.
    """
    names = list(maps)
    edges = np.asarray(edges)
    centres = (edges[:-1] + edges[1:] - 1) / 2
    widths = edges[1:] - edges[:-1]
    pad = max(1.0, 0.004 * float(edges[-1]))
    runs: list[tuple[int, int]] = []  # consecutive answer bins, boxed together
    for b in sorted(answer_bins):
        if runs and b == runs[-1][1] + 1:
            runs[-1] = (runs[-1][0], b)
        else:
            runs.append((b, b))
    labels = np.asarray([f"{r}: {t}" for r, t in zip(*_bin_labels(edges, texts))], dtype=object)
    fig = make_subplots(rows=max(len(names), 1), cols=1, shared_xaxes=True, vertical_spacing=0.04 if len(names) < 6 else 0.02,
                        subplot_titles=names)
    for row, name in enumerate(names, start=1):
        values = np.asarray(maps[name], dtype=float)
        num_layers = values.shape[0]
        fig.add_trace(go.Heatmap(
            z=values, x=centres, y=np.arange(num_layers), zmin=0, zmax=1, colorscale="Viridis",
            customdata=np.broadcast_to(labels, values.shape), showscale=row == 1,
            colorbar=dict(title=dict(text="share of KV heads keeping it", side="right"), thickness=14, tickformat=".0%"),
            hovertemplate=name + "<br>layer %{y} · tokens %{customdata}<br>kept by %{z:.0%} of KV heads<extra></extra>",
        ), row=row, col=1)
        ticks, tick_labels = _layer_ticks(num_layers, sliding)
        step = max(1, len(ticks) // 6)
        fig.update_yaxes(autorange="reversed", tickvals=ticks[::step], ticktext=tick_labels[::step], title_text="layer",
                         row=row, col=1)
        for first, last in runs:  # a box a little wider than the answer, so the cells inside stay visible
            fig.add_shape(type="rect", x0=edges[first] - 0.5 - pad, x1=edges[last] + widths[last] - 0.5 + pad, y0=-0.5,
                          y1=num_layers - 0.5, line=dict(color="#ff2d55", width=1), fillcolor="rgba(0,0,0,0)",
                          row=row, col=1)
    fig.update_xaxes(title_text="prompt token (red boxes: the known answer)" if len(answer_bins) else "prompt token",
                     range=[edges[0] - 0.5, edges[-1] - 0.5], showgrid=False, row=len(names), col=1)
    return _layout(fig, "Which prompt tokens each layer kept", height=int(140 + 170 * max(len(names), 1)))


# ---------------------------------------------------------------------------------------------------------
# Uncertainty and Budgets pages. Pure functions of numpy arrays: no model, no Streamlit.

LMBO_COLOUR = "#33a02c"
_MODEL_PALETTE = ["#d55e00", "#0072b2", "#009e73", "#cc79a7", "#e69f00", "#56b4e9", "#8c564b"]
_MODEL_COLOURS = {"smollm2": "#0072b2", "gemma3": "#d55e00", "tiny": "#7f7f7f"}


def model_colour(name: str) -> str:
    """Colour of a model on every chart: fixed for the embedded models, stable by name for others."""
    key = name.strip().lower()
    return _MODEL_COLOURS.get(key, _MODEL_PALETTE[sum(map(ord, key)) % len(_MODEL_PALETTE)])


def _layer_ticks(num_layers: int, sliding: np.ndarray | None) -> tuple[list[int], list[str]]:
    """Tick positions and labels of a layer axis; sliding-window layers are labelled `12 ◂sw`."""
    sliding = np.zeros(num_layers, dtype=bool) if sliding is None else np.asarray(sliding, dtype=bool)
    step = 1 if num_layers <= 32 else int(np.ceil(num_layers / 32))
    ticks = list(range(0, num_layers, step))
    return ticks, [f"{layer} ◂sw" if sliding[layer] else str(layer) for layer in ticks]


def _heatmap_height(num_layers: int) -> int:
    return int(min(max(320, 20 * num_layers + 150), 1100))


def entropy_heatmap(entropy: np.ndarray, kv_group: np.ndarray, normalised: bool = False) -> go.Figure:
    """Layer × query-head attention entropy.

    entropy: (L, H_q) mean over the window queries, in nats, or in units of log(#visible keys) when
    `normalised` (then 0 = all mass on one key, 1 = spread evenly). kv_group: (H_q,) KV head each query
    head reads. Hover shows layer, head, KV group and value.
    """
    entropy = np.asarray(entropy, dtype=float)
    num_layers, num_heads = entropy.shape
    groups = np.broadcast_to(np.asarray(kv_group)[None, :], entropy.shape)
    unit = "share of log #keys" if normalised else "nats"
    fig = go.Figure(go.Heatmap(
        z=entropy, x=np.arange(num_heads), y=np.arange(num_layers), customdata=groups,
        colorscale="Viridis", colorbar=dict(title=dict(text=unit, side="right"), thickness=14),
        zmin=0.0, zmax=1.0 if normalised else None,
        hovertemplate="layer %{y} · head %{x} · KV group %{customdata}<br>entropy %{z:.3f} " + unit + "<extra></extra>",
    ))
    ticks, labels = _layer_ticks(num_layers, None)
    fig.update_yaxes(title_text="layer", autorange="reversed", tickvals=ticks, ticktext=labels)
    fig.update_xaxes(title_text="query head", tickvals=list(range(num_heads)), showgrid=False)
    # Short title: the column is narrow and Plotly's toolbar sits over the top right corner.
    title = "Entropy per head" + (" (÷ log #keys, normalised)" if normalised else " (nats)")
    return _layout(fig, title, height=_heatmap_height(num_layers))


def layer_curves_figure(
    lmba_heads: np.ndarray, hidden: np.ndarray, tau: float, lmbo: np.ndarray | None = None, threshold: float | None = None,
) -> go.Figure:
    """Per-layer uncertainty curves on two stacked panels sharing the layer axis.

    lmba_heads: (L, H_q) minimum attention budget per head as a share of the prompt's tokens (0–1): the mean
    over heads is drawn as a line, the min–max over heads as a band. lmbo: (L,) optional minimum output
    budget, same unit. hidden: (L,) hidden-state change 1 − cos(residual in, out), mean over tokens.
    """
    lmba_heads = np.asarray(lmba_heads, dtype=float)
    layers = np.arange(lmba_heads.shape[0])
    fig = make_subplots(
        rows=2, cols=1, shared_xaxes=True, vertical_spacing=0.1, row_heights=[0.62, 0.38],
        subplot_titles=("Minimum budget (share of the prompt's tokens)", "Hidden-state change 1 − cos"),
    )
    colour = SIGNAL_COLOURS["lmba"]
    fig.add_trace(go.Scatter(x=layers, y=lmba_heads.max(axis=1), mode="lines", line=dict(width=0), showlegend=False,
                             hoverinfo="skip", legendgroup="lmba"), row=1, col=1)
    fig.add_trace(go.Scatter(
        x=layers, y=lmba_heads.min(axis=1), mode="lines", line=dict(width=0), fill="tonexty",
        fillcolor="rgba(213,94,0,0.18)", name="LMBA min–max over heads", legendgroup="lmba",
        hovertemplate="layer %{x}<br>lowest head %{y:.3f}<extra></extra>",
    ), row=1, col=1)
    fig.add_trace(go.Scatter(
        x=layers, y=lmba_heads.mean(axis=1), mode="lines+markers", line=dict(color=colour, width=2.5),
        name=f"LMBA mean over heads (τ = {tau:g})", legendgroup="lmba",
        customdata=np.stack([lmba_heads.min(axis=1), lmba_heads.max(axis=1)], axis=1),
        hovertemplate="layer %{x}<br>LMBA %{y:.3f} (heads %{customdata[0]:.3f}–%{customdata[1]:.3f})<extra></extra>",
    ), row=1, col=1)
    if lmbo is not None:
        label = "LMBO" + (f" (cos ≥ {threshold:g})" if threshold is not None else "")
        fig.add_trace(go.Scatter(
            x=layers, y=np.asarray(lmbo, dtype=float), mode="lines+markers", name=label,
            line=dict(color=LMBO_COLOUR, width=2, dash="dash"), marker=dict(symbol="diamond"),
            hovertemplate="layer %{x}<br>LMBO %{y:.2f}<extra></extra>",
        ), row=1, col=1)
    fig.add_trace(go.Scatter(
        x=layers, y=np.asarray(hidden, dtype=float), mode="lines+markers", name="hidden-state change",
        line=dict(color=SIGNAL_COLOURS["hidden"], width=2), hovertemplate="layer %{x}<br>1 − cos %{y:.4f}<extra></extra>",
    ), row=2, col=1)
    fig.update_yaxes(title_text="share of tokens", rangemode="tozero", row=1, col=1)
    fig.update_yaxes(title_text="1 − cos", rangemode="tozero", row=2, col=1)
    fig.update_xaxes(title_text="layer", tickformat="d", dtick=1 if len(layers) <= 16 else None, row=2, col=1)
    _layout(fig, "Layer uncertainty", height=_heatmap_height(len(layers)), top=110, legend_y=1.08)
    return fig


def token_map_figure(
    values: np.ndarray, edges: np.ndarray, texts: Sequence[str], title: str, value_label: str,
    sliding: np.ndarray | None = None, log: bool = False, colorscale: str = "Plasma",
) -> go.Figure:
    """Layer × token-bin heatmap with the prompt text of each bin in the hover.

    values: (L, bins) one number per layer and bin (e.g. from `capture.bin_columns`); edges: (bins + 1,) token
    index where each bin starts, n at the end; texts: (bins,) the text of each bin. With `log`, colour is
    log10 of the value (zeros left blank) and the hover still shows the value. sliding: (L,) True for
    sliding-window layers, labelled `◂sw` on the layer axis.
    """
    values = np.asarray(values, dtype=float)
    edges = np.asarray(edges)
    num_layers, bins = values.shape
    if len(texts) != bins or len(edges) != bins + 1:
        raise ValueError(f"{bins} bins need {bins} texts and {bins + 1} edges, got {len(texts)} and {len(edges)}")
    with np.errstate(divide="ignore"):
        colour = np.where(values > 0, np.log10(np.where(values > 0, values, 1.0)), np.nan) if log else values
    ranges, safe_texts = _bin_labels(edges, texts)
    info = np.empty((num_layers, bins, 3), dtype=object)
    info[:, :, 0] = np.asarray(ranges, dtype=object)[None, :]
    info[:, :, 1] = np.asarray(safe_texts, dtype=object)[None, :]
    info[:, :, 2] = np.vectorize(lambda v: f"{v:.3g}", otypes=[object])(values)
    colorbar = dict(title=dict(text=("log₁₀ " if log else "") + value_label, side="right"), thickness=14)
    if log and np.isfinite(colour).any():
        low, high = int(np.floor(np.nanmin(colour))), int(np.ceil(np.nanmax(colour)))
        ticks = list(range(low, high + 1))
        colorbar.update(tickvals=ticks, ticktext=[f"{10.0 ** t:g}" for t in ticks])
        colorbar["title"]["text"] = value_label
    centres = (edges[:-1] + edges[1:] - 1) / 2
    fig = go.Figure(go.Heatmap(
        z=colour, x=centres, y=np.arange(num_layers), customdata=info, colorscale=colorscale, colorbar=colorbar,
        hoverongaps=False,
        hovertemplate="layer %{y} · tokens %{customdata[0]}<br>%{customdata[1]}<br>" + value_label
        + " %{customdata[2]}<extra></extra>",
    ))
    ticks, labels = _layer_ticks(num_layers, sliding)
    fig.update_yaxes(title_text="layer", autorange="reversed", tickvals=ticks, ticktext=labels)
    fig.update_xaxes(title_text="prompt token", range=[edges[0] - 0.5, edges[-1] - 0.5], showgrid=False)
    if sliding is not None and np.any(sliding):
        title += " · ◂sw = sliding-window layer"
    return _layout(fig, title, height=_heatmap_height(num_layers))


def token_importance_figure(importance: np.ndarray, edges: np.ndarray, texts: Sequence[str],
                            sliding: np.ndarray | None = None) -> go.Figure:
    """Which prompt text each layer's window attends to.

    importance: (L, bins) attention mass each token bin receives from the window queries, summed over heads
    (`capture.bin_columns(analysis.token_importance(), edges)`). Drawn as each layer's share (rows sum to 1),
    colour on a log scale.
    """
    importance = np.asarray(importance, dtype=float)
    totals = importance.sum(axis=1, keepdims=True)
    share = np.divide(importance, totals, out=np.zeros_like(importance), where=totals > 0)
    return token_map_figure(share, edges, texts, "Where each layer's window looks (share of its attention)",
                            "share", sliding=sliding, log=True)


def hidden_change_map_figure(change: np.ndarray, edges: np.ndarray, texts: Sequence[str],
                             sliding: np.ndarray | None = None) -> go.Figure:
    """Hidden-state change per layer and token bin, colour on a log scale (the first layers change far more).

    change: (L, bins) mean of 1 − cos(residual in, residual out) over each bin's tokens.
    """
    return token_map_figure(change, edges, texts, "Hidden-state change per token (1 − cos)", "1 − cos",
                            sliding=sliding, log=True, colorscale="Blues")


def model_lmba_figure(curves: Mapping[str, np.ndarray], tau: float,
                      sliding: Mapping[str, np.ndarray] | None = None) -> go.Figure:
    """LMBA per layer of several models on one relative-depth axis (layer / (L − 1)), one colour per model.

    curves: model name → (L_model,) LMBA mean over heads, share of that prompt's tokens (0–1). sliding: model
    name → (L_model,) True for sliding-window layers, drawn as open markers.
    """
    fig = go.Figure()
    for name, values in curves.items():
        values = np.asarray(values, dtype=float)
        num_layers = len(values)
        depth = np.arange(num_layers) / max(num_layers - 1, 1)
        open_marker = np.zeros(num_layers, dtype=bool) if not sliding or name not in sliding else np.asarray(sliding[name])
        fig.add_trace(go.Scatter(
            x=depth, y=values, mode="lines+markers", name=f"{name} ({num_layers} layers)",
            line=dict(color=model_colour(name), width=2.5),
            marker=dict(size=8, symbol=np.where(open_marker, "circle-open", "circle").tolist()),
            customdata=np.stack([np.arange(num_layers), np.full(num_layers, num_layers - 1)], axis=1),
            hovertemplate=f"{html.escape(name)}<br>layer %{{customdata[0]}} of 0–%{{customdata[1]}}"
            "<br>LMBA %{y:.3f}<extra></extra>",
        ))
    if sliding and any(np.any(v) for v in sliding.values()):
        fig.add_trace(go.Scatter(x=[None], y=[None], mode="markers", name="open marker: sliding-window layer",
                                 marker=dict(size=8, symbol="circle-open", color="#666")))
    fig.update_xaxes(title_text="relative depth  layer / (L − 1)", range=[-0.02, 1.02], tickformat=".0%")
    fig.update_yaxes(title_text=f"LMBA at τ = {tau:g} (share of tokens)", rangemode="tozero")
    return _layout(fig, "The zig-zag differs by model: LMBA against relative depth")


def layer_budgets_figure(curves: Mapping[str, Sequence[int]], signal: np.ndarray, signal_name: str,
                         caps: np.ndarray, window: int) -> go.Figure:
    """Two panels over layers: the uncertainty share u_l = s_l / Σ s (bars, top) and the tokens each rule keeps.

    curves: method → (L,) tokens kept per layer; signal: (L,) per-layer uncertainty s_l ≥ 0 in its own unit;
    caps: (L,) most tokens each layer can hold (the prompt length, or its sliding window); window: tokens
    always kept.
    """
    signal = np.asarray(signal, dtype=float)
    caps = np.asarray(caps)
    layers = np.arange(len(signal))
    share = signal / signal.sum() if signal.sum() > 0 else np.full(len(signal), 1 / max(len(signal), 1))
    fig = make_subplots(rows=2, cols=1, shared_xaxes=True, vertical_spacing=0.08, row_heights=[0.3, 0.7],
                        subplot_titles=(f"Uncertainty share u_l from {signal_name}", "Tokens kept per layer"))
    fig.add_trace(go.Bar(x=layers, y=share, marker_color=SIGNAL_COLOURS.get(signal_name, LMBO_COLOUR), name=signal_name,
                         showlegend=False, customdata=signal,
                         hovertemplate="layer %{x}<br>u = %{y:.3f}<br>" + signal_name + " %{customdata:.4g}<extra></extra>"),
                  row=1, col=1)
    for name, budgets in curves.items():
        budgets = np.asarray(budgets)
        fig.add_trace(go.Scatter(
            x=layers, y=budgets, mode="lines+markers", name=name, line=dict(color=method_colour(name), width=2.5),
            customdata=budgets / np.maximum(caps, 1),
            hovertemplate="layer %{x}<br>%{y} tokens (%{customdata:.0%} of the layer)<extra>" + name + "</extra>",
        ), row=2, col=1)
    fig.add_trace(go.Scatter(x=layers, y=caps, mode="lines", line=dict(color="#999", dash="dot", shape="hvh"),
                             name="most a layer holds", hovertemplate="layer %{x}<br>holds at most %{y}<extra></extra>"),
                  row=2, col=1)
    fig.add_trace(go.Scatter(x=layers, y=np.minimum(window, caps), mode="lines",
                             line=dict(color="#bbb", dash="dash", shape="hvh"), name=f"window w = {window}",
                             hovertemplate="layer %{x}<br>always kept %{y}<extra></extra>"), row=2, col=1)
    fig.update_yaxes(title_text="u_l", rangemode="tozero", row=1, col=1)
    fig.update_yaxes(title_text="tokens kept", rangemode="tozero", row=2, col=1)
    fig.update_xaxes(title_text="layer", tickformat="d", dtick=1 if len(layers) <= 16 else None, row=2, col=1)
    _layout(fig, "Budget per layer", height=560, top=100, legend_y=1.06)
    return fig


def kv_cache_bytes(tokens_per_layer: Sequence[int], num_kv_heads: int, head_dim: int, bytes_per_element: float) -> int:
    """Bytes of a KV cache holding tokens_per_layer[l] entries in layer l: Σ_l tokens_l × 2 (K and V) × H_kv × d × size."""
    tokens = np.asarray(tokens_per_layer, dtype=np.int64)
    if tokens.ndim != 1 or np.any(tokens < 0):
        raise ValueError("tokens_per_layer must be one non-negative count per layer")
    return int(round(int(tokens.sum()) * 2 * int(num_kv_heads) * int(head_dim) * float(bytes_per_element)))


def kv_bytes_table(curves: Mapping[str, Sequence[int]], caps: Sequence[int], num_kv_heads: int, head_dim: int,
                   bytes_per_element: float):
    """One row per method plus `full` (every layer holding its cap): tokens held, KV bytes, MiB, share of full."""
    full = kv_cache_bytes(caps, num_kv_heads, head_dim, bytes_per_element)
    rows = [("full", int(np.sum(caps)), full)] + [
        (name, int(np.sum(b)), kv_cache_bytes(b, num_kv_heads, head_dim, bytes_per_element)) for name, b in curves.items()
    ]
    return pd.DataFrame({
        "method": [r[0] for r in rows],
        "tokens_held": [r[1] for r in rows],
        "kv_bytes": [r[2] for r in rows],
        "kv_mib": [round(r[2] / 2**20, 4) for r in rows],
        "fraction_of_full": [round(r[2] / full, 4) if full else 0.0 for r in rows],
    })


def layer_signals_table(entropy: np.ndarray, entropy_norm: np.ndarray, lmba_heads: np.ndarray, hidden: np.ndarray,
                        caps: np.ndarray, n_tokens: int, lmbo: np.ndarray | None = None):
    """Per-layer signals as a dataframe: entropy (nats) and normalised entropy, means over heads of (L, H_q);
    LMBA mean, min and max over heads (share of tokens); hidden change (L,); LMBO (L,) when given; cap and
    whether the layer is a sliding-window layer."""
    lmba_heads = np.asarray(lmba_heads, dtype=float)
    frame = pd.DataFrame({
        "layer": np.arange(len(caps)),
        "entropy": np.asarray(entropy, dtype=float).mean(axis=1).round(5),
        "entropy_norm": np.asarray(entropy_norm, dtype=float).mean(axis=1).round(5),
        "lmba": lmba_heads.mean(axis=1).round(5),
        "lmba_min_head": lmba_heads.min(axis=1).round(5),
        "lmba_max_head": lmba_heads.max(axis=1).round(5),
        "hidden_change": np.asarray(hidden, dtype=float).round(6),
    })
    if lmbo is not None:
        frame["lmbo"] = np.asarray(lmbo, dtype=float)
    frame["cap"] = np.asarray(caps, dtype=np.int64)
    frame["sliding"] = frame["cap"] < n_tokens
    return frame


def layer_budgets_table(curves: Mapping[str, Sequence[int]], signal: np.ndarray, signal_name: str, caps: np.ndarray):
    """Per layer: the uncertainty signal s_l, its share u_l, the cap and the tokens each rule keeps."""
    signal = np.asarray(signal, dtype=float)
    share = signal / signal.sum() if signal.sum() > 0 else np.full(len(signal), 1 / max(len(signal), 1))
    frame = pd.DataFrame({"layer": np.arange(len(signal)), signal_name: signal.round(6), "share_u": share.round(5),
                          "cap": np.asarray(caps, dtype=np.int64)})
    for name, budgets in curves.items():
        frame[name] = np.asarray(budgets, dtype=np.int64)
    return frame


def accuracy_curves_figure(table: pd.DataFrame, title: str) -> go.Figure:
    """Mean score against kept fraction, one line per method (and run, when the table has a `run` column), with
    Wilson intervals over the prompts as error bars; `table` is `aggregate.accuracy_table` of one task and mode."""
    fig = go.Figure()
    runs = list(dict.fromkeys(table["run"])) if "run" in table else [None]
    for run_index, run in enumerate(runs):
        part = table if run is None else table[table["run"] == run]
        for method, group in part.groupby("method", sort=False):
            group = group.sort_values("budget")
            name = method if len(runs) == 1 else f"{method} · {run}"
            fig.add_trace(go.Scatter(
                x=group["budget"], y=group["score"], mode="lines+markers", name=name,
                line=dict(color=method_colour(method), dash="solid" if run_index == 0 else "dash"),
                error_y=dict(type="data", symmetric=False, array=group["score_high"] - group["score"],
                             arrayminus=group["score"] - group["score_low"], thickness=1),
                customdata=np.stack([group["prompts"], group["kv_fraction"]], axis=-1),
                hovertemplate=f"{name}<br>kept %{{x:.0%}}<br>score %{{y:.2f}} (%{{customdata[0]}} prompts)"
                              "<br>KV held %{customdata[1]:.0%}<extra></extra>",
            ))
    fig.update_xaxes(title_text="kept fraction", tickformat=".0%")
    fig.update_yaxes(title_text="score (mean over prompts)", range=[-0.05, 1.05])
    return _layout(fig, title)


def kl_budget_figure(table: pd.DataFrame, title: str) -> go.Figure:
    """Mean KL(full ‖ method) in nats against kept fraction, one line per method (full KV left out)."""
    fig = go.Figure()
    for method, group in table[table["method"] != "full"].groupby("method", sort=False):
        group = group.sort_values("budget")
        fig.add_trace(go.Scatter(x=group["budget"], y=group["kl_mean"], mode="lines+markers", name=method,
                                 line=dict(color=method_colour(method)),
                                 hovertemplate=f"{method}<br>kept %{{x:.0%}}<br>KL %{{y:.3f}} nats<extra></extra>"))
    fig.update_xaxes(title_text="kept fraction", tickformat=".0%")
    fig.update_yaxes(title_text="KL(full ‖ method), nats", rangemode="tozero")
    return _layout(fig, title)


def depth_length_figure(grid: pd.DataFrame, title: str) -> go.Figure:
    """Needle depth × prompt length heatmap of mean score (the needle-in-a-haystack picture)."""
    fig = go.Figure(go.Heatmap(
        z=grid.to_numpy(), x=[str(c) for c in grid.columns], y=[f"{d:.0%}" for d in grid.index], zmin=0, zmax=1,
        colorscale="RdYlGn", colorbar=dict(title="score"), text=np.round(grid.to_numpy(), 2), texttemplate="%{text}",
        hovertemplate="length %{x} tokens<br>depth %{y}<br>score %{z:.2f}<extra></extra>",
    ))
    fig.update_xaxes(title_text="prompt length (tokens)", type="category")
    fig.update_yaxes(title_text="needle depth", type="category")
    return _layout(fig, title, height=320)


def answer_retention_figure(table: pd.DataFrame, title: str) -> go.Figure:
    """Two panels over layers from `retention.mean_retention`: the share of the answer's tokens × KV heads each
    method kept (top, 0–1) and the tokens each kept per layer (bottom), one colour per method."""
    fig = make_subplots(rows=2, cols=1, shared_xaxes=True, vertical_spacing=0.1, row_heights=[0.55, 0.45],
                        subplot_titles=("Share of the answer's tokens kept", "Tokens kept per layer"))
    for method, rows in table.groupby("method", sort=False):
        colour = method_colour(method)
        fig.add_trace(go.Scatter(x=rows["layer"], y=rows["answer_kept"], mode="lines+markers", name=method,
                                 line=dict(color=colour, width=2.5), legendgroup=method,
                                 hovertemplate="layer %{x}<br>%{y:.0%} of the answer kept<extra>" + method + "</extra>"),
                      row=1, col=1)
        fig.add_trace(go.Bar(x=rows["layer"], y=rows["budget"], name=method, marker_color=colour, legendgroup=method,
                             showlegend=False, hovertemplate="layer %{x}<br>%{y:.0f} tokens<extra>" + method + "</extra>"),
                      row=2, col=1)
    fig.update_yaxes(title_text="answer kept", range=[0, 1.05], tickformat=".0%", row=1, col=1)
    fig.update_yaxes(title_text="tokens", rangemode="tozero", row=2, col=1)
    fig.update_xaxes(title_text="layer", tickformat="d", row=2, col=1)
    _layout(fig, title, height=560, top=100, legend_y=1.08)
    fig.update_layout(barmode="group")
    return fig


# The Compare page's metrics table: readable headers with units, what each metric means (hover help) and how
# its numbers are shown (a printf format, or "percent" for shares in [0, 1]; None: as they are).
METRIC_COLUMNS: dict[str, tuple[str, str | None]] = {
    "method": ("The method and its parameters, as a spec string", None),
    "KV MiB": ("Bytes the compressed cache holds, in MiB (2²⁰ bytes)", "%.3f"),
    "KV share": ("Share of full KV's bytes: methods compare fairly only at the same share", "percent"),
    "kept": ("Kept fraction the method ran with: the asked one, or with match bytes the one that brings it to the "
             "asked share of the bytes", "%.3g"),
    "answer": ("✔ the known answer appears in the text, ✘ it does not, – no known answer", None),
    "same tokens": ("Share of generated tokens equal to full KV's, position by position", "percent"),
    "diverges at": ("Index of the first generated token that differs from full KV's; empty when none does", None),
    "ROUGE-L": ("Longest-common-subsequence F score against full KV's text, 0–1; a wrong key of the right length "
                "still scores high", "%.3f"),
    "KL nats": ("Mean KL(full ‖ method) of the next-token distributions, teacher-forced along full KV's answer; "
                  "0 = the same predictions (below 1e-6 shown as 0)", "%.4g"),
    "top-1": ("Share of steps whose most likely next token equals full KV's", "percent"),
    "prefill s": ("The forward pass over the prompt (plus, in context mode, the question through this cache)",
                    "%.3f"),
    "analysis s": ("Signal capture and the method's budget rule (0 for full KV)", "%.3f"),
    "compress s": ("Evicting, merging or quantising the cache", "%.3f"),
    "ms/token": ("Decoding time per generated token", "%.1f"),
}


TIMING_COLUMNS = ("prefill s", "analysis s", "compress s", "ms/token")
QUALITY_COLUMNS = tuple(c for c in METRIC_COLUMNS if c not in TIMING_COLUMNS)


def metrics_table(results: Sequence, columns: Sequence[str] = tuple(METRIC_COLUMNS)) -> pd.DataFrame:
    """One row per method result (full KV first, then by mean KL) with `columns` of METRIC_COLUMNS (all by
    default; QUALITY_COLUMNS or method + TIMING_COLUMNS for tables that fit a page); shares in [0, 1], KL below
    NOISE_FLOOR as 0."""
    def answer(score):
        return "–" if score is None else "✔" if score else "✘"

    rows = [{
        "method": r.method,
        "KV MiB": r.kv_bytes / 2**20,
        "KV share": r.kv_fraction,
        "kept": r.budget,
        "answer": answer(r.task_score),
        "same tokens": r.token_agreement,
        "diverges at": r.first_divergence,
        "ROUGE-L": r.rouge_l,
        "KL nats": 0.0 if r.kl_mean < NOISE_FLOOR else r.kl_mean,
        "top-1": r.top1_agreement,
        "prefill s": r.prefill_s,
        "analysis s": r.analysis_s,
        "compress s": r.compress_s,
        "ms/token": r.ms_per_token,
    } for r in sorted(results, key=lambda r: (r.method != "full", r.kl_mean))]
    return pd.DataFrame(rows, columns=list(METRIC_COLUMNS)).astype({"diverges at": "Int64"})[list(columns)]


def capture_overhead_figure(rows: pd.DataFrame, title: str) -> go.Figure:
    """Plain and analysis prefill seconds against prompt length (bars), and their ratio (line, right axis);
    `rows` has columns tokens, prefill_s, analysis_s, ratio."""
    fig = make_subplots(specs=[[{"secondary_y": True}]])
    labels = [str(t) for t in rows["tokens"]]
    fig.add_trace(go.Bar(x=labels, y=rows["prefill_s"], name="plain prefill", marker_color="#9e9e9e",
                         hovertemplate="%{x} tokens<br>%{y:.2f} s<extra>plain prefill</extra>"))
    fig.add_trace(go.Bar(x=labels, y=rows["analysis_s"], name="prefill with signal capture",
                         marker_color=SIGNAL_COLOURS["entropy"],
                         hovertemplate="%{x} tokens<br>%{y:.2f} s<extra>with capture</extra>"))
    fig.add_trace(go.Scatter(x=labels, y=rows["ratio"], name="ratio", mode="lines+markers",
                             line=dict(color="#222", width=2),
                             hovertemplate="%{x} tokens<br>× %{y:.3f}<extra>capture ÷ plain</extra>"), secondary_y=True)
    fig.update_xaxes(title_text="prompt tokens", type="category")
    fig.update_yaxes(title_text="seconds", rangemode="tozero", secondary_y=False)
    ratio_top = max(1.2, float(rows["ratio"].max()) * 1.05)
    fig.update_yaxes(title_text="capture ÷ plain", range=[0, ratio_top], tickformat=".2f", secondary_y=True)
    _layout(fig, title)
    fig.update_layout(barmode="group")
    return fig
