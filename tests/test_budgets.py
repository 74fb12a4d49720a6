import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from zigzag_viz.pipeline.budgets import (
    budget_curves,
    fit_to_bounds,
    kept_fraction,
    pyramid_budgets,
    uniform_budgets,
    zigzag_budgets,
)
from zigzag_viz.errors import BudgetError


@st.composite
def budget_problems(draw):
    num_layers = draw(st.integers(1, 40))
    n_tokens = draw(st.integers(1, 9000))
    window = draw(st.integers(1, 128))
    low = min(window, n_tokens)
    avg = draw(st.floats(low, n_tokens, allow_nan=False))
    signal = np.array(draw(st.lists(st.floats(0, 10, allow_nan=False), min_size=num_layers, max_size=num_layers)))
    rho = draw(st.floats(0, 1))
    beta = draw(st.floats(1, 100))
    return num_layers, n_tokens, window, avg, signal, rho, beta


def _check(budgets, num_layers, n_tokens, window, avg):
    assert budgets.dtype.kind == "i"
    assert len(budgets) == num_layers
    assert budgets.sum() == round(num_layers * avg)
    assert budgets.min() >= min(window, n_tokens)
    assert budgets.max() <= n_tokens


@settings(max_examples=300, deadline=None)
@given(budget_problems())
def test_every_rule_sums_exactly_and_stays_in_bounds(problem):
    num_layers, n_tokens, window, avg, signal, rho, beta = problem
    _check(zigzag_budgets(signal, avg, n_tokens, window, rho=rho), num_layers, n_tokens, window, avg)
    _check(pyramid_budgets(num_layers, avg, n_tokens, window, beta=beta), num_layers, n_tokens, window, avg)
    _check(uniform_budgets(num_layers, avg, n_tokens, window), num_layers, n_tokens, window, avg)


def test_zigzag_follows_the_formula_when_nothing_clips():
    signal = np.array([1.0, 2.0, 3.0, 4.0])
    budgets = zigzag_budgets(signal, avg_budget=100, n_tokens=1000, window=8, rho=0.2)
    expected = 0.2 * 100 + 0.8 * 100 * 4 * signal / signal.sum()  # 52, 84, 116, 148
    np.testing.assert_array_equal(budgets, expected.astype(int))


def test_zigzag_with_rho_one_is_uniform():
    budgets = zigzag_budgets(np.array([0.1, 5.0, 0.3]), 50, 400, 4, rho=1.0)
    np.testing.assert_array_equal(budgets, [50, 50, 50])


def test_zigzag_hands_excess_of_a_clipped_layer_to_the_others_by_uncertainty():
    # layer 0 asks for far more than n; the excess goes to layers 1 and 2 in proportion 1:3
    budgets = zigzag_budgets(np.array([100.0, 1.0, 3.0]), 200, 300, 8, rho=0.0)
    assert budgets[0] == 300
    assert budgets.sum() == 600
    assert budgets[2] > budgets[1]


def test_pyramid_falls_linearly_from_bmax_to_bmin():
    budgets = pyramid_budgets(5, 100, 1000, 1, beta=4)
    np.testing.assert_array_equal(budgets, [175, 138, 100, 62, 25])
    assert np.all(np.diff(budgets) < 0)


def test_uniform_spreads_the_remainder():
    budgets = uniform_budgets(3, 10.4, 100, 2)
    assert budgets.sum() == 31 and budgets.max() - budgets.min() <= 1


@pytest.mark.parametrize("fraction", [0, -0.1, 1.5, float("nan")])
def test_budget_out_of_range_is_refused(fraction):
    with pytest.raises(BudgetError):
        budget_curves(np.ones(4), fraction, 100, 8)


def test_budget_below_the_window_is_refused_with_the_smallest_valid_fraction():
    with pytest.raises(BudgetError, match="at least 0.32"):
        budget_curves(np.ones(4), 0.1, 100, 32)


def test_fit_to_bounds_keeps_order_of_weights():
    out = fit_to_bounds(np.array([0.0, 0.0, 0.0]), np.array([1.0, 2.0, 3.0]), 0, 100, 60)
    np.testing.assert_array_equal(out, [10, 20, 30])


def test_budget_curves_returns_the_three_rules():
    curves = budget_curves(np.array([0.5, 0.1, 0.9, 0.2]), 0.25, 400, 16)
    assert set(curves) == {"zigzag", "pyramid", "uniform"}
    assert all(c.sum() == 400 for c in curves.values())


@pytest.mark.parametrize("value", ["abc", "", None, True, float("nan"), float("inf"), -float("inf"), -1, 0, 0.0, 1.0001, "1e9", [0.2]])
def test_kept_fraction_refuses_what_is_not_a_fraction(value):
    with pytest.raises(BudgetError, match=r"^tau must be a number in \(0, 1\]"):
        kept_fraction(value, "tau")


@pytest.mark.parametrize(("value", "expected"), [("0.2", 0.2), (1, 1.0), ("1", 1.0), (1e-6, 1e-6), (np.float32(0.5), 0.5)])
def test_kept_fraction_accepts_numbers_and_their_text(value, expected):
    assert kept_fraction(value) == pytest.approx(expected)
