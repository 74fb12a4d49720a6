"""Why a layer allocation helps or hurts: per layer, how much of the answer each method's KV heads kept.

    prompts = explanation_prompts(6)                         # generated pass-key prompts, several families
    table = mean_retention([answer_retention(c) for c in comparisons])
    print(retention_verdict(table))

Numbers in, numbers out: a comparison's kept-token maps (L, n_context: share of KV heads keeping each token) and
the known answer's token positions give, per method and layer, the share of the answer's (token, KV head) pairs
kept and the layer's budget in tokens.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import pandas as pd

from .compare import Comparison
from .tasks import FAMILIES, TASKS, TaskPrompt

EXPLANATION_SEED = 9000  # seeds no sweep, calibration or benchmark uses


def approximate_tokens(text: str) -> int:
    """About how many tokens `text` holds (4 per 3 words), for sizing prompts without the model's tokenizer."""
    return (4 * len(text.split())) // 3


def explanation_prompts(count: int, length: int = 512, seed: int = EXPLANATION_SEED) -> list[TaskPrompt]:
    """`count` pass-key prompts of about `length` tokens, cycling through the task's families and needle depths
    0.2 / 0.5 / 0.8, sized without the model (so a remote backend can run them too)."""
    task = TASKS["passkey"]
    depths = (0.2, 0.5, 0.8)
    return [task.generate(length, depths[index % len(depths)], index, FAMILIES[index % len(FAMILIES)],
                          approximate_tokens, seed) for index in range(count)]


def answer_retention(comparison: Comparison) -> pd.DataFrame:
    """One row per (method, layer) of a comparison with a known answer: `answer_kept` in [0, 1] (share of the
    answer's tokens × KV heads still in the cache), `budget` (tokens the layer kept); empty without an answer."""
    positions = comparison.answer_positions
    if not positions:
        return pd.DataFrame(columns=["method", "layer", "answer_kept", "budget"])
    rows = []
    for result in comparison.results:
        kept = np.asarray(result.kept_map)[:, positions].mean(axis=1)
        for layer, (share, budget) in enumerate(zip(kept, result.layer_budgets)):
            rows.append({"method": result.method, "layer": layer, "answer_kept": float(share), "budget": int(budget)})
    return pd.DataFrame(rows)


def mean_retention(tables: Sequence[pd.DataFrame]) -> pd.DataFrame:
    """Mean `answer_kept` and `budget` per (method, layer) over prompts, with `prompts` counted."""
    frames = [t for t in tables if len(t)]
    if not frames:
        return pd.DataFrame(columns=["method", "layer", "answer_kept", "budget", "prompts"])
    joined = pd.concat(frames, ignore_index=True)
    grouped = joined.groupby(["method", "layer"], sort=False)
    return grouped.agg(answer_kept=("answer_kept", "mean"), budget=("budget", "mean"),
                       prompts=("answer_kept", "size")).reset_index()


def retention_verdict(table: pd.DataFrame, method: str = "zigzag", reference: str = "uniform",
                      margin: float = 0.2) -> str:
    """One or two sentences: the layers where `method` keeps at least `margin` less of the answer than
    `reference` (and how its budget there compares), and those where it keeps more."""
    if table.empty or not {method, reference} <= set(table["method"]):
        return f"Run {method} and {reference} on prompts with a known answer to see where they differ."
    ours = table[table["method"] == method].set_index("layer")
    theirs = table[table["method"] == reference].set_index("layer")
    gap = ours["answer_kept"] - theirs["answer_kept"]
    ratio = ours["budget"] / theirs["budget"].clip(lower=1)
    lost = [f"{layer} (budget ×{ratio[layer]:.2f})" for layer in gap.index if gap[layer] <= -margin]
    won = [f"{layer} (×{ratio[layer]:.2f})" for layer in gap.index if gap[layer] >= margin]
    prompts = int(ours["prompts"].iloc[0])
    overall = ours["answer_kept"].mean() - theirs["answer_kept"].mean()
    parts = [f"Over {prompts} prompt(s), {method} keeps {abs(overall):.0%} {'less' if overall < 0 else 'more'} of the "
             f"answer than {reference} on average over layers."]
    if lost:
        parts.append(f"It loses the answer in layer(s) {', '.join(lost)}, where its budget is the factor shown times "
                     f"{reference}'s.")
    if won:
        parts.append(f"It keeps more of it in layer(s) {', '.join(won)}.")
    if not lost and not won:
        parts.append(f"No layer differs by {margin:.0%} or more.")
    return " ".join(parts)
