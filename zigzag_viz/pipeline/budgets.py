"""Stage 3, allocate per-layer budgets (METHOD §3). Pure functions of numbers: no model, no torch.

Every rule returns integer tokens per layer, shape (L,), with Σ B_l = round(L·B_avg) and each
B_l in [min(w, cap_l), cap_l], where cap_l is what layer l can hold: n, or its sliding window when smaller
(`caps`, optional, shape (L,)). A kept fraction f means B_avg = f · mean(cap_l): a share of what full KV holds,
so the same f keeps the same share of the cache's bytes on models with and without sliding-window layers.
"""

from __future__ import annotations

import math

import numpy as np

from ..errors import BudgetError

SIGNALS = ("lmba", "entropy", "hidden", "lmbo")  # the layer uncertainties a budget rule can follow (METHOD §2)
DEFAULT_RHO = 0.2
DEFAULT_BETA = 20.0


def bounds(num_layers: int, n_tokens: int, window: int, caps=None) -> tuple[np.ndarray, np.ndarray]:
    """Per-layer (lowest, highest) tokens, each (L,): the window clipped to what the layer holds, and that."""
    high = np.full(num_layers, n_tokens, dtype=np.int64)
    if caps is not None:
        high = np.minimum(high, np.asarray(caps, dtype=np.int64))
    return np.minimum(window, high), high


def kept_fraction(value, name: str = "budget") -> float:
    """`value` (a number or its text) as a float in (0, 1]; BudgetError naming `name` for anything else
    (text that is not a number, NaN, ±inf, 0, negative, > 1, bool). The one check every caller uses."""
    try:
        if isinstance(value, bool):
            raise TypeError
        fraction = float(value)
    except (TypeError, ValueError):
        raise BudgetError(f"{name} must be a number in (0, 1], got {value!r:.40}") from None
    if not math.isfinite(fraction) or not 0.0 < fraction <= 1.0:
        raise BudgetError(f"{name} must be a number in (0, 1], got {value!r:.40}")
    return fraction


def average_budget(fraction: float, n_tokens: int, caps=None) -> float:
    """Average tokens per layer for a kept fraction 0 < fraction ≤ 1 of what full KV holds: of the n-token
    prompt in every layer, or with `caps` (L,) of each layer's own length (a sliding-window layer holds fewer),
    so that the fraction is a share of the full cache's bytes on every model."""
    held = n_tokens if caps is None else float(np.mean(np.minimum(np.asarray(caps, dtype=np.float64), n_tokens)))
    return kept_fraction(fraction) * held


def prompt_share(fraction: float, n_tokens: int, caps) -> float:
    """The same kept fraction as a share of the prompt's tokens per layer (it differs when layers slide)."""
    return average_budget(fraction, n_tokens, caps) / n_tokens


def smallest_kept_fraction(num_layers: int, n_tokens: int, window: int, caps=None) -> float:
    """The smallest kept fraction whose layer budgets still hold every layer's always-kept window."""
    low, high = bounds(num_layers, n_tokens, window, caps)
    return math.ceil(low.sum() / high.sum() * 1e4) / 1e4


def check_feasible(num_layers: int, avg_budget: float, n_tokens: int, window: int, caps=None) -> int:
    """round(L·B_avg), after checking that the layers' bounds can hold exactly that many tokens."""
    low, high = bounds(num_layers, n_tokens, window, caps)
    total = int(round(num_layers * avg_budget))
    if total < low.sum():
        smallest = smallest_kept_fraction(num_layers, n_tokens, window, caps)
        raise BudgetError(
            f"a budget of {avg_budget:.1f} tokens per layer is below the always-kept window of {low.max()} tokens "
            f"(prompt of {n_tokens} tokens): raise the budget to at least {smallest:.2f} or shrink the window"
        )
    if total > high.sum():
        raise BudgetError(
            f"a budget of {avg_budget:.1f} tokens per layer is more than the layers can hold "
            f"(at most {high.sum() / num_layers:.1f} on average)"
        )
    return total


def fit_to_bounds(raw: np.ndarray, weights: np.ndarray, low, high, total: int) -> np.ndarray:
    """Clip `raw` to [low, high], hand the excess or deficit to the unclipped layers in proportion to
    `weights` until nothing moves, then round by largest remainder so the integers sum to `total`.

    Solved as water-filling: B_l = clip(raw_l + θ·weight_l, low, high) with θ found by bisection.
    """
    raw = np.asarray(raw, dtype=np.float64)
    weights = np.clip(np.asarray(weights, dtype=np.float64), 0.0, None)
    if weights.sum() <= 0:
        weights = np.ones_like(raw)
    weights = weights / weights.sum() + 1e-12  # every layer may move, however small its weight

    def filled(theta: float) -> np.ndarray:
        return np.clip(raw + theta * weights, low, high)

    span = (abs(total) + np.abs(raw).sum() + np.sum(high) * len(raw)) / weights.min()
    lo_theta, hi_theta = -span, span
    for _ in range(200):
        mid = 0.5 * (lo_theta + hi_theta)
        if filled(mid).sum() < total:
            lo_theta = mid
        else:
            hi_theta = mid
    return largest_remainder(filled(hi_theta), total, low, high)


def largest_remainder(values: np.ndarray, total: int, low, high) -> np.ndarray:
    """Integers within [low, high] (scalars or per layer) near `values` that sum to `total`."""
    low = np.broadcast_to(low, values.shape)
    high = np.broadcast_to(high, values.shape)
    floors = np.clip(np.floor(values + 1e-9), low, high).astype(np.int64)
    remainder = int(total - floors.sum())
    fractions = values - floors
    if remainder > 0:
        order = [i for i in np.argsort(-fractions, kind="stable") if floors[i] < high[i]]
        for i in order[:remainder]:
            floors[i] += 1
    elif remainder < 0:
        order = [i for i in np.argsort(fractions, kind="stable") if floors[i] > low[i]]
        for i in order[:-remainder]:
            floors[i] -= 1
    return floors


def uniform_budgets(num_layers: int, avg_budget: float, n_tokens: int, window: int, caps=None) -> np.ndarray:
    """B_l = B_avg in every layer (SnapKV, StreamingLLM, L2-norm)."""
    total = check_feasible(num_layers, avg_budget, n_tokens, window, caps)
    low, high = bounds(num_layers, n_tokens, window, caps)
    return fit_to_bounds(np.full(num_layers, avg_budget), np.ones(num_layers), low, high, total)


def pyramid_budgets(
    num_layers: int, avg_budget: float, n_tokens: int, window: int, beta: float = DEFAULT_BETA, caps=None
) -> np.ndarray:
    """PyramidKV: linear from B_max at layer 0 down to B_min = B_avg/β at the last layer, B_max = 2·B_avg − B_min."""
    if beta < 1:
        raise BudgetError(f"pyramid beta must be ≥ 1, got {beta}")
    total = check_feasible(num_layers, avg_budget, n_tokens, window, caps)
    low, high = bounds(num_layers, n_tokens, window, caps)
    b_min = avg_budget / beta
    b_max = 2 * avg_budget - b_min
    raw = np.linspace(b_max, b_min, num_layers) if num_layers > 1 else np.array([avg_budget])
    return fit_to_bounds(raw, raw, low, high, total)


def zigzag_budgets(
    uncertainty: np.ndarray, avg_budget: float, n_tokens: int, window: int, rho: float = DEFAULT_RHO, caps=None
) -> np.ndarray:
    """ZigZag: B_l = ρ·B_avg + (1 − ρ)·B_avg·L·u_l with u_l = s_l / Σ s_j, from per-layer uncertainty s_l ≥ 0."""
    uncertainty = np.asarray(uncertainty, dtype=np.float64)
    if uncertainty.ndim != 1 or len(uncertainty) == 0:
        raise BudgetError("uncertainty must be one number per layer")
    if not np.all(np.isfinite(uncertainty)) or np.any(uncertainty < 0):
        raise BudgetError("uncertainty must be finite and non-negative")
    if not 0.0 <= rho <= 1.0:
        raise BudgetError(f"zigzag rho must lie in [0, 1], got {rho}")
    num_layers = len(uncertainty)
    total = check_feasible(num_layers, avg_budget, n_tokens, window, caps)
    low, high = bounds(num_layers, n_tokens, window, caps)
    share = uncertainty / uncertainty.sum() if uncertainty.sum() > 0 else np.full(num_layers, 1 / num_layers)
    raw = rho * avg_budget + (1 - rho) * avg_budget * num_layers * share
    return fit_to_bounds(raw, share, low, high, total)


def budget_curves(
    uncertainty: np.ndarray,
    budget: float,
    n_tokens: int,
    window: int,
    rho: float = DEFAULT_RHO,
    beta: float = DEFAULT_BETA,
    caps=None,
) -> dict[str, np.ndarray]:
    """Tokens per layer (L,) under ZigZag (from `uncertainty`), PyramidKV and uniform at kept fraction `budget`."""
    num_layers = len(uncertainty)
    avg = average_budget(budget, n_tokens, caps)
    return {
        "zigzag": zigzag_budgets(uncertainty, avg, n_tokens, window, rho=rho, caps=caps),
        "pyramid": pyramid_budgets(num_layers, avg, n_tokens, window, beta=beta, caps=caps),
        "uniform": uniform_budgets(num_layers, avg, n_tokens, window, caps=caps),
    }
