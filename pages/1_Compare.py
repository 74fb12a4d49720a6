"""Compare: full KV against compressed caches on one prompt, with the layer signals behind the budgets."""

import streamlit as st

from zigzag_viz import charts, ui
from zigzag_viz.budgets import budget_curves
from zigzag_viz.compare import compare
from zigzag_viz.prompts import example_prompt

st.set_page_config(page_title="Compare · zigzag_viz", page_icon=":material/compare:", layout="wide")
ui.page_style()
st.title("Full KV vs compressed KV")

example = example_prompt()
with st.sidebar:
    st.header("Settings")
    model_name = ui.model_picker()
    budget = st.slider("Kept fraction of the prompt", 0.05, 1.0, 0.3, 0.05,
                       help="Average share of the prompt's tokens each layer keeps")
    window = st.number_input("Observation window w (tokens)", min_value=1, max_value=512, value=32,
                             help="The last w queries score the tokens; the last w tokens are always kept")
    tau = st.slider("τ for LMBA", 0.50, 0.99, 0.90, 0.01, help="Attention mass the minimum budget must cover")
    max_new_tokens = st.number_input("Max new tokens", min_value=1, max_value=256, value=24)

methods = ui.method_picker(["full", "zigzag", "pyramid", "uniform"])
prompt = st.text_area("Prompt", value=example.text, height=200, help="A pass key hidden in varied prose, by default")
answer = st.text_input("Known answer (optional, for the task score)", value=example.answer)

if st.button("Run", type="primary"):
    if not methods:
        st.warning("Pick at least one method.")
    elif not prompt.strip():
        st.warning("The prompt is empty: type some text or keep the example.")
    elif not model_name:
        st.warning("Type a model folder or a cached model id.")
    else:
        with st.status(f"Running {len(methods)} method(s) on {model_name}…", expanded=True) as status:
            bar = st.progress(0.0, text="loading the model")
            loaded = ui.run_safely(lambda: ui.cached_model(model_name), "Loading the model")
            result = loaded and ui.run_safely(
                lambda: compare(loaded, prompt, methods, budget, int(max_new_tokens), int(window),
                                answer=answer.strip() or None, progress=lambda f, m: bar.progress(f, text=m)),
                "Comparison",
            )
            if result:
                texts = {r.method: loaded.token_texts(r.token_ids) for r in result.results}
                st.session_state["comparison"] = (result, texts, str(loaded.device))
                status.update(label=f"Done: {result.n_tokens} prompt tokens, {len(methods)} method(s)", state="complete")
            else:
                status.update(label="Stopped: see the message below", state="error", expanded=True)

if "comparison" not in st.session_state:
    st.info("Press **Run** to prefill the prompt, compress the cache with each method and decode beside full KV.")
    st.stop()

result, token_texts, device = st.session_state["comparison"]
analysis = result.analysis
st.caption(
    f"{result.model} on {device} · {result.n_tokens} prompt tokens · kept fraction {result.budget:g} · "
    f"window {result.window} · prefill with signal capture {result.prefill_s:.2f} s"
)

st.subheader("Answers side by side")
per_row = 4
for start in range(0, len(result.results), per_row):
    columns = st.columns(per_row)
    for column, row in zip(columns, result.results[start : start + per_row]):
        colour = charts.method_colour(row.method)
        with column:
            st.markdown(f"<div class='zz-head' style='--c:{colour}'>{row.method}</div>", unsafe_allow_html=True)
            st.markdown(charts.divergence_html(token_texts[row.method], row.first_divergence, colour),
                        unsafe_allow_html=True)
            diverged = "same as full" if row.first_divergence is None else f"diverges at token {row.first_divergence}"
            score = "" if row.task_score is None else (" · answer ✔" if row.task_score else " · answer ✘")
            st.caption(f"KV {row.kv_bytes / 2**20:.2f} MiB ({row.kv_fraction:.0%}) · agreement "
                       f"{row.token_agreement:.0%} · {diverged}{score}")

ui.show_table(result.table(), "comparison")
ui.show_figure(charts.kv_bytes_figure([r.method for r in result.results], [r.kv_bytes for r in result.results]),
               "KV bytes")

st.subheader("Why these budgets")
lmba = analysis.layer_signal("lmba", tau)
ui.show_figure(charts.signals_figure(analysis.layer_signal("entropy"), lmba, analysis.layer_signal("hidden"), tau),
               "layer signals")
curves = ui.run_safely(lambda: budget_curves(lmba, result.budget, analysis.n_tokens, analysis.window), "Budget curves")
if curves:
    ui.show_figure(charts.budget_figure(curves, analysis.n_tokens), "budget curves")
