"""Budgets: how ZigZag, PyramidKV and uniform split one total KV budget over the layers, and the bytes each keeps."""

import numpy as np
import streamlit as st

from zigzag_viz.pipeline import budgets, capture
from zigzag_viz.presentation import benchmark_results, charts, ui
from zigzag_viz.evaluation.prompts import example_prompt
from zigzag_viz.presentation.views import AnalysisResult

st.set_page_config(page_title="Budgets · zigzag_viz", page_icon="🎚️", layout="wide")
ui.page_style()
presenting = ui.presenting(("budgets",))
st.title("Per-layer budgets")
if not presenting:
    st.caption("Analyse a prompt once; every slider below only re-runs the budget rules (pure arithmetic on the "
               "recorded signals), never the model.")

ELEMENT_SIZES = {"float32 (4 B)": 4, "bfloat16 / float16 (2 B)": 2, "8-bit (1 B)": 1}

ui.restore_from_link("budgets")
with st.sidebar:
    st.header("Analysis")
    backend = ui.backend_picker()
    model_name = ui.model_picker(backend)
    window = ui.shared(st.number_input, "Observation window w (tokens)", min_value=1, max_value=4096, key="window",
                             help="The last w queries score the tokens and the last w tokens are always kept; "
                                  "fixed by the analysis")
    deep = st.checkbox("Compute LMBO (deep, slower)", value=False,
                       help="Adds the output-view signal LMBO: about 1.2× a plain analysis (≈ 2 s for 1K tokens on SmolLM2, CPU)")

prompt = st.text_area("Prompt", value=example_prompt().text, height=150,
                      help="A pass key hidden in varied prose, by default")
ui.share_in_link()
if st.button("Analyze", type="primary"):
    result = ui.analyse(backend, model_name, prompt, int(window), deep)
    if result is not None:
        st.session_state["budgets_analysis"] = result
        st.session_state.pop("budgets_curves", None)

shown = ui.analysis_or_bundled("budgets_analysis", model_name, prompt, int(window))
if shown is None:
    st.info("Press **Analyze** to prefill the prompt once; then move the sliders.")
    st.stop()
st.session_state["budgets_shown"] = shown  # the analysis the sliders work on (the page's own, or the bundled one)


def use_choice(choice: dict) -> None:
    """Move the ρ slider and the signal to a calibrated choice (a button callback: runs before the widgets)."""
    st.session_state["budget_rho"] = float(choice["rho"])
    st.session_state["budget_signal"] = choice["signal"]


def calibrated_panel(model_name: str) -> None:
    """What `zigzag[rho=auto,signal=auto]` chose for this model, or a button that chooses it."""
    choice = ui.stored_zigzag_choice(backend, model_name)
    if choice is None:
        if st.button("Calibrate ρ and signal for this model", key="calibrate_zigzag",
                     help="Tries ρ ∈ {0, 0.2, …, 1} × {lmba, entropy, hidden} on generated prompts that no evaluation "
                          "uses and keeps the pair with the smallest mean KL to full KV at 20 % and 35 % kept "
                          "(about 30 s on SmolLM2, CPU); zigzag[rho=auto,signal=auto] then uses it"):
            choice = ui.calibrate_zigzag(backend, model_name)
        if choice is None:
            return
    ranked = sorted(choice["kl"].items(), key=lambda item: item[1])
    default = choice["kl"].get("0.2/lmba")
    st.caption(f"Calibrated for this model: **ρ = {float(choice['rho']):g}, signal = {choice['signal']}** (mean KL "
               f"to full KV {ranked[0][1]:.3f} nats on {choice['prompts']} generated prompts"
               + (f"; the paper's ρ = 0.2 with LMBA: {default:.3f}" if default is not None else "")
               + (". ρ = 1 is uniform: on this model ZigZag's shares did not help" if float(choice["rho"]) == 1.0 else "")
               + "). `zigzag[rho=auto,signal=auto]` uses it.")
    st.button("Use the calibrated ρ and signal", key="use_calibrated", on_click=use_choice, args=(choice,))


@st.fragment
def budget_panel() -> None:
    """Sliders and everything drawn from them: reruns alone, from the analysis kept in session_state."""
    result: AnalysisResult = st.session_state["budgets_shown"]
    analysis = result.analysis
    n, w, caps = analysis.n_tokens, analysis.window, analysis.layer_caps
    low, high = budgets.bounds(analysis.num_layers, n, w, caps)
    smallest = low.sum() / high.sum()
    st.caption(
        f"{result.model} on {result.device} · {n} prompt tokens · {analysis.num_layers} layers · window w = {w} "
        f"(fixed by the analysis) · smallest feasible kept fraction ≈ {smallest:.3f}"
    )
    signals = ["lmba", "entropy", "hidden"] + (["lmbo"] if analysis.lmbo_cos is not None else [])
    col_a, col_b, col_c = st.columns(3)
    with col_a:
        fraction = ui.shared(st.slider, "Kept fraction", min_value=0.05, max_value=1.0, step=0.01, key="kept_fraction",
                             help="Share of what full KV holds (every layer's own length) that the rules keep in all")
        if analysis.sliding_layers.any():
            st.caption(f"= {budgets.prompt_share(fraction, n, caps):.2f} of the prompt's tokens per layer on average: "
                       f"{int(analysis.sliding_layers.sum())} sliding-window layers hold at most {int(caps.min())} tokens")
        signal_name = st.radio("ZigZag signal", signals, horizontal=True,
                               help="Per-layer uncertainty s_l that ZigZag shares the budget by (lmbo needs the deep analysis)",
                               key="budget_signal")
    with col_b:
        rho = st.slider("ρ (ZigZag floor share)", 0.0, 1.0, 0.2, 0.01,
                        help="Share of the average budget every layer gets before the uncertainty split",
                        key="budget_rho")
        tau = ui.shared(st.slider, "τ for LMBA", min_value=0.50, max_value=0.99, step=0.01,
                        disabled=signal_name != "lmba", key="tau")
    with col_c:
        beta = st.slider("β (PyramidKV)", 1.0, 100.0, 20.0, 1.0, help="Last layer keeps B_avg/β", key="budget_beta")
        sizes = list(ELEMENT_SIZES)
        default = next((i for i, s in enumerate(sizes) if ELEMENT_SIZES[s] == result.bytes_per_element), 0)
        size = st.selectbox("KV element size", sizes, index=default,
                            help=f"{result.model} runs in {result.bytes_per_element} B per element here",
                            key="budget_element")
    threshold = capture.LMBO_THRESHOLD
    if signal_name == "lmbo":
        threshold = st.slider("LMBO cos threshold", 0.90, 0.999, capture.LMBO_THRESHOLD, 0.001, format="%.3f",
                              key="budget_lmbo_threshold")

    signal = analysis.layer_signal(signal_name, tau=tau, threshold=threshold)
    curves = ui.run_safely(lambda: budgets.budget_curves(signal, fraction, n, w, rho=rho, beta=beta, caps=caps),
                           "Budgets")
    if curves is None:
        st.session_state["budgets_curves"] = None
        return
    st.session_state["budgets_curves"] = {name: np.asarray(b).tolist() for name, b in curves.items()}
    bytes_table = charts.kv_bytes_table(curves, caps, result.num_kv_heads, result.head_dim, ELEMENT_SIZES[size])
    if presenting:
        ui.show_figure(charts.layer_budgets_figure(curves, signal, signal_name, caps, w), "budget per layer")
        measured = benchmark_results.zigzag_against_uniform(benchmark_results.results_folder(), result.model)
        st.markdown(f"Whether that keeps the answer is measured, not assumed. {measured or ''}")
        return
    left, right = st.columns([3, 2])
    with left:
        ui.show_figure(charts.layer_budgets_figure(curves, signal, signal_name, caps, w), "budget per layer")
    with right:
        ui.show_figure(charts.kv_bytes_figure(bytes_table["method"].tolist(), bytes_table["kv_bytes"].tolist()),
                       "KV bytes per method")
        st.caption(f"bytes = tokens × 2 (K, V) × {result.num_kv_heads} KV heads × {result.head_dim} dims × "
                   f"{ELEMENT_SIZES[size]} B, summed over layers")
        ui.show_table(bytes_table, "KV bytes")
        st.caption("Every rule spends the same total (Σ_l B_l = L·B_avg); they differ in which layers get it.")
    ui.show_table(charts.layer_budgets_table(curves, signal, signal_name, caps), "budgets per layer")


if not presenting:
    calibrated_panel(shown.model)  # outside the fragment: sliders never re-read it
budget_panel()
