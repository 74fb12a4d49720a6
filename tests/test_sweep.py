"""Generated tasks, the run store and sweeps: prompts sized and seeded, RULER's scoring, settings refused before
any work, shards written whole, damaged shards skipped, and a sweep stopped or killed at any point completed by
the same command with every row exactly once."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from zigzag_viz import cli
from zigzag_viz.errors import InputError
from zigzag_viz.evaluation import store as store_module
from zigzag_viz.evaluation.store import KEY_COLUMNS, RunStore, export, runs_table, summary
from zigzag_viz.evaluation.sweep import ROW_COLUMNS, RateReporter, SweepSettings, run_sweep
from zigzag_viz.evaluation.tasks import TASKS, Family, TaskPrompt, parse_tasks, score

SETTINGS = SweepSettings(model="tiny", tasks=("passkey", "vt"), lengths=(192,), depths=(0.3,), samples=1,
                         budgets=(0.3, 0.6), methods=("full", "uniform", "zigzag"), modes=("aware", "context"),
                         families=("prose/digits5/plain", "essay/uuid/formal"), window=16, max_new_tokens=4)
TIMINGS = ["prefill_s", "analysis_s", "compress_s", "decode_s", "ms_per_token"]


@pytest.mark.parametrize("task", list(TASKS))
def test_every_task_and_family_makes_sized_seeded_prompts_holding_their_answers(tiny, task):
    lengths = (1100, 1500) if task == "qa" else (300, 700)  # an article alone is 400–900 tokens
    for family in TASKS[task].families:
        for length in lengths:
            prompt = TASKS[task].generate(length, 0.5, 0, family, tiny.count_tokens)
            tokens = tiny.count_tokens(prompt.text)
            assert 0.85 * length <= tokens <= length, (task, family, length, tokens)
            assert all(answer in prompt.context for answer in prompt.answers)
            assert prompt.question not in prompt.context
            assert prompt == TASKS[task].generate(length, 0.5, 0, family, tiny.count_tokens)
        other = TASKS[task].generate(lengths[-1], 0.5, 1, family, tiny.count_tokens)
        assert other.context != prompt.context


@pytest.mark.parametrize("depth", [0.1, 0.5, 0.9])
def test_needles_sit_at_their_depth(tiny, depth):
    prompt = TASKS["niah_single"].generate(800, depth, 0, "prose/digits5/plain", tiny.count_tokens)
    where = prompt.context.find(prompt.answers[0]) / len(prompt.context)
    assert abs(where - depth) < 0.12


def test_families_vary_filler_keys_and_wording(tiny):
    prompts = {f: TASKS["passkey"].generate(400, 0.5, 0, f, tiny.count_tokens) for f in TASKS["passkey"].families}
    keys = {f: p.answers[0] for f, p in prompts.items()}
    assert len(keys["prose/digits5/plain"]) == 5 and keys["prose/digits5/plain"].isdigit()
    assert len(keys["essay/digits7/formal"]) == 7
    assert "-" in keys["prose/word/formal"] and len(keys["essay/uuid/plain"]) == 18
    assert len({p.question for p in prompts.values()}) == 2 and len({p.context[:200] for p in prompts.values()}) == 4


def test_scoring_follows_ruler_and_exact_match_for_questions():
    multi = TaskPrompt("niah_multivalue", "f", 100, 0.5, 0, "ctx", "q?", ("111", "222", "333"))
    assert score(multi, "111, 222 and 333") == 1.0
    assert score(multi, "111 and 333") == pytest.approx(2 / 3)
    assert score(multi, "none") == 0.0
    assert score(multi, "1110, 2222 and x333") == 0.0  # a key inside a longer token does not count
    words = TaskPrompt("cwe", "f", 100, 0.5, 0, "ctx", "q?", ("ember", "umber"))
    assert score(words, "Remember the numbered list") == 0.0 and score(words, "EMBER; umber.") == 1.0
    qa = TaskPrompt("qa", "f", 100, 0.5, 0, "ctx", "q?", ("Marta Lindqvist",), exact=True)
    assert score(qa, "marta lindqvist.\nShe trained as a surveyor.") == 1.0
    assert score(qa, "The engineer was Marta Lindqvist") == 0.0


@pytest.mark.parametrize(("changes", "message"), [
    ({"tasks": ("nosuch",)}, "unknown task 'nosuch'"),
    ({"lengths": ()}, "the sweep grid is empty"),
    ({"budgets": (0.0,)}, r"budget must be a number in \(0, 1\]"),
    ({"budgets": (0.05,)}, "below the always-kept window of 16"),
    ({"modes": ("sideways",)}, "unknown mode 'sideways'"),
    ({"methods": ("zigzag[rho=",)}, "zigzag"),
    ({"families": ("prose/digits9x/plain",)}, "unknown key format"),
    ({"depths": (1.5,)}, r"needle depths lie in \[0, 1\]"),
    ({"samples": 0}, "samples must be at least 1"),
])
def test_bad_settings_are_refused_with_one_line(changes, message):
    with pytest.raises(InputError, match=message) as caught:
        SweepSettings(**{**SETTINGS.__dict__, **changes}).check()
    assert "\n" not in str(caught.value)
    with pytest.raises(InputError):
        Family.parse("prose/digits5")
    with pytest.raises(InputError, match="no task given"):
        parse_tasks(" , ")


def _rows_without_timings(store: RunStore) -> pd.DataFrame:
    frame = store.frame().drop(columns=TIMINGS)
    return frame.sort_values(list(KEY_COLUMNS)).reset_index(drop=True)


@pytest.fixture(scope="module")
def whole_run(tiny, tmp_path_factory):
    settings = SETTINGS.check()
    store = RunStore.open(tmp_path_factory.mktemp("runs") / "whole", settings.to_json())
    lines = []
    assert run_sweep(tiny, settings, store, RateReporter(lines.append)) == settings.rows_total
    return store, lines


def test_a_sweep_stores_one_row_per_key_with_scores_and_a_manifest(whole_run):
    store, lines = whole_run
    settings = SETTINGS.check()
    frame = store.frame()
    assert len(frame) == settings.rows_total == 2 * 2 * 2 * 2 * 3  # tasks × families × modes × budgets × methods
    assert not frame.duplicated(list(KEY_COLUMNS)).any() and tuple(frame.columns) == ROW_COLUMNS
    assert set(frame["method"]) == {"full", "uniform", "zigzag"} and set(frame["mode"]) == {"aware", "context"}
    assert frame["score"].between(0, 1).all() and (frame.loc[frame.method == "full", "kv_fraction"] == 1.0).all()
    kept = frame[frame.method == "uniform"]
    assert (abs(kept["kv_fraction"] - kept["budget"]) < 0.05).all()
    assert all(len(b) == 4 for b in frame["layer_budgets"])
    manifest = store.manifest()
    assert manifest["status"] == "complete" and manifest["rows_done"] == manifest["rows_total"] == len(frame)
    assert manifest["settings"] == settings.to_json() and manifest["versions"]["torch"]
    assert set(p.name for p in store.folder.iterdir()) == {"manifest.json", *(s.name for s in store.shards())}
    assert lines[-1].startswith(f"rows {len(frame)}/{len(frame)} · ") and "rows/min" in lines[-1]


def test_a_stopped_sweep_continues_to_the_same_rows_exactly_once(tiny, whole_run, tmp_path):
    settings = SETTINGS.check()
    store = RunStore.open(tmp_path / "stopped", settings.to_json())
    prompts = []

    def stop_after_three(done, total, message):
        prompts.append(done)
        if len(prompts) == 4:  # the first call is the start
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_sweep(tiny, settings, store, stop_after_three)
    assert store.manifest()["status"] == "stopped" and len(store.frame()) == 3 * settings.rows_per_prompt
    assert run_sweep(tiny, settings, store) == settings.rows_total - 3 * settings.rows_per_prompt
    assert run_sweep(tiny, settings, store) == 0  # nothing left, nothing duplicated
    pd.testing.assert_frame_equal(_rows_without_timings(store), _rows_without_timings(whole_run[0]))


def test_a_damaged_shard_is_named_skipped_and_recomputed(tiny, tmp_path):
    settings = SweepSettings(**{**SETTINGS.__dict__, "tasks": ("passkey",), "modes": ("aware",)}).check()
    store = RunStore.open(tmp_path / "damaged", settings.to_json())
    run_sweep(tiny, settings, store)
    shard = store.shards()[0]
    shard.write_bytes(shard.read_bytes()[:100])
    with pytest.warns(UserWarning, match=f"skipping the damaged shard {shard}"):
        assert len(store.done_keys()) == settings.rows_total - settings.rows_per_prompt
    shard.unlink()
    assert run_sweep(tiny, settings, store) == settings.rows_per_prompt
    assert len(store.done_keys()) == settings.rows_total


def test_a_shard_is_written_whole_or_not_at_all(tmp_path, monkeypatch):
    store = RunStore.open(tmp_path / "atomic", {"model": "tiny"})

    def fail(*_args):
        raise OSError("disk full")

    monkeypatch.setattr(store_module.os, "replace", fail)
    with pytest.raises(OSError):
        store.write_shard([{"task": "passkey"}])
    assert sorted(p.name for p in store.folder.iterdir()) == ["manifest.json"]


def test_a_folder_of_another_sweep_and_a_damaged_manifest_are_refused(tmp_path):
    RunStore.open(tmp_path / "run", {"model": "tiny", "lengths": [1024]})
    with pytest.raises(InputError, match="holds a run with other settings \\(lengths\\)"):
        RunStore.open(tmp_path / "run", {"model": "tiny", "lengths": [2048]})
    (tmp_path / "run" / "manifest.json").write_text("{not json")
    with pytest.raises(InputError, match="manifest .* cannot be read"):
        RunStore(tmp_path / "run").manifest()


def test_duckdb_summary_list_and_export(whole_run, tmp_path):
    store, _ = whole_run
    table = summary(store)
    assert len(table) == 2 * 3 * 2 * 2 and set(table["prompts"]) == {2}  # task × method × mode × budget
    assert (table.loc[table.method == "full", "kv_fraction"] == 1.0).all()
    listed = runs_table(store.folder.parent)
    assert listed.loc[0, "run"] == "whole" and listed.loc[0, "status"] == "complete"
    csv = export(store, "csv", tmp_path / "out.csv")
    parquet = export(store, "parquet", tmp_path / "out.parquet")
    read = pd.read_csv(csv)
    assert len(read) == len(pd.read_parquet(parquet)) == SETTINGS.check().rows_total
    assert json.loads(read.loc[0, "layer_budgets"]) and json.loads(read.loc[0, "expected"])


def test_the_cli_refuses_bad_sweeps_before_loading_a_model(tmp_path, capsys, monkeypatch):
    def no_model(*_args, **_kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr("zigzag_viz.pipeline.models.load_model", no_model)
    for args in (["--tasks", "passkey,nosuch"], ["--lengths", ""], ["--budgets", "0.01"], ["--lengths", "abc"],
                 ["--modes", "x"]):
        assert cli.main(["sweep", "--model", "tiny", "--out", str(tmp_path / "r"), *args]) == 2
        err = capsys.readouterr().err
        assert err.startswith("zigzag-viz: error: ") and err.count("\n") == 1
    assert cli.main(["runs", "show", "../x", "--root", str(tmp_path)]) == 2
    assert "a run name holds letters" in capsys.readouterr().err


def _sweep_command(out: Path) -> list[str]:
    return [sys.executable, "-m", "zigzag_viz.cli", "sweep", "--model", "tiny", "--tasks", "passkey,vt",
            "--lengths", "192", "--depths", "0.3", "--budgets", "0.3,0.6", "--methods", "full,uniform,zigzag",
            "--modes", "aware,context", "--families", "prose/digits5/plain,essay/uuid/formal", "--window", "16",
            "--max-new-tokens", "4", "--out", str(out)]


@pytest.mark.slow
def test_a_sweep_killed_at_random_moments_completes_with_every_row_once(whole_run, tmp_path):
    out = tmp_path / "killed"
    env = dict(os.environ, ZIGZAG_VIZ_DEVICE="cpu")
    for delay in (6.0, 9.0, 11.5):  # after the model load, at different points of the grid
        process = subprocess.Popen(_sweep_command(out), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(delay)
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=30)
        if out.exists():
            assert len(RunStore(out).frame()) % SETTINGS.check().rows_per_prompt == 0  # only whole prompts stored
    finished = subprocess.run(_sweep_command(out), env=env, capture_output=True, text=True, timeout=600)
    assert finished.returncode == 0, finished.stderr
    assert finished.stdout.strip().endswith("complete")
    assert {p.name for p in out.iterdir()} == {"manifest.json", *(s.name for s in RunStore(out).shards())}
    pd.testing.assert_frame_equal(_rows_without_timings(RunStore(out)), _rows_without_timings(whole_run[0]))


@pytest.mark.slow
def test_a_sweep_on_smollm2_keeps_the_answers_full_kv_gives(smollm2, tmp_path):
    settings = SweepSettings(model="smollm2", tasks=("passkey", "niah_single"), lengths=(1024,), depths=(0.4,),
                             samples=1, budgets=(0.5,), methods=("full", "uniform"), modes=("aware",),
                             families=("prose/digits5/plain", "essay/digits7/formal"), max_new_tokens=24).check()
    store = RunStore.open(tmp_path / "smollm2", settings.to_json())
    run_sweep(smollm2, settings, store)
    frame = store.frame()
    assert len(frame) == settings.rows_total == 8
    full = frame[frame.method == "full"]
    assert (full["score"] == 1.0).all(), full[["task", "family", "answer", "expected"]].to_string()
    assert frame["n_tokens"].between(900, 1024).all()
    assert (abs(frame.loc[frame.method == "uniform", "kv_fraction"] - 0.5) < 0.02).all()


@pytest.mark.slow
def test_a_sweep_over_a_two_worker_ray_cluster_gives_the_serial_rows(whole_run, tmp_path):
    from zigzag_viz.evaluation.sweep import run_sweep_ray

    settings = SETTINGS.check()
    store = RunStore.open(tmp_path / "ray", settings.to_json())
    lines = []
    assert run_sweep_ray(settings, store, RateReporter(lines.append), workers=2) == settings.rows_total
    assert store.manifest()["status"] == "complete" and lines[-1].startswith(f"rows {settings.rows_total}/")
    pd.testing.assert_frame_equal(_rows_without_timings(store), _rows_without_timings(whole_run[0]))


def test_a_task_without_a_needle_is_swept_at_one_depth():
    settings = SweepSettings(**{**SETTINGS.__dict__, "tasks": ("cwe", "passkey"), "depths": (0.1, 0.5, 0.9)}).check()
    cells = list(settings.cells())
    assert {c[4] for c in cells if c[0] == "cwe"} == {0.1} and {c[4] for c in cells if c[0] == "passkey"} == {0.1, 0.5, 0.9}
    assert settings.rows_total == len(cells) * len(settings.modes) * settings.rows_per_prompt


def test_one_writer_at_a_time_and_stored_files_follow_the_umask(tmp_path):
    store = RunStore.open(tmp_path / "run", {"model": "tiny"})
    with store.writing():
        with pytest.raises(InputError, match="another sweep is writing"):
            with RunStore(store.folder).writing():
                pass
        shard = store.write_shard([{"task": "passkey"}])
    with RunStore(store.folder).writing():  # released
        pass
    umask = os.umask(0)
    os.umask(umask)
    assert shard.stat().st_mode & 0o777 == 0o666 & ~umask
