"""Compare: full KV against compressed caches on one prompt: answers, metrics, and which tokens each layer kept."""

import json
import re
from pathlib import Path

import streamlit as st

from zigzag_viz.presentation import bundled, charts, links, saved, ui
from zigzag_viz.pipeline.budgets import budget_curves, prompt_share
from zigzag_viz.pipeline.capture import bins_of
from zigzag_viz.evaluation.prompts import EXAMPLES
from zigzag_viz.evaluation.store import check_run_name
from zigzag_viz.presentation.report import comparison_html
from zigzag_viz.presentation.views import ComparisonResult, changed_settings
from zigzag_viz.serving.api import CompareOptions

OWN_PROMPT = "type your own"
MODES = {
    "aware": "aware: compress after context and question (SnapKV's setting)",
    "context": "context: compress the context, then feed the question through the compressed cache (kvpress's setting)",
}

st.set_page_config(page_title="Compare · zigzag_viz", page_icon="⚖️", layout="wide")
ui.page_style()
presenting = ui.presenting(("answers", "why"))
st.title("Full KV vs compressed KV")


def restore(values: dict) -> None:
    """Put a link's or a saved comparison's settings into the widgets before they are drawn."""
    if "methods" in values:  # plain method names to the picker, variants and compositions to the extra specs
        names, extra = links.split_methods(values["methods"])
        if names or extra:
            st.session_state["methods"], st.session_state["methods_extra"] = names, extra
    if "max_new_tokens" in values and 1 <= values["max_new_tokens"] <= 256:
        st.session_state["max_new_tokens"] = values["max_new_tokens"]
    if "match_bytes" in values:
        st.session_state["match_bytes"] = values["match_bytes"]
    if isinstance(values.get("prompt"), dict):
        st.session_state["prompt_source"] = OWN_PROMPT
        for field in ("prompt", "question", "answer"):
            st.session_state[f"{field}_{OWN_PROMPT}"] = values["prompt"][field]
    elif values.get("prompt") in EXAMPLES:
        st.session_state["prompt_source"] = values["prompt"]


def reopen(name: str) -> None:
    """Show the comparison saved as run `name` with the settings that made it (a message when it cannot)."""
    found = ui.run_safely(lambda: saved.reopen(ui.runs_root() / check_run_name(name)), "Opening the saved comparison")
    if found is None:
        return
    shown, options = found
    example = next((key for key, make in EXAMPLES.items() if make().text == options.prompt), None)
    prompt = example if example and not options.question else {
        "prompt": options.prompt, "question": options.question or "", "answer": options.answer or ""}
    restore({"methods": options.methods, "max_new_tokens": options.max_new_tokens,
             "match_bytes": options.match_bytes, "prompt": prompt})
    ui.restore_shared({"model": options.model, "kept_fraction": options.budget, "window": options.window,
                       "mode": options.mode})
    if example:
        st.session_state.update({f"prompt_{example}": options.prompt, f"question_{example}": "",
                                 f"answer_{example}": options.answer or ""})
    st.session_state.update(comparison=shown, comparison_options=options, comparison_saved=name)
    st.session_state.pop("comparison_bundled", None)
    st.session_state.pop("kept_methods", None)


linked = ui.restore_from_link("compare")
restore(linked)
if linked.get("saved"):
    reopen(linked["saved"])
elif st.session_state.get("reopen"):
    reopen(st.session_state.pop("reopen"))
st.session_state.setdefault("run_from_link", bool(linked.get("run")) and not linked.get("saved"))


def initial(key: str, default):
    """A widget's starting value, unless the session (a link) already gave it one."""
    return None if key in st.session_state else default


with st.sidebar:
    st.header("Settings")
    backend = ui.backend_picker()
    model_name = ui.model_picker(backend)
    budget = ui.shared(st.slider, "Kept fraction of the prompt", min_value=0.05, max_value=1.0, step=0.01, key="kept_fraction",
                       help="Share of what full KV holds for the compressed prompt (every layer's own length: a "
                            "sliding-window layer holds fewer tokens) that each method keeps")
    mode = ui.shared(st.radio, "Setting", list(MODES), format_func=MODES.get, key="mode")
    window = ui.shared(st.number_input, "Observation window w (tokens)", min_value=1, max_value=4096, key="window",
                             help="The last w queries score the tokens; the last w tokens are always kept")
    max_new_tokens = st.number_input("Max new tokens", min_value=1, max_value=256, value=initial("max_new_tokens", 24),
                                     key="max_new_tokens")
    stored_names = saved.saved_comparisons(ui.runs_root())
    if stored_names:
        with st.expander(f"Saved comparisons ({len(stored_names)})", key="saved_panel"):
            picked_run = st.selectbox("Saved comparison", stored_names, key="saved_pick",
                                      help=f"Comparisons saved with Save below, newest first (under {ui.runs_root()})")
            st.button("Open", key="open_saved", on_click=lambda: st.session_state.update(reopen=picked_run))
    match_bytes = st.toggle("Match bytes", value=initial("match_bytes", False), key="match_bytes",
                            help="Bring every method to the kept fraction as a share of full KV's bytes: token methods "
                                 "already are; KIVI, ThinK and KVSharer get uniform eviction in front, its kept "
                                 "fraction solved on this prompt (a few compressions, no decoding)")

methods = ui.method_picker(["full", "zigzag", "pyramid", "uniform", "adakv"])
source = st.selectbox("Prompt", list(EXAMPLES) + [OWN_PROMPT], key="prompt_source",
                      help="Bundled prompts with a known answer, or your own text")
example = EXAMPLES[source]() if source in EXAMPLES else None
prompt = st.text_area("Prompt text", value=initial(f"prompt_{source}", example.text if example else ""), height=180,
                      key=f"prompt_{source}",
                      help="In context mode the question is the last paragraph (after the last blank line), "
                           "unless you type one below")
left, right = st.columns(2)
question = left.text_input("Question (optional)", key=f"question_{source}",
                           help="Appended after a blank line; in context mode the prompt's last paragraph otherwise")
answer = right.text_input("Known answer (optional, for the task score)",
                          value=initial(f"answer_{source}", example.answer if example else ""), key=f"answer_{source}")

specs = tuple(dict.fromkeys(m.spec for m in methods or []))
options = CompareOptions(model=model_name or "", prompt=prompt, methods=",".join(specs), budget=float(budget),
                         max_new_tokens=int(max_new_tokens), window=int(window), answer=answer.strip() or None,
                         mode=mode, question=question.strip() or None, match_bytes=bool(match_bytes))
if ui.was_cancelled():
    st.info("Run cancelled; the results below are from the last finished run.")
if st.button("Run", type="primary") or st.session_state.pop("run_from_link", False):
    if methods is None:
        st.warning("Fix the method spec above first: nothing ran.")
    elif backend is None:
        st.warning("Pick a backend that works in the sidebar first.")
    elif not specs:
        st.warning("Pick at least one method.")
    elif not prompt.strip():
        st.warning("The prompt is empty: type some text or pick a bundled one.")
    elif not model_name:
        st.warning("Type a model folder or a cached model id.")
    else:
        with st.status(f"Running {len(specs)} method(s) on {model_name} in {backend.where}…", expanded=True) as status:
            result = ui.run_safely(lambda: ui.run_comparison(backend, options), "Comparison")
            if result:
                st.session_state["comparison"] = result
                st.session_state["comparison_options"] = options
                st.session_state.pop("comparison_bundled", None)
                st.session_state.pop("comparison_saved", None)
                st.session_state.pop("kept_methods", None)  # the map's picker starts from the new rows
                status.update(label=f"Done: {result.comparison.n_tokens} prompt tokens, {len(specs)} method(s), "
                                    f"{result.comparison.mode} mode", state="complete", expanded=False)
            else:
                status.update(label="Stopped: see the message below", state="error", expanded=True)

computed = "comparison" in st.session_state and "comparison_bundled" not in st.session_state
fresh = not changed_settings(st.session_state.get("comparison_options"), options)
ui.share_in_link(links.compare_params(options, source, source in EXAMPLES, computed,
                                      st.session_state.get("comparison_saved") if fresh else None)
                 if specs and prompt.strip() else None)
wanted = (model_name, mode, options.methods)
if ("comparison" not in st.session_state or "comparison_bundled" in st.session_state) and \
        st.session_state.get("comparison_bundled_for") != wanted:
    found = bundled.bundled_comparison(model_name, mode, options.methods) if model_name else None  # follows them
    if found is not None:
        (st.session_state["comparison_bundled"], st.session_state["comparison"],
         st.session_state["comparison_options"]) = found
        st.session_state["comparison_bundled_for"] = wanted
        st.session_state.pop("kept_methods", None)
if "comparison" not in st.session_state:
    st.info("Press **Run** to prefill the prompt, compress the cache with each method and decode beside full KV.")
    st.stop()
if "comparison_bundled" in st.session_state:
    ui.bundled_note(st.session_state["comparison_bundled"])

shown: ComparisonResult = st.session_state["comparison"]
result = shown.comparison
analysis = result.analysis
compressed = (f"{result.n_context} context tokens compressed, {result.n_tokens - result.n_context} question tokens "
              "fed after" if result.mode == "context" else "all of them compressed")
share = ""
if analysis.sliding_layers.any():
    share = (f" of full KV (= {prompt_share(result.budget, analysis.n_tokens, analysis.layer_caps):.2f} of the prompt's "
             f"tokens per layer: sliding-window layers hold at most {int(analysis.layer_caps.min())})")
st.caption(f"{result.model} on {shown.device} · {result.n_tokens} prompt tokens ({compressed}) · {result.mode} mode · "
           f"kept fraction {result.budget:g}{share} · window {result.window}")
changed = changed_settings(st.session_state.get("comparison_options"), options)
if changed:
    st.warning(f"Stale: {', '.join(changed)} changed since these results were made. Press **Run** to update them.")
st.markdown(f"**{result.verdict()}**")


def kept_token_map() -> None:
    """Which prompt tokens each layer kept, for the methods picked, with the known answer boxed."""
    evicting = [r.method for r in result.results if r.kept_map.size and r.kept_map.min() < 1]
    picked = st.multiselect("Methods on the map", [r.method for r in result.results], default=evicting[:4],
                            key="kept_methods", help="Methods that keep every token show a uniform map")
    edges, texts, binned = result.binned_kept_maps()
    maps = {method: values for method, values in binned.items() if method in picked}
    positions = result.answer_positions
    if not maps:
        st.info("Pick methods to draw which prompt tokens each layer kept.")
        return
    if positions:
        survived = {r.method: float(r.kept_map[:, positions].mean()) for r in result.results if r.method in picked}
        st.caption("Share of (layer, KV head) slots still holding the known answer's tokens: "
                   + " · ".join(f"{m} {v:.0%}" for m, v in survived.items()))
    ui.show_figure(charts.kept_map_figure(maps, edges, texts, bins_of(positions, edges), analysis.sliding_layers),
                   "kept-token map")


if presenting == "why":
    kept_token_map()
    st.stop()

st.subheader("Answers side by side")
per_row = min(4, max(len(result.results), 1))
for start in range(0, len(result.results), per_row):
    columns = st.columns(per_row)  # stacked into rows on narrow screens
    for column, row in zip(columns, result.results[start : start + per_row]):
        colour = charts.method_colour(row.method)
        with column:
            st.markdown(f"<div class='zz-head' style='--c:{colour}'>{row.method}</div>", unsafe_allow_html=True)
            st.markdown(charts.divergence_html(shown.answer_tokens[row.method], row.first_divergence, colour),
                        unsafe_allow_html=True)
            diverged = "same as full" if row.first_divergence is None else f"diverges at token {row.first_divergence}"
            score = "" if row.task_score is None else (" · answer ✔" if row.task_score else " · answer ✘")
            kept = f" at kept fraction {row.budget:.3g}" if abs(row.budget - result.budget) > 1e-9 and row.method != "full" else ""
            st.caption(f"KV {row.kv_bytes / 2**20:.2f} MiB ({row.kv_fraction:.0%}){kept} · ROUGE-L {row.rouge_l:.2f} · "
                       f"KL {row.kl_mean:.3f} · {diverged}{score}")

if presenting:
    st.stop()

st.subheader("Metrics")
st.caption("Each measured against full KV on the same prefill; hover a column header for what it means.")
ui.show_table(charts.metrics_table(result.results, charts.QUALITY_COLUMNS), "comparison", charts.METRIC_COLUMNS)
st.caption("Seconds per stage")
ui.show_table(charts.metrics_table(result.results, ("method", *charts.TIMING_COLUMNS)), "timings", charts.METRIC_COLUMNS)
left, right = st.columns(2)
left.download_button("Whole comparison as JSON (rows, curves, kept-token maps)", lambda: json.dumps(result.to_json()),
                     file_name="comparison.json", mime="application/json", key="json_comparison", on_click="ignore")
right.download_button("Whole comparison as one HTML page (opens offline)", lambda: comparison_html(shown),
                      file_name="comparison.html", mime="text/html", key="html_comparison", on_click="ignore")

with st.expander("Save this comparison into the run store (reopen it here, or see its rows on the Runs page)",
                 key="save_panel"):
    default_name = re.sub(r"[^\w.-]+", "-", f"compare-{Path(result.model).name}-{result.mode}-{result.budget:g}")
    run_name = st.text_input("Run name", value=default_name, key="save_run_name",
                             help=f"A folder under {ui.runs_root()} (letters, digits, '.', '-', '_')")
    if st.button("Save", key="save_run"):
        made_with = st.session_state["comparison_options"]
        stored = ui.run_safely(lambda: saved.save(shown, made_with, ui.runs_root() / check_run_name(run_name.strip())),
                               "Saving the comparison")
        if stored is not None:
            st.session_state["comparison_saved"] = stored.folder.name
            st.success(f"Saved as {stored.folder}: {len(result.results)} rows. It is listed under **Saved "
                       "comparisons** in the sidebar; the address now reopens it.")
            ui.share_in_link(links.compare_params(options, source, source in EXAMPLES, True, stored.folder.name))

curves_tab, kept_tab, budgets_tab, bytes_tab, why_tab = st.tabs(
    ["KL and top-1 per step", "Kept-token map", "Tokens per layer", "KV bytes", "Why these budgets"]
)
with curves_tab:
    ui.show_figure(charts.agreement_curves_figure(
        {r.method: (r.kl_curve, r.top1_curve) for r in result.results if r.method != "full"},
        shown.answer_tokens.get("full")), "agreement curves")
with kept_tab:
    kept_token_map()
with budgets_tab:
    ui.show_figure(charts.layer_budget_bars_figure(
        {r.method: r.layer_budgets for r in result.results if r.method != "full"}, analysis.layer_caps),
        "tokens per layer")
with bytes_tab:
    ui.show_figure(charts.kv_bytes_figure([r.method for r in result.results], [r.kv_bytes for r in result.results]),
                   "KV bytes")
with why_tab:
    tau = next((m.params["tau"] for m in methods or [] if "tau" in m.params), 0.9)  # the τ ZigZag runs with
    lmba = analysis.layer_signal("lmba", tau)
    ui.show_figure(charts.signals_figure(analysis.layer_signal("entropy"), lmba, analysis.layer_signal("hidden"), tau),
                   "layer signals")
    curves = ui.run_safely(lambda: budget_curves(lmba, result.budget, analysis.n_tokens, analysis.window,
                                                 caps=analysis.layer_caps), "Budget curves")
    if curves:
        ui.show_figure(charts.budget_figure(curves, analysis.n_tokens), "budget curves")
