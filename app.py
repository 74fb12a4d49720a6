"""zigzag_viz home page: what the workbench shows and where to start. Pages live in pages/."""

import streamlit as st

from zigzag_viz.evaluation.prompts import example_prompt
from zigzag_viz.pipeline import budgets
from zigzag_viz.presentation import benchmark_results, bundled, charts

INTRO = """
**Why does a language model need a different KV-cache budget in every layer, and what does compression do to
its answers?**

A KV cache keeps the keys and values of every token in every layer. Most compression methods keep the
same number of tokens everywhere. **ZigZagKV** (arXiv 2412.09036) measures how *uncertain* each layer is —
how widely its attention spreads (entropy, and the minimum share of tokens that holds 90 % of the
attention, **LMBA**) and how much it changes the hidden state — and gives uncertain layers more of the budget.
Across depth that need zig-zags, and it differs between models.

This workbench runs a real model (SmolLM2-135M-Instruct, embedded, offline), captures those signals during
the prefill at the cost of plain attention, evicts the cache for real, and decodes each compressed cache
beside full KV.
"""

STEPS = """
1. Pick the model in the sidebar (`smollm2` is embedded; `tiny` is a 4-layer random Llama for a quick look).
2. Pick a bundled prompt (a pass key or a name hidden in prose, a question over an article) or paste your
   own, then pick methods and a kept fraction.
3. Press **Run**: the answers side by side with the first token where a compressed answer leaves the full
   one highlighted, KL and top-1 agreement per step, and the kept-token map: which prompt tokens each layer
   kept, with the known answer boxed, so you see in which layers a method dropped the needle.
4. Switch the setting between *aware* (the question is compressed with the context) and *context* (the
   question arrives after compression, as in a chat where the document comes first).

The same library drives the command line: `.venv/bin/zigzag-viz compare --help`.
"""


st.set_page_config(page_title="zigzag_viz", page_icon="🧭", layout="wide")
st.title("zigzag_viz")
st.markdown(INTRO)

found = bundled.bundled_analysis("smollm2", example_prompt().text, bundled.SETTINGS["window"])
if found is not None:
    made, result = found
    analysis = result.analysis
    lmba = analysis.layer_signal("lmba")
    curves = budgets.budget_curves(lmba, bundled.SETTINGS["budget"], analysis.n_tokens, analysis.window,
                                   caps=analysis.layer_caps)
    st.plotly_chart(charts.layer_budgets_figure(curves, lmba, "lmba", analysis.layer_caps, analysis.window).update_layout(
        title=f"SmolLM2, bundled pass-key prompt ({analysis.n_tokens} tokens): LMBA per layer and the budgets at "
              f"{bundled.SETTINGS['budget']:.0%} kept"),
        width="stretch", config={"displaylogo": False})
    measured = benchmark_results.zigzag_against_uniform(benchmark_results.results_folder(), "smollm2")
    st.caption("Uncertain layers get more of the budget under ZigZag; PyramidKV gives early layers more; uniform gives "
               "every layer the same. Whether that keeps the answer is an empirical question. "
               + (measured or "") + " The Uncertainty page's **Explain** shows, layer by layer, where the answer is "
               "kept or lost.")
st.page_link("pages/2_Uncertainty.py", label="**Present the story**: five steps, large type, controls hidden "
             "(also `?present=1` on any page)", query_params={"present": "1", "step": "uncertainty"})
st.subheader("Start here")
PAGES = [
    ("pages/1_Compare.py", "**Compare**: full KV against compressed caches, answers side by side, what each layer kept"),
    ("pages/2_Uncertainty.py", "**Uncertainty**: entropy, LMBA and hidden change per layer, and why ZigZag helps or hurts"),
    ("pages/3_Budgets.py", "**Budgets**: move ρ, τ, β and the kept fraction; the budgets redraw without the model"),
    ("pages/4_Runs.py", "**Runs**: stored sweeps: score against kept fraction, where the needle is lost"),
    ("pages/5_Benchmarks.py", "**Benchmarks**: what the committed benchmarks measured, and on what machine"),
]
for path, label in PAGES:  # text only: no icon font or emoji font is needed offline
    st.page_link(path, label=label)
st.markdown(STEPS)
