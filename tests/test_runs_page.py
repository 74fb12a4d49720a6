"""Sweep summaries (pure) and the Runs page on a run made by a small sweep of the tiny model (AppTest)."""

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from streamlit.testing.v1 import AppTest

from zigzag_viz.evaluation import aggregate
from zigzag_viz.evaluation.store import RunStore
from zigzag_viz.evaluation.sweep import SweepSettings, run_sweep

ROOT = Path(__file__).resolve().parents[1]


def test_wilson_intervals_match_the_formula_and_stay_in_bounds():
    low, high = aggregate.wilson_interval(8, 12)
    assert (round(low, 4), round(high, 4)) == (0.3906, 0.8619)  # by hand: centre 0.6263, half-width 0.2356
    assert aggregate.wilson_interval(0, 5)[0] == 0.0 and aggregate.wilson_interval(5, 5)[1] == 1.0
    assert aggregate.wilson_interval(0, 0) == (0.0, 1.0)


def _rows(scores: dict) -> pd.DataFrame:
    """Rows of one task and mode: {(method, budget): [score per prompt]}."""
    lines = [{"task": "passkey", "mode": "aware", "method": m, "budget": b, "score": s, "kv_fraction": b,
              "kl_mean": 1 - b, "depth": 0.1 * (i % 3), "length": 1024 * (1 + i // 3)}
             for (m, b), values in scores.items() for i, s in enumerate(values)]
    return pd.DataFrame(lines)


def test_smallest_lossless_needs_every_larger_fraction_to_match_full():
    rows = _rows({("full", 1.0): [1, 1, 1, 1], ("uniform", 0.2): [1, 1, 1, 1], ("uniform", 0.5): [1, 0, 1, 1],
                  ("uniform", 0.7): [1, 1, 1, 1], ("zigzag", 0.2): [0, 0, 0, 0], ("zigzag", 0.5): [0, 1, 0, 0],
                  ("zigzag", 0.7): [1, 1, 0, 1]})
    table = aggregate.smallest_lossless(rows).set_index("method")
    assert table.loc["uniform", "smallest_lossless"] == 0.7  # 0.2 matched, but 0.5 did not
    assert np.isnan(table.loc["zigzag", "smallest_lossless"])
    accuracy = aggregate.accuracy_table(rows).set_index(["method", "budget"])
    assert accuracy.loc[("uniform", 0.5), "score"] == 0.75 and accuracy.loc[("uniform", 0.5), "prompts"] == 4
    assert accuracy.loc[("uniform", 0.5), "score_low"] < 0.75 < accuracy.loc[("uniform", 0.5), "score_high"]


def test_prompts_without_a_score_are_left_out_of_the_interval():
    rows = _rows({("uniform", 0.5): [1, 0, float("nan"), 1]})
    line = aggregate.accuracy_table(rows).iloc[0]
    assert line["prompts"] == 3 and line["score"] == pytest.approx(2 / 3)


def test_depth_length_grid_is_the_mean_score_per_cell():
    rows = _rows({("uniform", 0.5): [1, 0, 1, 0, 0, 1]})
    grid = aggregate.depth_length_grid(rows, "uniform", "aware", 0.5)
    assert grid.shape == (3, 2) and grid.loc[0.0, 1024] == 1 and grid.loc[0.1, 1024] == 0 and grid.loc[0.2, 2048] == 1


@pytest.fixture(scope="module")
def runs_root(tiny, tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    for name, methods in (("first", ("full", "uniform", "zigzag")), ("second", ("full", "streaming"))):
        settings = SweepSettings(model="tiny", tasks=("passkey", "niah_single"), lengths=(160, 224), depths=(0.2, 0.8),
                                 samples=1, budgets=(0.3, 0.6), methods=methods, modes=("aware",),
                                 families=("prose/digits5/plain",), window=16, max_new_tokens=4).check()
        run_sweep(tiny, settings, RunStore.open(root / name, settings.to_json()))
    return root


def test_the_runs_page_lists_runs_and_draws_a_run_and_a_comparison(runs_root, monkeypatch):
    monkeypatch.setenv("ZIGZAG_VIZ_RUNS", str(runs_root))
    at = AppTest.from_file(str(ROOT / "pages" / "4_Runs.py"), default_timeout=120)
    at.run()
    assert not at.exception and not at.error, [e.value for e in at.error]
    listed = at.selectbox(key="run_name").options
    assert listed[:2] == ["first", "second"] and {"quality-gemma3", "quality-smollm2"} <= set(listed[2:])  # then bundled
    assert len(at.get("plotly_chart")) == 3  # score, KL, depth × length
    at.selectbox(key="run_other").set_value("second").run()
    assert not at.exception
    names = {trace["name"] for trace in json.loads(at.get("plotly_chart")[0].proto.spec)["data"]}
    assert {"streaming · second", "zigzag · first", "full · first", "full · second"} <= names
    at.selectbox(key="run_task").set_value("passkey").run()
    assert not at.exception and any("smallest" in h.value.lower() for h in at.subheader)


def test_the_runs_page_without_runs_says_how_to_make_one(tmp_path, monkeypatch):
    monkeypatch.setenv("ZIGZAG_VIZ_RUNS", str(tmp_path / "empty"))
    at = AppTest.from_file(str(ROOT / "pages" / "4_Runs.py"), default_timeout=60)
    at.run()
    assert not at.exception and "zigzag-viz sweep" in at.info[0].value
    assert {"quality-gemma3", "quality-smollm2"} <= set(at.selectbox(key="run_name").options)  # the bundled studies open
    assert len(at.get("plotly_chart")) == 3 and "quality-smollm2" in at.dataframe[0].value["run"].tolist()


def test_a_comparison_from_the_compare_page_is_saved_into_the_store_and_opens_on_the_runs_page(tmp_path, monkeypatch):
    monkeypatch.setenv("ZIGZAG_VIZ_RUNS", str(tmp_path / "runs"))
    at = AppTest.from_file(str(ROOT / "pages" / "1_Compare.py"), default_timeout=300)
    at.run()
    at.selectbox(key="model").set_value("tiny")
    at.multiselect(key="methods").set_value(["full", "zigzag", "uniform"])
    next(n for n in at.number_input if n.label == "Max new tokens").set_value(4)
    next(b for b in at.button if b.label == "Run").click().run()
    assert not at.exception and not at.error
    at.text_input(key="save_run_name").set_value("my-comparison")
    at.button(key="save_run").click().run()
    assert not at.error and "Saved as" in at.success[0].value
    store = RunStore(tmp_path / "runs" / "my-comparison")
    rows = store.frame()
    shown = at.session_state["comparison"].comparison
    assert list(rows["method"]) == ["full", "zigzag", "uniform"]
    assert list(rows["answer"]) == [r.text for r in shown.results]
    assert rows["task"].unique().tolist() == ["compare"] and rows["depth"].between(0, 1).all()
    at.button(key="save_run").click().run()
    assert [e.value for e in at.error] == [f"Saving the comparison: {store.folder} already holds this comparison"]

    runs = AppTest.from_file(str(ROOT / "pages" / "4_Runs.py"), default_timeout=60)
    runs.run()
    assert not runs.exception and runs.selectbox(key="run_name").options[0] == "my-comparison"


def test_the_benchmarks_page_draws_the_committed_results_with_their_machines():
    from zigzag_viz.presentation import benchmark_results

    records, problems = benchmark_results.read_results(benchmark_results.results_folder())
    assert not problems and {"capture_overhead", "load_time", "server_load"} <= set(records)
    table = benchmark_results.headline_table(records)
    assert "— (a record of another shape)" not in set(table["headline"])
    assert (table["machine"] != "—").sum() >= len(table) - 2
    at = AppTest.from_file(str(ROOT / "pages" / "5_Benchmarks.py"), default_timeout=60)
    at.run()
    assert not at.exception and not at.error
    assert list(at.dataframe[0].value["result"]) == list(table["result"])
    assert len(at.get("plotly_chart")) == 2  # capture overhead, the quality study


def test_a_damaged_result_file_is_named_and_the_others_still_show(tmp_path):
    from zigzag_viz.presentation import benchmark_results

    (tmp_path / "load_time.json").write_text('{"benchmark": "load_time", "first_load": {"load_s": 1.0}, '
                                             '"later_loads": {"load_s": 0.2}, "machine": "m", "date": "d"}')
    (tmp_path / "broken.json").write_text("{not json")
    (tmp_path / "server_load.json").write_text('{"benchmark": "server_load"}')
    records, problems = benchmark_results.read_results(tmp_path)
    assert problems == ["broken.json cannot be read (JSONDecodeError)"]
    table = benchmark_results.headline_table(records).set_index("result")
    assert table.loc["load_time", "headline"] == "later loads 0.20 s, first load 1.0 s"
    assert table.loc["server_load", "headline"] == "— (a record of another shape)"
