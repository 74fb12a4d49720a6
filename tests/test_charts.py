"""Pure chart builders and the KV-bytes arithmetic of the Uncertainty and Budgets pages."""

import re

import numpy as np
import pytest

from zigzag_viz.pipeline import capture
from zigzag_viz.presentation import charts


def test_kv_cache_bytes_is_tokens_times_two_heads_dims_and_element_size():
    # SmolLM2 shapes: 3 KV heads of 64 dims; float32
    assert charts.kv_cache_bytes([10, 20, 30], num_kv_heads=3, head_dim=64, bytes_per_element=4) == 60 * 2 * 3 * 64 * 4
    assert charts.kv_cache_bytes(np.array([0, 0]), 8, 128, 2) == 0
    with pytest.raises(ValueError):
        charts.kv_cache_bytes([-1, 2], 1, 1, 1)


def test_kv_bytes_table_reports_share_of_full():
    curves = {"zigzag": np.array([50, 150]), "uniform": np.array([100, 100])}
    table = charts.kv_bytes_table(curves, caps=[400, 400], num_kv_heads=2, head_dim=16, bytes_per_element=2)
    assert list(table["method"]) == ["full", "zigzag", "uniform"]
    assert list(table["tokens_held"]) == [800, 200, 200]
    assert table["kv_bytes"][0] == 800 * 2 * 2 * 16 * 2
    assert list(table["fraction_of_full"]) == [1.0, 0.25, 0.25]


def test_entropy_heatmap_hover_carries_the_kv_group():
    entropy = np.arange(12, dtype=float).reshape(3, 4)
    fig = charts.entropy_heatmap(entropy, np.array([0, 0, 1, 1]))
    trace = fig.data[0]
    assert np.asarray(trace.z).shape == (3, 4)
    assert np.asarray(trace.customdata).tolist() == [[0, 0, 1, 1]] * 3
    assert "KV group" in trace.hovertemplate and "nats" in trace.hovertemplate
    assert "normalised" in charts.entropy_heatmap(entropy / 12, np.zeros(4), normalised=True).layout.title.text


def test_layer_curves_draw_band_mean_lmbo_and_hidden():
    lmba = np.array([[0.1, 0.3], [0.2, 0.4], [0.5, 0.5]])
    fig = charts.layer_curves_figure(lmba, np.array([0.01, 0.02, 0.03]), 0.9)
    names = [t.name for t in fig.data]
    assert any("min–max" in (n or "") for n in names)
    mean = next(t for t in fig.data if (t.name or "").startswith("LMBA mean"))
    assert np.allclose(mean.y, [0.2, 0.3, 0.5])
    with_lmbo = charts.layer_curves_figure(lmba, np.zeros(3), 0.9, lmbo=np.array([0.1, 1.0, 0.5]), threshold=0.99)
    assert len(with_lmbo.data) == len(fig.data) + 1


def test_token_map_bins_text_and_sliding_layers():
    n = 1000
    rng = np.random.default_rng(0)
    importance = rng.random((3, n))
    edges = capture.bin_edges(n, 512)
    texts = capture.bin_texts([f"t{i} " for i in range(n)], edges)
    binned = capture.bin_columns(importance, edges)
    fig = charts.token_importance_figure(binned, edges, texts, sliding=np.array([True, False, False]))
    trace = fig.data[0]
    assert np.asarray(trace.z).shape == (3, len(edges) - 1)
    custom = np.asarray(trace.customdata)
    assert custom.shape == (3, len(edges) - 1, 3)
    assert custom[1, 0, 1] == texts[0] and custom[0, 0, 0] == "0–1"
    # colour is log10 of each layer's share: rows of 10**z sum to 1
    assert np.allclose((10 ** np.asarray(trace.z, dtype=float)).sum(axis=1), 1.0)
    assert fig.layout.yaxis.ticktext[0].endswith("◂sw") and not fig.layout.yaxis.ticktext[1].endswith("◂sw")
    with pytest.raises(ValueError):
        charts.token_map_figure(binned, edges, texts[:-1], "x", "y")


def test_hidden_change_map_keeps_values_and_blank_for_zero_importance():
    edges = np.array([0, 2, 4])
    fig = charts.hidden_change_map_figure(np.array([[0.1, 0.2], [0.3, 0.4]]), edges, ["ab", "cd"])
    assert np.allclose(10 ** np.asarray(fig.data[0].z), [[0.1, 0.2], [0.3, 0.4]])
    assert np.asarray(fig.data[0].customdata)[1, 1, 2] == "0.4"  # the hover shows the value, not its log
    share = charts.token_importance_figure(np.array([[1.0, 0.0]]), edges, ["ab", "cd"])
    assert np.isnan(np.asarray(share.data[0].z, dtype=float)[0, 1])


def test_model_lmba_figure_uses_relative_depth_and_model_colours():
    fig = charts.model_lmba_figure({"smollm2": np.linspace(0.5, 0.1, 30), "gemma3": np.linspace(0.2, 0.3, 18)}, 0.9,
                                   sliding={"gemma3": np.arange(18) % 6 != 5})
    models = fig.data[:2]
    assert [t.line.color for t in models] == [charts.model_colour("smollm2"), charts.model_colour("gemma3")]
    assert charts.model_colour("smollm2") != charts.model_colour("gemma3")
    assert "sliding" in fig.data[2].name  # legend entry explaining the open markers
    for trace in models:
        assert trace.x[0] == 0 and trace.x[-1] == 1
    assert "circle-open" in fig.data[1].marker.symbol and "circle-open" not in fig.data[0].marker.symbol


def test_layer_budgets_figure_and_table_use_method_colours():
    curves = {"zigzag": np.array([100, 50, 30]), "pyramid": np.array([120, 40, 20]), "uniform": np.array([60, 60, 60])}
    signal = np.array([0.5, 0.3, 0.2])
    fig = charts.layer_budgets_figure(curves, signal, "lmba", np.array([400, 400, 128]), 32)
    colours = {t.name: t.line.color for t in fig.data if t.type == "scatter"}
    for method in curves:
        assert colours[method] == charts.method_colour(method)
    assert np.allclose(fig.data[0].y, signal / signal.sum())
    table = charts.layer_budgets_table(curves, signal, "lmba", np.array([400, 400, 128]))
    assert list(table.columns) == ["layer", "lmba", "share_u", "cap", "zigzag", "pyramid", "uniform"]
    assert table["zigzag"].tolist() == [100, 50, 30]


def test_layer_signals_table_columns_and_sliding():
    table = charts.layer_signals_table(np.ones((2, 3)), np.full((2, 3), 0.5), np.array([[0.1, 0.2, 0.3]] * 2),
                                       np.array([0.01, 0.02]), np.array([100, 50]), 100, lmbo=np.array([0.2, 1.0]))
    assert list(table.columns) == ["layer", "entropy", "entropy_norm", "lmba", "lmba_min_head", "lmba_max_head",
                                   "hidden_change", "lmbo", "cap", "sliding"]
    assert table["sliding"].tolist() == [False, True]
    assert table["lmba"].tolist() == pytest.approx([0.2, 0.2])


def test_comparison_figures_use_method_colours_and_mark_the_answer():
    maps = {"zigzag": np.random.default_rng(0).random((4, 20)), "uniform": np.ones((4, 20))}
    edges = np.arange(21)
    fig = charts.kept_map_figure(maps, edges, [f"t{i}" for i in range(20)], answer_bins=[5, 6, 7, 12])
    assert [t.type for t in fig.data] == ["heatmap", "heatmap"]
    assert all(t.zmin == 0 and t.zmax == 1 for t in fig.data)
    assert len(fig.layout.shapes) == 2 * 2  # two runs of answer bins on each of the two panels
    curves = charts.agreement_curves_figure({"zigzag": ([0.0, 0.5, 1.0], [1.0, 1.0, 0.0])})
    running = curves.data[1].y
    assert list(running) == pytest.approx([1.0, 1.0, 2 / 3])
    assert curves.data[0].line.color == charts.method_colour("zigzag")
    labelled = charts.agreement_curves_figure({"zigzag": ([0.0, 0.5, 1.0], [1.0, 1.0, 0.0])}, [" The", "\n", "<b>"])
    axis = labelled.layout.xaxis2
    assert list(axis.tickvals) == [0, 1, 2] and list(axis.ticktext) == ["·The", "⏎", "&lt;b&gt;"]  # the tokens, as text
    bars = charts.layer_budget_bars_figure({"uniform": [3, 3], "zigzag[rho=0.5]": [5, 1]}, caps=[8, 8])
    assert [t.marker.color for t in bars.data[:2]] == [charts.method_colour("uniform"), charts.method_colour("zigzag[rho=0.5]")]


def test_variants_get_their_own_shade_of_the_method_colour():
    assert charts.method_colour("zigzag") == charts.METHOD_COLOURS["zigzag"]
    variants = ["zigzag[rho=0.5]", "zigzag+kivi", "zigzag[select=hybrid]"]
    colours = {charts.method_colour(v) for v in variants}
    assert charts.METHOD_COLOURS["zigzag"] not in colours
    assert charts.method_colour("zigzag[rho=0.5]") == charts.method_colour("Zigzag[rho=0.5]")
    assert all(len(c) == 7 and c.startswith("#") for c in colours)


def _lab(colour: str) -> np.ndarray:
    """CIE L*a*b* (D65) of an sRGB colour #rrggbb."""
    rgb = np.array([int(colour[i : i + 2], 16) / 255 for i in (1, 3, 5)])
    linear = np.where(rgb > 0.04045, ((rgb + 0.055) / 1.055) ** 2.4, rgb / 12.92)
    xyz = np.array([[0.4124, 0.3576, 0.1805], [0.2126, 0.7152, 0.0722], [0.0193, 0.1192, 0.9505]]) @ linear
    xyz = xyz / np.array([0.95047, 1.0, 1.08883])  # relative to the D65 white
    f = np.where(xyz > 0.008856, np.cbrt(xyz), 7.787 * xyz + 16 / 116)
    return np.array([116 * f[1] - 16, 500 * (f[0] - f[1]), 200 * (f[1] - f[2])])


def test_every_method_and_signal_colour_stays_distinct_from_every_other():
    """ΔE*76 ≥ 25 between any two of the colours drawn side by side (methods, and the signals beside budgets);
    every registered method has a colour of its own."""
    from zigzag_viz.methods import METHODS

    assert set(METHODS) <= set(charts.METHOD_COLOURS)
    colours = {**charts.METHOD_COLOURS, **{f"signal {k}": v for k, v in charts.SIGNAL_COLOURS.items()}}
    names = list(colours)
    for i, first in enumerate(names):
        for second in names[i + 1 :]:
            distance = float(np.linalg.norm(_lab(colours[first]) - _lab(colours[second])))
            assert distance >= 25, f"{first} {colours[first]} and {second} {colours[second]}: ΔE {distance:.1f}"


def test_a_comparison_as_one_html_page_holds_everything_and_plotly_once(tiny):
    from zigzag_viz.evaluation.prompts import passkey_prompt
    from zigzag_viz.evaluation.runner import compare
    from zigzag_viz.presentation.report import comparison_html
    from zigzag_viz.presentation.views import comparison_result

    prompt = passkey_prompt(n_sentences=10, seed=2)
    shown = comparison_result(tiny, compare(tiny, prompt.text, "full,zigzag,uniform", budget=0.4, max_new_tokens=4,
                                            window=8, answer=prompt.answer))
    page = comparison_html(shown)
    assert page.startswith("<!DOCTYPE html>") and page.count("Plotly.newPlot") == 4  # curves, map, per layer, bytes
    assert page.count("plotly.js v") == 1  # the library inlined once, nothing fetched
    assert not re.search(r"<script[^>]*\ssrc=", page) and not re.search(r"<link[^>]*href=", page)
    for piece in (shown.comparison.verdict(), "zigzag", "uniform", "KL nats", "Answers side by side"):
        assert piece.replace("“", "").replace("”", "")[:20] in page.replace("“", "").replace("”", "")


def test_the_progress_line_says_the_time_elapsed_and_estimates_what_is_left():
    from zigzag_viz.presentation.views import progress_text

    assert progress_text("prefill", 0.05, 3.2) == "prefill · 3 s elapsed"  # too early to estimate
    assert progress_text("zigzag at 0.2: compress and decode", 0.25, 10.0) == \
        "zigzag at 0.2: compress and decode · 10 s elapsed · about 30 s left"
    assert progress_text("done", 1.0, 40.0) == "done · 40 s elapsed"
