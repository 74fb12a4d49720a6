"""Equal memory: the kept fraction at which a method holds a given share of full KV's bytes.

Token methods hold about the asked share already. Methods on another axis (KIVI's bits, ThinK's channels,
KVSharer's and MiniCache's layers) hold a share of their own whatever the kept fraction; to bring them to a
smaller share, uniform SnapKV-style eviction goes in front of them (`uniform+kivi`) and its kept fraction is
solved for. `solve_budget` is the numbers-only part; `Runner.matched` measures shares on the real cache.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from ..errors import BudgetError, InputError
from ..methods import CompositeMethod, CompressionMethod, parse_spec

TOLERANCE = 0.01  # |share − target| accepted as equal memory
MAX_PROBES = 12
TOKEN_STAGE_IN_FRONT = "uniform"


@dataclass(frozen=True)
class Matched:
    """A method as it runs at equal memory: the (possibly composed) method, its kept fraction, the share of
    full KV's bytes it measured at that fraction, and a note when the target could not be reached."""

    method: CompressionMethod
    budget: float
    share: float
    note: str | None = None


def solve_budget(share: Callable[[float], float], target: float, low: float,
                 tolerance: float = TOLERANCE, probes: int = MAX_PROBES) -> tuple[float, float]:
    """The kept fraction b in [low, 1] whose `share(b)` (non-decreasing, a share of full KV's bytes) is
    nearest `target`, and that share: first b = target, then false position between the bracketing probes,
    halving instead whenever one end stays put twice. Stops within `tolerance` or after `probes` calls."""
    seen: dict[float, float] = {}

    def probe(budget: float) -> float:
        budget = round(min(max(budget, low), 1.0), 4)
        if budget not in seen:
            seen[budget] = share(budget)
        return budget

    def best() -> tuple[float, float]:
        budget = min(seen, key=lambda b: (abs(seen[b] - target), b))
        return budget, seen[budget]

    first = probe(target)
    if abs(seen[first] - target) <= tolerance:
        return best()
    lo, hi = probe(low), probe(1.0)
    if seen[lo] >= target or seen[hi] <= target:
        return best()  # the target lies outside what the method can hold
    if seen[first] < target:
        lo = max(lo, first)
    else:
        hi = min(hi, first)
    last_side, repeats = None, 0
    while len(seen) < probes and hi - lo >= 1e-4:
        if repeats >= 2:  # one end has not moved for two probes: halve instead
            guess, repeats = (lo + hi) / 2, 0
        else:
            guess = lo + (target - seen[lo]) * (hi - lo) / (seen[hi] - seen[lo])
        budget = probe(guess)
        if budget in (lo, hi) or abs(seen[budget] - target) <= tolerance:
            break
        below = seen[budget] < target
        repeats = repeats + 1 if below == last_side else 1
        last_side = below
        if below:
            lo = budget
        else:
            hi = budget
    return best()


def equal_memory_candidate(method: CompressionMethod) -> CompressionMethod:
    """The method whose kept fraction moves its bytes: itself when it evicts tokens (or is lossless), else
    uniform eviction in front of it."""
    parts = method.parts if isinstance(method, CompositeMethod) else [method]
    if method.lossless or any(part.stage == "tokens" for part in parts):
        return method
    return CompositeMethod([parse_spec(TOKEN_STAGE_IN_FRONT), *parts])


def match_method(method: CompressionMethod, target: float, low: float,
                 share: Callable[[CompressionMethod, float], float]) -> Matched:
    """`method` brought to `target` of full KV's bytes, with `share(method, budget)` measuring one probe."""
    if method.lossless:
        return Matched(method, 1.0, 1.0, "full KV holds every byte")
    candidate = equal_memory_candidate(method)
    alone = None if candidate is method else share(method, 1.0)
    if alone is not None and alone <= target + TOLERANCE:
        note = None if alone >= target - TOLERANCE else \
            f"holds {alone:.0%} of the bytes whatever the kept fraction: less than {target:.0%}"
        return Matched(method, 1.0, alone, note)

    def measured(budget: float) -> float:
        try:
            return share(candidate, budget)
        except BudgetError:
            return float("inf")  # below what the layers must keep: never chosen, never brackets from below

    try:
        budget, reached = solve_budget(measured, target, low)
    except InputError as exc:
        if alone is None:
            raise
        return Matched(method, 1.0, alone, f"holds {alone:.0%} of the bytes: {exc}")  # cannot follow eviction (MiniCache)
    note = None if abs(reached - target) <= TOLERANCE else f"holds {reached:.0%} of the bytes at its nearest"
    return Matched(candidate, budget, reached, note)
