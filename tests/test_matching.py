"""Equal memory: the solver on plain functions, and every method brought to the same bytes on real caches."""

import numpy as np
import pytest

from zigzag_viz.errors import InputError
from zigzag_viz.evaluation.matching import TOLERANCE, equal_memory_candidate, match_method, solve_budget
from zigzag_viz.evaluation.prompts import example_prompt
from zigzag_viz.evaluation.runner import Runner
from zigzag_viz.methods import parse_spec


@pytest.mark.parametrize("curve", [
    lambda b: 0.3 * b,                              # KIVI-like: a constant share per kept token
    lambda b: 0.05 + 0.7 * b ** 2,                  # convex
    lambda b: np.floor(b * 200) / 200 * 0.8,        # steps of whole tokens
    lambda b: min(1.0, 0.1 + 0.5 * np.sqrt(b)),     # concave, saturating
])
@pytest.mark.parametrize("target", [0.08, 0.15, 0.2, 0.35])
def test_the_solver_finds_the_budget_of_any_increasing_share_within_the_tolerance(curve, target):
    calls = []
    budget, share = solve_budget(lambda b: calls.append(b) or float(curve(b)), target, low=0.02)
    reachable = curve(0.02) <= target <= curve(1.0)
    if reachable:
        assert abs(share - target) <= TOLERANCE and 0.02 <= budget <= 1.0
    else:  # the nearest end
        assert budget in (0.02, 1.0)
    assert share == pytest.approx(curve(budget)) and len(calls) <= 12 and len(set(calls)) == len(calls)


def test_a_target_below_what_the_layers_must_keep_gives_the_smallest_budget_with_a_note():
    matched = match_method(parse_spec("uniform"), 0.05, 0.1, lambda method, budget: budget)
    assert matched.budget == 0.1 and matched.share == 0.1 and "nearest" in matched.note


def test_a_method_that_cannot_follow_eviction_runs_alone_with_a_note():
    def share(method, budget):
        if method.spec.startswith("uniform+"):
            raise InputError("minicache merges layers token by token: it cannot follow token eviction")
        return 0.8

    matched = match_method(parse_spec("minicache"), 0.2, 0.05, share)
    assert matched.method.spec == "minicache" and matched.share == 0.8 and "cannot follow" in matched.note


def test_methods_on_other_axes_get_uniform_eviction_in_front_and_token_methods_stay_themselves():
    assert equal_memory_candidate(parse_spec("kivi")).spec == "uniform+kivi"
    assert equal_memory_candidate(parse_spec("think[keep=0.25]")).spec == "uniform+think[keep=0.25]"
    for spec in ("zigzag", "pyramid+kivi", "full", "streaming"):
        assert equal_memory_candidate(parse_spec(spec)).spec == spec


@pytest.mark.slow
def test_on_smollm2_every_method_holds_the_asked_share_of_the_bytes(smollm2):
    """Match bytes on the real model in both settings: KIVI, ThinK and KVSharer are brought to 20 % of full KV's
    bytes (their own share is larger), token methods stay as asked; rows decode at those budgets."""
    runner = Runner(smollm2)
    specs = "full,zigzag,uniform,kivi,think,kvsharer,kivi[bits=4]"
    for mode in ("aware", "context"):
        plain = runner.compare(runner.request(example_prompt().text, specs, 0.2, mode=mode, max_new_tokens=3))
        matched = runner.compare(runner.request(example_prompt().text, specs, 0.2, mode=mode, max_new_tokens=3,
                                                match_bytes=True))
        before = {r.method: r.kv_fraction for r in plain.results}
        assert before["kivi"] > 0.21 and before["think"] > 0.5 and before["kvsharer"] > 0.5  # unequal without it
        rows = {r.method: r for r in matched.results}
        assert set(rows) == {"full", "zigzag", "uniform", "uniform+kivi", "uniform+think", "uniform+kvsharer",
                             "uniform+kivi[bits=4]"}
        for method, row in rows.items():
            if method != "full":
                assert row.kv_fraction == pytest.approx(0.2, abs=TOLERANCE), (mode, method)
        assert rows["uniform+kivi"].budget > rows["uniform+kivi[bits=4]"].budget > rows["uniform+think"].budget > 0.2
        assert rows["zigzag"].budget == 0.2 and "At other memory" not in matched.verdict()
