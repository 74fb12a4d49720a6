"""Sweep rows summarised: pure functions of the stored rows' DataFrame (columns of `sweep.ROW_COLUMNS`).

Scores are per prompt in [0, 1] (partial credit for multi-string tasks); an interval over the prompts of a cell is
Wilson's score interval for the mean score taken as a proportion.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

CELL = ["task", "method", "mode", "budget"]


def wilson_interval(successes: float, count: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson score interval (low, high) for `successes` of `count` trials; (0, 1) with no trial."""
    if count <= 0:
        return 0.0, 1.0
    share = successes / count
    denominator = 1 + z * z / count
    centre = (share + z * z / (2 * count)) / denominator
    half = z * math.sqrt(share * (1 - share) / count + z * z / (4 * count * count)) / denominator
    return max(0.0, centre - half), min(1.0, centre + half)


def accuracy_table(rows: pd.DataFrame) -> pd.DataFrame:
    """One line per (task, method, mode, kept fraction): prompts with a score (NaN scores, from comparisons saved
    without an answer, are left out), mean score with its Wilson interval, mean held KV fraction and mean
    KL(full ‖ method) in nats."""
    grouped = rows.groupby(CELL, sort=True)
    table = grouped.agg(prompts=("score", "count"), score=("score", "mean"), kv_fraction=("kv_fraction", "mean"),
                        kl_mean=("kl_mean", "mean")).reset_index()
    bounds = [wilson_interval(s * n, n) for s, n in zip(table["score"], table["prompts"])]
    table["score_low"] = [low for low, _ in bounds]
    table["score_high"] = [high for _, high in bounds]
    return table


def smallest_lossless(rows: pd.DataFrame) -> pd.DataFrame:
    """Per task, method and mode: the smallest kept fraction from which on the mean score is never below full
    KV's on the same prompts (NaN when there is none), and the accuracy at that fraction."""
    table = accuracy_table(rows)
    full = table[table["method"] == "full"].groupby(["task", "mode"])["score"].mean()
    lines = []
    for (task, method, mode), group in table[table["method"] != "full"].groupby(["task", "method", "mode"]):
        target = full.get((task, mode), np.nan)
        group = group.sort_values("budget")
        matches = (group["score"] >= target - 1e-9).to_numpy()
        # smallest budget such that it and every larger one match
        tail = np.flip(np.cumprod(np.flip(matches))).astype(bool)
        lossless = group["budget"].to_numpy()[tail]
        lines.append({"task": task, "method": method, "mode": mode, "full_score": target,
                      "smallest_lossless": float(lossless[0]) if len(lossless) else np.nan})
    return pd.DataFrame(lines, columns=["task", "method", "mode", "full_score", "smallest_lossless"])


def depth_length_grid(rows: pd.DataFrame, method: str, mode: str, budget: float) -> pd.DataFrame:
    """Mean score of one method, mode and kept fraction per needle depth (rows) × prompt length (columns)."""
    chosen = rows[(rows["method"] == method) & (rows["mode"] == mode) & np.isclose(rows["budget"], budget)]
    return chosen.pivot_table(index="depth", columns="length", values="score", aggfunc="mean").sort_index()
