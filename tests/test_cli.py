"""The `zigzag-viz` command line: JSON contracts and clear one-line errors."""

import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest

from zigzag_viz.evaluation.metrics import rouge_l
from zigzag_viz.evaluation.prompts import passkey_prompt
from zigzag_viz.pipeline.budgets import budget_curves


def run_cli(*args, stdin=None):
    env = dict(os.environ, ZIGZAG_VIZ_DEVICE="cpu")
    return subprocess.run(
        [sys.executable, "-m", "zigzag_viz.cli", *args], input=stdin, capture_output=True, text=True, env=env,
        timeout=600,
    )


@pytest.fixture(scope="module")
def prompt_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("cli") / "prompt.txt"
    prompt = passkey_prompt(n_sentences=30, depth=0.5, seed=4)
    path.write_text(prompt.text)
    return path, prompt.answer


def test_analyze_json_contract(prompt_file):
    path, _ = prompt_file
    out = run_cli("analyze", "--model", "tiny", "--prompt-file", str(path), "--window", "16", "--tau", "0.9", "--json")
    assert out.returncode == 0, out.stderr
    data = json.loads(out.stdout)
    n = data["n_tokens"]
    assert data["model"] == "tiny" and n > 500
    assert [layer["layer"] for layer in data["layers"]] == [0, 1, 2, 3]
    for layer in data["layers"]:
        assert set(layer) == {"layer", "entropy", "lmba", "hidden_change"}
        # LMBA is a mean over the 4 query heads of (keys needed for 90 % of the mass) / n; the top ⌈0.9 n⌉ keys
        # always hold 90 % of it, so no head needs more
        heads_keys = layer["lmba"] * 4 * n
        assert heads_keys == pytest.approx(round(heads_keys), abs=1e-6)
        assert 1 / n <= layer["lmba"] <= math.ceil(0.9 * n) / n
        assert 0 < layer["entropy"] <= math.log(n)  # nats over at most n keys
    assert set(data["budgets"]) == {"zigzag", "pyramid", "uniform"}
    for budgets in data["budgets"].values():
        assert len(budgets) == 4 and sum(budgets) == round(4 * 0.2 * n)
    # the ZigZag budgets are those of the reported LMBA signal
    expected = budget_curves(np.array([layer["lmba"] for layer in data["layers"]]), 0.2, n, 16,
                             caps=np.array(data["layer_caps"]))
    assert data["budgets"] == {name: curve.tolist() for name, curve in expected.items()}


@pytest.mark.slow
def test_compare_json_contract_on_smollm2_from_stdin(prompt_file):
    path, answer = prompt_file
    out = run_cli(
        "compare", "--model", "smollm2", "--prompt-file", "-", "--methods", "full,zigzag,pyramid,uniform",
        "--budget", "0.2", "--max-new-tokens", "12", "--json", stdin=path.read_text(),
    )
    assert out.returncode == 0, out.stderr
    assert "de-quantizing" not in out.stderr  # no progress bars from loading the GGUF
    rows = json.loads(out.stdout)
    assert [r["method"] for r in rows] == ["full", "zigzag", "pyramid", "uniform"]
    for row in rows:
        assert {"method", "text", "kv_bytes", "kv_fraction", "token_agreement", "first_divergence"} <= set(row)
        assert {"mode", "rouge_l", "kl_mean", "top1_agreement", "task_score", "prefill_s", "analysis_s",
                "decode_s", "ms_per_token"} <= set(row)
        assert row["mode"] == "aware" and row["ms_per_token"] > 0
    assert rows[0]["rouge_l"] == 1.0 and rows[0]["analysis_s"] == 0.0 and rows[1]["analysis_s"] > 0
    assert rows[0]["kv_fraction"] == 1.0 and rows[0]["token_agreement"] == 1.0 and rows[0]["first_divergence"] is None
    assert answer in rows[0]["text"]
    reference = rows[0]["token_ids"]
    for row in rows[1:]:
        assert row["kv_fraction"] == pytest.approx(0.2, abs=0.01)
        assert row["kv_bytes"] == round(row["kv_fraction"] * rows[0]["kv_bytes"])
        # the agreement and ROUGE-L against the full-KV answer, recomputed from the reported tokens and texts
        same = sum(a == b for a, b in zip(reference, row["token_ids"]))
        assert row["token_agreement"] == pytest.approx(same / max(len(reference), len(row["token_ids"])), abs=1e-6)
        assert row["rouge_l"] == pytest.approx(rouge_l(rows[0]["text"], row["text"]), abs=1e-6)


@pytest.mark.parametrize(
    "args, stdin, message",
    [
        (["--prompt-file", "-"], "   \n", "is empty"),
        (["--prompt-file", "/nonexistent/p.txt"], None, "cannot read prompt file"),
        (["--prompt-file", sys.executable], None, "not text"),
        (["--prompt-file", "-", "--budget", "0"], "hi", "budget must be a number in (0, 1]"),
        (["--prompt-file", "-", "--budget", "1.5"], "hi", "budget must be a number in (0, 1]"),
        (["--prompt-file", "-", "--budget", "half"], "hi", "budget must be a number in (0, 1]"),
        (["--prompt-file", "-", "--methods", "full,bogus"], "hi", "unknown method 'bogus'"),
        (["--prompt-file", "-", "--model", "no-such-model"], "hi", "unknown model 'no-such-model'"),
        (["--prompt-file", "-", "--model", "tiny", "--budget", "0.01"], "hello " * 200, "below the always-kept window"),
        (["--prompt-file", "-", "--model", "tiny"], "word " * 5000, "accepts at most 4096"),
        (["--prompt-file", "-", "--mode", "sideways"], "hi", "invalid choice: 'sideways'"),
        (["--prompt-file", "-", "--model", "tiny", "--mode", "context"], "one paragraph only", "context mode needs a question"),
        (["--prompt-file", "-", "--model", "tiny", "--export", "/nonexistent/dir/c.json", "--budget", "1"], "hello there",
         "cannot write /nonexistent/dir/c.json"),
    ],
)
def test_bad_input_exits_non_zero_with_one_line(args, stdin, message):
    out = run_cli("compare", *args, stdin=stdin)
    assert out.returncode != 0
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1, out.stderr
    assert message in lines[0] and "Traceback" not in out.stderr


def test_compare_context_mode_with_a_question_and_an_export(prompt_file, tmp_path):
    path, answer = prompt_file
    context = path.read_text().rsplit("\n\n", 1)[0]
    source = tmp_path / "context.txt"
    source.write_text(context)
    export = tmp_path / "comparison.json"
    out = run_cli("compare", "--model", "tiny", "--prompt-file", str(source), "--methods", "full,zigzag,uniform",
                  "--budget", "0.3", "--window", "16", "--max-new-tokens", "4", "--mode", "context",
                  "--question", "What is the pass key?", "--answer", answer, "--export", str(export), "--json")
    assert out.returncode == 0, out.stderr
    rows = json.loads(out.stdout)
    assert [r["mode"] for r in rows] == ["context"] * 3
    whole = json.loads(export.read_text())
    assert whole["question"] == "What is the pass key?" and whole["mode"] == "context"
    assert whole["n_context"] < whole["n_tokens"] and whole["answer_positions"]
    assert [r["method"] for r in whole["results"]] == ["full", "zigzag", "uniform"]
    zigzag_map = whole["kept_map"]["methods"]["zigzag"]
    assert len(zigzag_map) == 4 and len(zigzag_map[0]) == len(whole["kept_map"]["bin_edges"]) - 1


def test_a_prompt_file_with_or_without_its_final_newline_gives_the_same_prompt(tmp_path):
    from zigzag_viz.cli import read_prompt

    text = "first paragraph\n\n  question?  "  # inner blank lines and spaces are part of the prompt
    prompts = []
    for name, ending in (("bare", ""), ("unix", "\n"), ("windows", "\r\n")):
        path = tmp_path / f"{name}.txt"
        path.write_bytes((text + ending).encode())
        prompts.append(read_prompt(str(path)))
    assert prompts == [text] * 3


def test_analyze_adds_heads_tokens_and_lmbo_without_changing_the_contract(prompt_file):
    path, _ = prompt_file
    out = run_cli("analyze", "--model", "tiny", "--prompt-file", str(path), "--window", "16", "--json",
                  "--heads", "--tokens", "--deep", "--signal", "lmbo", "--budget", "0.3")
    assert out.returncode == 0, out.stderr
    data = json.loads(out.stdout)
    n = data["n_tokens"]
    assert {"model", "n_tokens", "layers", "budgets"} <= set(data)
    # LMBO is the first grid fraction whose window-output cosine reaches 0.99 (1.0 when none does)
    for layer, cosines in zip(data["layers"], data["lmbo_cos"]):
        assert layer["lmbo"] == next((f for f, c in zip(data["lmbo_grid"], cosines) if c >= 0.99), 1.0)
    # the per-layer signals are the means of the per-head ones
    for layer, entropy, lmba in zip(data["layers"], data["heads"]["entropy"], data["heads"]["lmba"]):
        assert layer["entropy"] == pytest.approx(np.mean(entropy)) and layer["lmba"] == pytest.approx(np.mean(lmba))
    assert len(data["heads"]["entropy"]) == 4 and len(data["heads"]["entropy"][0]) == 4
    assert data["heads"]["kv_group"] == [0, 0, 1, 1]
    bins = len(data["tokens"]["bin_texts"])
    assert bins == min(n, 512) and len(data["tokens"]["importance"][0]) == bins
    assert data["tokens"]["bin_edges"][-1] == n
    assert sum(data["budgets"]["zigzag"]) == round(4 * 0.3 * n)
    assert len(data["lmbo_cos"]) == 4 and len(data["lmbo_cos"][0]) == len(data["lmbo_grid"])


def test_lmbo_signal_needs_the_deep_capture(prompt_file):
    path, _ = prompt_file
    out = run_cli("analyze", "--model", "tiny", "--prompt-file", str(path), "--signal", "lmbo")
    assert out.returncode == 2 and "--signal lmbo needs --deep" in out.stderr


def test_compare_with_match_bytes_brings_every_method_to_the_same_bytes(prompt_file):
    path, _ = prompt_file
    out = run_cli("compare", "--model", "tiny", "--prompt-file", str(path), "--methods", "full,uniform,think,kivi[bits=4]",
                  "--budget", "0.25", "--max-new-tokens", "3", "--match-bytes", "--json")
    assert out.returncode == 0, out.stderr
    rows = {r["method"]: r for r in json.loads(out.stdout)}
    assert set(rows) == {"full", "uniform", "uniform+think", "uniform+kivi[bits=4]"}
    for method in ("uniform", "uniform+think", "uniform+kivi[bits=4]"):
        assert abs(rows[method]["kv_fraction"] - 0.25) <= 0.01, method
    assert rows["uniform+think"]["budget"] > 0.25
    table = run_cli("compare", "--model", "tiny", "--prompt-file", str(path), "--methods", "think", "--budget", "0.25",
                    "--max-new-tokens", "2", "--match-bytes")
    assert table.returncode == 0 and "uniform+think" in table.stdout and "budget" in table.stdout.splitlines()[0]
