"""Runs: stored sweeps of generated tasks: how often each method keeps the answer, at what memory, and where."""

from pathlib import Path

import pandas as pd
import streamlit as st

from zigzag_viz.evaluation import aggregate
from zigzag_viz.evaluation.store import runs_table
from zigzag_viz.presentation import bundled, charts, story, ui

st.set_page_config(page_title="Runs · zigzag_viz", page_icon="🗂️", layout="wide")
ui.page_style()
presenting = ui.presenting(("often",))
st.title("Stored runs")
if not presenting:
    st.caption("Sweeps stored by `zigzag-viz sweep … --out runs/NAME`: every (task, prompt family, sample, length, "
               "needle depth) prompt × method × kept fraction × mode. Scores are RULER's (every expected string in "
               "the answer) or exact match for article questions; bars are Wilson intervals over the prompts.")

with st.sidebar:
    st.header("Runs")
    root = Path(st.text_input("Runs folder", value=str(ui.runs_root()),
                              help="The folder that holds one sub-folder per run"))

shipped = runs_table(bundled.bundled_runs_folder())
stored = ui.run_safely(lambda: runs_table(root), "Reading the runs")
stored = stored if stored is not None else shipped.iloc[0:0]
shipped = shipped[~shipped["run"].isin(stored["run"])]
folders = {**{run: bundled.bundled_runs_folder() / run for run in shipped["run"]}, **{run: root / run for run in stored["run"]}}
listing = pd.concat([stored.assign(where=str(root)), shipped.assign(where="bundled: the committed quality studies")],
                    ignore_index=True)
if stored.empty and not presenting:
    st.info(f"No runs of your own under `{root}` yet; the bundled quality studies are listed. Make one: "
            f"`.venv/bin/zigzag-viz sweep --model smollm2 --tasks passkey,vt --budgets 0.2,0.5 --out {root}/first`")
if listing.empty:
    st.stop()
if presenting:  # the study of the model the story is about
    st.session_state["run_name"] = next((r for r in listing["run"] if r == f"quality-{ui.shared_value('model')}"),
                                        listing["run"].iloc[0])
else:
    ui.show_table(listing, "runs")
left, right = st.columns(2)
name = left.selectbox("Run", list(listing["run"]), key="run_name")
other = right.selectbox("Compare with", ["none"] + [r for r in listing["run"] if r != name], key="run_other")
running = listing.set_index("run").loc[name, "status"] == "running"


@st.fragment(run_every=5 if running else None)
def show_run() -> None:
    loaded = ui.run_safely(lambda: ui.run_rows(folders[name]), "Reading the run")
    if loaded is None:
        return
    manifest, rows = loaded
    if rows.empty:
        st.info("This run holds no rows yet.")
        return
    settings = manifest["settings"]
    st.caption(f"{settings.get('model')} · {manifest.get('status')} · {manifest.get('rows_done')} of "
               f"{manifest.get('rows_total')} rows · started {manifest.get('created')}" + (" · refreshing every 5 s" if running else ""))
    first, second = st.columns(2)
    if presenting and "passkey" in set(rows["task"]):
        st.session_state["run_task"] = "passkey"
    task = first.selectbox("Task", sorted(rows["task"].unique()), key="run_task")
    mode = second.selectbox("Mode", sorted(rows["mode"].unique()), key="run_mode")
    chosen = rows[(rows["task"] == task) & (rows["mode"] == mode)]
    table = aggregate.accuracy_table(chosen)
    compared = table.assign(run=name)
    if other != "none":
        found = ui.run_safely(lambda: ui.run_rows(folders[other]), "Reading the other run")
        if found is not None:
            theirs = found[1][(found[1]["task"] == task) & (found[1]["mode"] == mode)]
            if len(theirs):
                compared = pd.concat([compared, aggregate.accuracy_table(theirs).assign(run=other)])
    ui.show_figure(charts.accuracy_curves_figure(compared, f"{task}, {mode} mode: score against kept fraction"),
                   "score against kept fraction")
    if presenting:
        st.markdown(story.scores_sentence(rows, settings.get("model")) or "")
        return
    ui.show_figure(charts.kl_budget_figure(table, f"{task}, {mode} mode: divergence from full KV"), "KL against kept fraction")
    st.subheader("Where the needle is lost")
    a, b = st.columns(2)
    method = a.selectbox("Method", sorted(chosen["method"].unique()), key="run_method")
    budget = b.selectbox("Kept fraction", sorted(chosen["budget"].unique()), key="run_budget", format_func="{:.0%}".format)
    grid = aggregate.depth_length_grid(chosen, method, mode, budget)
    if grid.empty:
        st.info("These rows record no needle depth (a saved comparison without a known answer).")
    else:
        ui.show_figure(charts.depth_length_figure(grid, f"{method} at {budget:.0%} kept: score by needle depth and "
                                                  "length"), "depth by length")
    st.subheader("Smallest kept fraction that matches full KV")
    ui.show_table(aggregate.smallest_lossless(rows), "smallest lossless fraction")
    st.subheader("Per task, method, mode and kept fraction")
    ui.show_table(aggregate.accuracy_table(rows), "accuracy table")


show_run()
