"""zigzag_viz home page: what the workbench shows and where to start. Pages live in pages/."""

import streamlit as st

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
st.subheader("Start here")
st.page_link("pages/1_Compare.py", label="**Compare**: one prompt, full KV against compressed caches: answers side by "
             "side, and which tokens each layer kept",
             icon="⚖️")
st.page_link("pages/2_Uncertainty.py", label="**Uncertainty**: entropy, LMBA, hidden change and LMBO per layer, "
             "where each layer looks, and how models differ",
             icon="📈")
st.page_link("pages/3_Budgets.py", label="**Budgets**: move ρ, τ, β and the kept fraction; ZigZag, PyramidKV and "
             "uniform budgets and their KV bytes redraw without the model",
             icon="🎚️")
st.page_link("pages/4_Runs.py", label="**Runs**: stored sweeps of generated tasks (made with zigzag-viz sweep): score against "
             "kept fraction per method, where the needle is lost by depth and length, the smallest lossless fraction",
             icon="🗂️")
st.page_link("pages/5_Benchmarks.py", label="**Benchmarks**: what the committed benchmarks measured (capture overhead, "
             "load time, app latency, server load, quality studies), each with the machine it ran on", icon="⏱️")
st.markdown(STEPS)
