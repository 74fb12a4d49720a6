"""Uncertainty: the per-layer signals behind ZigZag budgets on one prompt, and how they differ between models."""

import streamlit as st

from zigzag_viz.pipeline import capture
from zigzag_viz.presentation import charts, ui
from zigzag_viz.evaluation import retention
from zigzag_viz.evaluation.prompts import example_prompt

st.set_page_config(page_title="Uncertainty · zigzag_viz", page_icon="📈", layout="wide")
ui.page_style()
presenting = ui.presenting(("uncertainty",))
st.title("Layer uncertainty")
if not presenting:
    st.caption("How widely each layer's attention spreads (entropy, and LMBA: the smallest share of tokens holding τ of "
               "the window's attention), how much each layer changes the hidden state, and which prompt text each "
               "layer looks at.")

ui.restore_from_link("uncertainty")
with st.sidebar:
    st.header("Settings")
    backend = ui.backend_picker()
    model_name = ui.model_picker(backend)
    window = ui.shared(st.number_input, "Observation window w (tokens)", min_value=1, max_value=4096, key="window",
                             help="The last w queries are observed (clipped to the prompt length)")
    tau = ui.shared(st.slider, "τ for LMBA", min_value=0.50, max_value=0.99, step=0.01, key="tau",
                    help="Attention mass the minimum budget must cover")
    normalise = st.toggle("Normalise entropy by log #keys", value=False,
                          help="0 = all attention on one key, 1 = spread evenly over every visible key")
    deep = st.checkbox("Compute LMBO (deep, slower)", value=False,
                       help="Compresses each layer alone to a grid of budgets and compares its window output "
                            "with the full-cache output: about 1.2× a plain analysis (≈ 2 s for 1K tokens on SmolLM2, CPU)")
    stored = st.session_state.get("uncertainty")
    has_lmbo = stored is not None and stored.analysis.lmbo_cos is not None
    threshold = st.slider("LMBO cos threshold", 0.90, 0.999, 0.99, 0.001, format="%.3f", disabled=not (deep or has_lmbo),
                          help="Smallest budget whose layer output keeps this cosine with the full-cache output")

prompt = st.text_area("Prompt", value=example_prompt().text, height=180,
                      help="A pass key hidden in varied prose, by default")

ui.share_in_link()
if st.button("Analyze", type="primary"):
    result = ui.analyse(backend, model_name, prompt, int(window), deep)
    if result is not None:
        st.session_state["uncertainty"] = result

result = ui.analysis_or_bundled("uncertainty", model_name, prompt, int(window))
if result is None:
    st.info("Press **Analyze** to prefill the prompt once and record every layer's signals.")
    st.stop()

analysis = result.analysis
n = analysis.n_tokens
sliding = analysis.sliding_layers
st.caption(
    f"{result.model} on {result.device} · {n} prompt tokens · {analysis.num_layers} layers · "
    f"{analysis.entropy.shape[1]} query heads in {int(analysis.kv_group.max()) + 1} KV groups · window {analysis.window} · "
    f"prefill with signal capture {result.prefill_s:.2f} s"
    + (f" · {int(sliding.sum())} sliding-window layers (◂sw)" if sliding.any() else "")
)
lmbo = analysis.lmbo(threshold) if analysis.lmbo_cos is not None else None
if deep and lmbo is None:
    st.info("LMBO was not computed for this analysis: press **Analyze** again with the box ticked.")

lmba_heads = analysis.lmba(tau)
hidden = analysis.layer_signal("hidden")
left, right = st.columns([2, 3])
with left:
    ui.show_figure(charts.entropy_heatmap(analysis.entropy_norm if normalise else analysis.entropy,
                                          analysis.kv_group, normalised=normalise), "attention entropy")
with right:
    ui.show_figure(charts.layer_curves_figure(lmba_heads, hidden, tau, lmbo=lmbo, threshold=threshold if lmbo is not None else None),
                   "layer curves")

if presenting:
    lmba = analysis.layer_signal("lmba", tau)
    st.markdown(f"On {result.model}, for this {n}-token prompt, LMBA runs from **{lmba.min():.0%}** of the tokens "
                f"(layer {int(lmba.argmin())}) to **{lmba.max():.0%}** (layer {int(lmba.argmax())}).")
    st.stop()

edges = capture.bin_edges(n, capture.MAX_BINS)
texts = capture.bin_texts(result.token_texts, edges)
st.subheader("Which prompt text each layer attends to")
st.caption(f"{n} tokens in {len(edges) - 1} bins; hover a cell for its text. The last {analysis.window} tokens are "
           "the observing window.")
ui.show_figure(charts.token_importance_figure(capture.bin_columns(analysis.token_importance(), edges), edges, texts,
                                              sliding=sliding), "token importance")
ui.show_figure(charts.hidden_change_map_figure(capture.bin_columns(analysis.hidden_change, edges, reduce="mean"),
                                               edges, texts, sliding=sliding), "hidden change map")

st.subheader("Per-layer signals")
ui.show_table(charts.layer_signals_table(analysis.entropy, analysis.entropy_norm, lmba_heads, hidden,
                                        analysis.layer_caps, n, lmbo=lmbo), "layer signals")

st.subheader("Why ZigZag's allocation helps or hurts on this model")
st.caption("ZigZag (LMBA, ρ = 0.2) and uniform budgets, both with SnapKV selection at the same kept fraction, on "
           "generated pass-key prompts (four template families, the key at 20 %, 50 % and 80 % depth): per layer, the "
           "share of the key's tokens each one's KV heads kept, and the tokens each gave the layer. Where ZigZag keeps "
           "less of the key than uniform, its budget there is usually smaller.")
first, second, third = st.columns(3)
explain_fraction = ui.shared(first.slider, "Kept fraction", min_value=0.05, max_value=1.0, step=0.01, key="kept_fraction")
explain_count = second.number_input("Prompts", min_value=2, max_value=12, value=6, key="explain_count",
                                    help="About 512 tokens each; a few seconds per prompt on SmolLM2 (CPU)")
explain_mode = ui.shared(third.radio, "Setting", ["aware", "context"], horizontal=True, key="mode",
                           help="aware: compress after the question; context: compress, then ask")
if st.button("Explain", key="explain"):
    explained = ui.explain_allocation(backend, model_name, explain_fraction, int(explain_count), explain_mode,
                                      int(window))
    if explained is not None:
        st.session_state["explanation"] = (model_name, explain_fraction, explain_mode, explained)
if st.session_state.get("explanation") is not None:
    explained_model, explained_fraction, explained_mode, explained = st.session_state["explanation"]
    st.markdown(retention.retention_verdict(explained))
    ui.show_figure(charts.answer_retention_figure(
        explained, f"{explained_model}, {explained_fraction:.0%} kept, {explained_mode} setting: the pass key per layer"),
        "answer kept per layer")
    ui.show_table(explained, "answer kept per layer")

st.subheader("Across models")
st.caption("The same prompt and window on each model, LMBA drawn against relative depth: where the zig-zag sits "
           "differs from model to model.")
choices = ui.model_names(backend)
models = st.multiselect("Models to compare", choices, default=[m for m in ui.default_comparison_models() if m in choices],
                        max_selections=4)
if st.button("Compare models"):
    if not models:
        st.warning("Pick at least one model.")
    else:
        found = {}
        bar = st.progress(0.0, text="analysing")
        for index, name in enumerate(models):
            bar.progress(index / len(models), text=f"{name} ({index + 1} of {len(models)})")
            other = ui.analyse(backend, name, prompt, int(window), False)
            if other is not None:
                found[name] = other
        bar.empty()
        if found:
            st.session_state["uncertainty_models"] = found

found = st.session_state.get("uncertainty_models")
if found:
    ui.show_figure(charts.model_lmba_figure({name: r.analysis.layer_signal("lmba", tau) for name, r in found.items()}, tau,
                                            sliding={name: r.analysis.sliding_layers for name, r in found.items()}),
                   "LMBA by model")
    st.caption(" · ".join(f"{name}: {r.n_tokens} tokens, {r.analysis.num_layers} layers" for name, r in found.items()))
