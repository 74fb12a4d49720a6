"""The runner every caller uses: checks before the prefill, one prefill per prompt, rows as they land,
budgets computed once per row, progress that may cancel, the row cache, and the method contract."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import zigzag_viz
from zigzag_viz.errors import BudgetError, InputError
from zigzag_viz.evaluation import runner as runner_module
from zigzag_viz.evaluation.prompts import passkey_prompt
from zigzag_viz.evaluation.runner import LruCache, Runner, expected_layer_caps
from zigzag_viz.methods import METHODS, CompressionContext, parse_spec
from zigzag_viz.methods.uniform import Uniform
from zigzag_viz.pipeline import runtime
from zigzag_viz.pipeline.capture import Cancelled

PROMPT = passkey_prompt(n_sentences=14, seed=5)


@pytest.fixture()
def no_prefill(monkeypatch):
    """Fails the test if anything reaches the model's forward pass."""

    def refuse(*args, **kwargs):
        raise AssertionError("the prefill ran")

    monkeypatch.setattr(runtime, "prefill", refuse)
    monkeypatch.setattr(runtime, "forward_tokens", refuse)


@pytest.fixture()
def counted(monkeypatch):
    """Counts prefills and rows the runner computes: {'prefills': [mode, ...], 'rows': [(spec, budget), ...]}."""
    seen = {"prefills": [], "rows": []}
    real_prefill, real_row = runner_module.prefill_reference, runner_module.method_row

    def prefill(*args, **kwargs):
        seen["prefills"].append(args[4])
        return real_prefill(*args, **kwargs)

    def row(*args, **kwargs):
        seen["rows"].append((args[2].spec, args[3].budget))
        return real_row(*args, **kwargs)

    monkeypatch.setattr(runner_module, "prefill_reference", prefill)
    monkeypatch.setattr(runner_module, "method_row", row)
    return seen


@pytest.mark.parametrize(
    "settings, message",
    [
        (dict(methods="uniform", budgets=0.02), "below the always-kept window"),
        (dict(methods="uniform", budgets=[0.5, 0.02]), "below the always-kept window"),
        (dict(methods="nosuch"), "unknown method 'nosuch'"),
        (dict(methods="full,zigzag[rho=2]"), "rho"),
        (dict(methods="uniform", budgets=float("nan")), "budget"),
        (dict(methods="uniform", budgets=1.5), "budget"),
        (dict(methods="uniform", budgets="abc"), "budget"),
        (dict(methods="uniform", window=0), "window"),
        (dict(methods="uniform", max_new_tokens=0), "max_new_tokens"),
        (dict(methods="uniform", mode="later"), "mode"),
        (dict(methods="uniform", prompt="   "), "empty"),
        (dict(methods="uniform", prompt="no question here", mode="context"), "needs a question"),
    ],
)
def test_request_refuses_bad_settings_before_any_prefill(tiny, no_prefill, settings, message):
    settings = dict(settings)
    prompt = settings.pop("prompt", PROMPT.text)
    with pytest.raises(InputError, match=message):
        Runner(tiny).request(prompt, **settings)


def test_budget_check_counts_only_the_compressed_context(tiny, no_prefill):
    """In context mode the question is not compressed: the same budget can be possible in aware mode only."""
    runner = Runner(tiny)
    context_tokens = runner.request(PROMPT.text, "uniform", 0.5, mode="context", window=16).split
    aware_tokens = runner.request(PROMPT.text, "uniform", 0.5, window=16).split
    assert context_tokens < aware_tokens
    smallest = 16.5 / context_tokens  # the window must fit in every layer's budget
    runner.request(PROMPT.text, "uniform", smallest, mode="context", window=16)
    with pytest.raises(BudgetError):
        runner.request(PROMPT.text, "uniform", 15.0 / context_tokens, mode="context", window=16)


def test_methods_without_token_budgets_take_any_budget(tiny, no_prefill):
    request = Runner(tiny).request(PROMPT.text, "full,kivi,think", 0.01)
    assert request.specs == ("full", "kivi", "think") and request.needs == {"query_energy"}


def test_expected_layer_caps_match_the_prefill(tiny):
    ids = tiny.encode(PROMPT.text)
    analysis = Runner(tiny).analyze(ids, 16).analysis
    assert expected_layer_caps(tiny, ids.shape[1]) == analysis.layer_caps.tolist()


def test_rows_land_one_by_one_from_one_prefill(tiny, counted):
    runner = Runner(tiny)
    request = runner.request(PROMPT.text, "full,uniform,zigzag", [0.3, 0.6], window=16, max_new_tokens=4,
                             answer=PROMPT.answer)
    rows = runner.rows(request)
    first = next(rows)
    assert (first.method, first.budget) == ("full", 0.3)
    assert counted["prefills"] == ["aware"] and counted["rows"] == [("full", 0.3)]
    rest = list(rows)
    assert [(r.method, r.budget) for r in [first, *rest]] == [
        ("full", 0.3), ("uniform", 0.3), ("zigzag", 0.3), ("full", 0.6), ("uniform", 0.6), ("zigzag", 0.6)]
    assert counted["prefills"] == ["aware"]
    for row in [r for r in rest if r.method != "full"]:
        assert row.kv_fraction == pytest.approx(row.budget, abs=0.02)
        assert sum(row.layer_budgets) == round(tiny.num_layers * row.budget * request.split)


def test_layer_budgets_are_computed_once_per_row(tiny, monkeypatch):
    calls = []
    real = Uniform.layer_budgets
    monkeypatch.setattr(Uniform, "layer_budgets", lambda self, context: calls.append(context.budget) or real(self, context))
    runner = Runner(tiny)
    rows = list(runner.rows(runner.request(PROMPT.text, "uniform", [0.3, 0.5], window=16, max_new_tokens=3)))
    assert calls == [0.3, 0.5]
    assert [r.analysis_s > 0 for r in rows] == [True, True]


def test_progress_covers_the_run_and_may_cancel_it(tiny):
    heard = []
    runner = Runner(tiny, progress=lambda fraction, message: heard.append((fraction, message)))
    comparison = runner.compare(runner.request(PROMPT.text, "full,uniform", 0.4, window=16, max_new_tokens=3))
    fractions = [f for f, _ in heard]
    assert fractions == sorted(fractions) and heard[-1] == (1.0, "done")
    assert any("prefill: layer 4 of 4" in m for _, m in heard)
    assert [r.method for r in comparison.results] == ["full", "uniform"]

    def cancel_at_second_method(fraction, message):
        if message.startswith("uniform"):
            raise Cancelled("stopped by the user")

    runner = Runner(tiny, progress=cancel_at_second_method)
    rows = runner.rows(runner.request(PROMPT.text, "full,uniform", 0.4, window=16, max_new_tokens=3))
    assert next(rows).method == "full"
    with pytest.raises(Cancelled):
        next(rows)
    assert tiny.lock.acquire(blocking=False)  # the model is free again
    tiny.lock.release()


def test_the_row_cache_serves_what_was_computed(tiny, counted):
    cache = LruCache(references=1, rows=8)
    runner = Runner(tiny, cache=cache)
    first = runner.compare(runner.request(PROMPT.text, "full,uniform", 0.4, window=16, max_new_tokens=3))
    again = runner.compare(runner.request(PROMPT.text, "full,uniform", 0.4, window=16, max_new_tokens=3))
    assert counted["prefills"] == ["aware"] and len(counted["rows"]) == 2
    assert [r.text for r in again.results] == [r.text for r in first.results]
    runner.compare(runner.request(PROMPT.text, "full,uniform,pyramid", 0.4, window=16, max_new_tokens=3))
    assert counted["prefills"] == ["aware"] and counted["rows"][2:] == [("pyramid", 0.4)]
    runner.compare(runner.request(PROMPT.text, "uniform", 0.4, mode="context", window=16, max_new_tokens=3))
    assert counted["prefills"] == ["aware", "context"]


def test_a_method_that_needs_more_from_the_prefill_gets_its_own_prefill(tiny, counted):
    runner = Runner(tiny, cache=LruCache())
    runner.compare(runner.request(PROMPT.text, "uniform", 0.4, window=16, max_new_tokens=3))
    comparison = runner.compare(runner.request(PROMPT.text, "uniform,think", 0.4, window=16, max_new_tokens=3))
    assert counted["prefills"] == ["aware", "aware"] and [spec for spec, _ in counted["rows"]] == ["uniform", "think"]
    assert comparison.analysis.query_channel_energy is not None


def test_full_kv_is_an_ordinary_registered_method(tiny):
    full = parse_spec("full")
    assert METHODS["full"] is type(full) and full.lossless
    runner = Runner(tiny)
    request = runner.request(PROMPT.text, "full", 0.4, window=16, max_new_tokens=4)
    reference = runner.reference(request)
    context = CompressionContext(reference.pre.analysis, 0.4, loaded=tiny)
    assert full.budgets(context) is None
    (row,) = runner.rows(request, reference)
    assert row.token_ids == reference.tokens and row.kv_fraction == 1.0 and row.kl_mean == 0.0
    assert row.analysis_s == 0.0 and row.layer_budgets == reference.full_lengths


NEW_METHOD = '''"""Keeps the earliest tokens of the prompt (plus the window): a plain token-scoring method in one file."""

import torch

from .base import register
from .uniform import Uniform


@register
class EarliestFirst(Uniform):
    name = "earliest"
    summary = "keeps the earliest tokens plus the window, same budget per layer"
    parameters = {}

    def scores(self, cache, layer, context):
        held = cache.layers[layer].keys.shape[-2]
        order = -torch.arange(held, dtype=torch.float32)
        return order.expand(cache.layers[layer].keys.shape[1], held)
'''


@pytest.mark.slow
def test_a_new_method_is_one_new_file(tmp_path):
    """Copy the package, add one file under methods/, and the CLI lists the method and runs it."""
    package = Path(zigzag_viz.__file__).parent
    shutil.copytree(package, tmp_path / "zigzag_viz", ignore=shutil.ignore_patterns("__pycache__"))
    (tmp_path / "zigzag_viz" / "methods" / "earliest.py").write_text(NEW_METHOD)
    (tmp_path / "prompt.txt").write_text(PROMPT.text)
    env = dict(os.environ, PYTHONPATH=str(tmp_path))

    def cli(*args):
        done = subprocess.run([sys.executable, "-m", "zigzag_viz.cli", *args], capture_output=True, text=True,
                              env=env, cwd=tmp_path, timeout=600)
        assert done.returncode == 0, done.stderr
        return done.stdout

    assert any(line.startswith("earliest ") for line in cli("methods").splitlines())
    import json

    rows = json.loads(cli("compare", "--model", "tiny", "--prompt-file", "prompt.txt", "--methods", "full,earliest",
                          "--budget", "0.3", "--window", "16", "--max-new-tokens", "3", "--json"))
    assert [r["method"] for r in rows] == ["full", "earliest"]
    assert rows[1]["kv_fraction"] == pytest.approx(0.3, abs=0.02)
    code = ("from zigzag_viz.presentation.charts import METHOD_COLOURS, method_colour; "
            "c = method_colour('earliest'); print(c, c in METHOD_COLOURS.values())")
    colour, taken = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                                   cwd=tmp_path, timeout=120).stdout.split()
    assert colour.startswith("#") and len(colour) == 7 and taken == "False"


@pytest.mark.slow
def test_runner_on_smollm2_checks_before_the_prefill_and_serves_rows(smollm2, counted, monkeypatch):
    prompt = passkey_prompt(n_sentences=20, seed=41)
    runner = Runner(smollm2)
    with pytest.raises(BudgetError, match="always-kept window"):
        runner.request(prompt.text, "full,zigzag", 0.02)
    assert counted["prefills"] == []
    request = runner.request(prompt.text, "full,zigzag,uniform", [0.3, 0.7], max_new_tokens=12, answer=prompt.answer)
    rows = list(runner.rows(request))
    assert counted["prefills"] == ["aware"] and len(rows) == 6
    full = rows[0]
    assert full.task_score == 1.0 and prompt.answer in full.text
    for row in rows:
        assert row.budget in (0.3, 0.7)
        if row.method != "full":
            assert np.sum(row.layer_budgets) == round(smollm2.num_layers * row.budget * request.split)
            assert row.kv_fraction == pytest.approx(row.budget, abs=0.01)
    assert [r.task_score for r in rows] == [float(prompt.answer in r.text) for r in rows]
