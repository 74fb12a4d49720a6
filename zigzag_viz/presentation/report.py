"""A comparison as one self-contained HTML page (settings, verdict, answers, metrics, charts) that opens offline:
plotly.js is inside the file, nothing is fetched.

    Path("comparison.html").write_text(comparison_html(shown))
"""

from __future__ import annotations

import html
import time

import pandas as pd

from ..pipeline.capture import bins_of
from . import charts
from .views import ComparisonResult

STYLE = """
body {font-family: system-ui, sans-serif; margin: 2rem auto; max-width: 1200px; padding: 0 1rem; color: #222}
h1 {margin-bottom: 0.2rem} .settings {color: #666} .verdict {font-weight: 600; margin: 1rem 0}
.answers {display: grid; grid-template-columns: repeat(auto-fill, minmax(260px, 1fr)); gap: 1rem}
.zz-out {font-family: ui-monospace, monospace; font-size: 0.9rem; white-space: pre-wrap; border-radius: 6px;
         padding: 0.6rem; background: rgba(128,128,128,0.08); min-height: 3rem}
.zz-head {font-weight: 600; border-left: 6px solid var(--c); padding-left: 0.5rem; margin-bottom: 0.3rem}
.note {color: #666; font-size: 0.85rem}
table {border-collapse: collapse; font-size: 0.85rem; margin: 1rem 0} th, td {border: 1px solid #ddd; padding: 4px 8px}
th {background: #f5f5f5; text-align: left}
"""


def _figures(shown: ComparisonResult) -> list:
    result = shown.comparison
    rows = [r for r in result.results if r.method != "full"]
    figures = [charts.agreement_curves_figure({r.method: (r.kl_curve, r.top1_curve) for r in rows},
                                              shown.answer_tokens.get("full"))]
    evicting = [r.method for r in result.results if r.kept_map.size and r.kept_map.min() < 1][:4]
    if evicting:
        edges, texts, binned = result.binned_kept_maps()
        figures.append(charts.kept_map_figure({m: binned[m] for m in evicting}, edges, texts,
                                              bins_of(result.answer_positions, edges), result.analysis.sliding_layers))
    figures.append(charts.layer_budget_bars_figure({r.method: r.layer_budgets for r in rows},
                                                   result.analysis.layer_caps))
    figures.append(charts.kv_bytes_figure([r.method for r in result.results], [r.kv_bytes for r in result.results]))
    return figures


def comparison_html(shown: ComparisonResult) -> str:
    """The whole comparison as one HTML document with plotly.js inlined once."""
    result = shown.comparison
    settings = (f"{result.model} on {shown.device} · {result.n_tokens} prompt tokens ({result.n_context} compressed) · "
                f"{result.mode} setting · kept fraction {result.budget:g} · window {result.window}"
                + (f" · known answer “{result.answer}”" if result.answer else "") + f" · {time.strftime('%Y-%m-%d %H:%M')}")
    answers = []
    for row in result.results:
        colour = charts.method_colour(row.method)
        diverged = "same as full" if row.first_divergence is None else f"diverges at token {row.first_divergence}"
        answers.append(f"<div><div class='zz-head' style='--c:{colour}'>{html.escape(row.method)}</div>"
                       f"{charts.divergence_html(shown.answer_tokens[row.method], row.first_divergence, colour)}"
                       f"<div class='note'>KV {row.kv_bytes / 2**20:.2f} MiB ({row.kv_fraction:.0%}) · KL "
                       f"{row.kl_mean:.3f} · {diverged}</div></div>")
    table = charts.metrics_table(result.results)
    table["diverges at"] = [("" if value is pd.NA else int(value)) for value in table["diverges at"]]
    table_html = table.to_html(index=False, na_rep="", float_format=lambda v: f"{v:.4g}", escape=True)
    legend = "".join(f"<li><b>{html.escape(name)}</b>: {html.escape(text)}</li>"
                     for name, (text, _) in charts.METRIC_COLUMNS.items())
    plots = [figure.to_html(full_html=False, include_plotlyjs=index == 0)
             for index, figure in enumerate(_figures(shown))]
    question = f"<p class='note'>Question fed after compression: {html.escape(result.question)}</p>" if result.question else ""
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>zigzag_viz comparison: {html.escape(result.model)}</title>
<style>{STYLE}</style></head><body>
<h1>Full KV vs compressed KV</h1>
<div class="settings">{html.escape(settings)}</div>{question}
<div class="verdict">{html.escape(result.verdict())}</div>
<h2>Answers side by side</h2><div class="answers">{''.join(answers)}</div>
<h2>Metrics</h2>{table_html}<ul class="note">{legend}</ul>
<h2>Charts</h2>{''.join(plots)}
</body></html>
"""
