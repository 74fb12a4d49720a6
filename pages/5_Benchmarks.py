"""Benchmarks: the committed results of benchmarks/, each with the machine it was measured on."""

import pandas as pd
import streamlit as st

from zigzag_viz.evaluation import aggregate
from zigzag_viz.presentation import benchmark_results, charts, ui

st.set_page_config(page_title="Benchmarks · zigzag_viz", page_icon="⏱️", layout="wide")
ui.page_style()
st.title("Benchmarks")
st.caption("What `make bench` and the quality studies measured, as committed in benchmarks/results/. Every speed "
           "figure is a ratio measured side by side in one run, because these machines are noisy; each line says "
           "where it ran.")

folder = benchmark_results.results_folder()
records, problems = benchmark_results.read_results(folder)
for problem in problems:
    st.warning(problem)
if not records:
    st.info(f"No results under `{folder}` yet: run `make bench`.")
    st.stop()

st.subheader("Every result")
ui.show_table(benchmark_results.headline_table(records), "benchmark results")

if "capture_overhead" in records:
    record = records["capture_overhead"]
    st.subheader("What recording the signals costs")
    ui.show_figure(charts.capture_overhead_figure(
        benchmark_results.capture_rows(record),
        f"{record['model']} on {record['device']} ({record.get('machine', '?')}, {record.get('date', '?')})"),
        "capture overhead")

studies = benchmark_results.quality_tables(folder)
if studies:
    st.subheader("Quality studies")
    model = st.selectbox("Model", list(studies), key="bench_study")
    shards = folder / f"quality_{model}.parquet"
    if shards.exists():
        rows = pd.read_parquet(shards)
        table = aggregate.accuracy_table(rows.assign(task="all"))
        mode = st.radio("Setting", sorted(table["mode"].unique()), horizontal=True, key="bench_mode")
        ui.show_figure(charts.accuracy_curves_figure(table[table["mode"] == mode],
                                                     f"{model}, {mode} setting: score over every task"),
                       "quality study")
    with st.expander("The study's tables"):
        st.markdown(studies[model])

gpu = {stem: r for stem, r in records.items() if stem.startswith("gpu")}
st.subheader("On a GPU")
if gpu:
    for stem, record in gpu.items():
        st.json(record, expanded=False)
else:
    st.info("No GPU results are committed yet: `benchmarks/gpu_check.py` and `benchmarks/gpu_bench.py` have only "
            "run at tiny shapes on the CPU.")
