"""The guided story of presentation mode: five steps, each a real page in a focused state (no Streamlit here).

    ?present=1&step=uncertainty   →  layers differ in uncertainty (Uncertainty)
    step=budgets                  →  the budgets that follow (Budgets)
    step=answers                  →  what compression does to the answer (Compare)
    step=why                      →  why: which prompt tokens each layer kept (Compare, the kept-token map)
    step=often                    →  how often: the stored sweep (Runs)

Each step says one fixed sentence; the pages add what their data shows (the verdict, the measured scores), so
the story says where ZigZag loses to uniform on the model at hand.
"""

from __future__ import annotations

from dataclasses import dataclass

import pandas as pd


@dataclass(frozen=True)
class StoryStep:
    key: str
    page: str  # the page file, relative to the app's folder
    title: str
    says: str


STORY = (
    StoryStep("uncertainty", "pages/2_Uncertainty.py", "Layers differ in uncertainty",
              "Each layer spreads its attention differently: LMBA is the smallest share of the prompt that holds 90 % "
              "of a layer's attention. Where it is high, the layer needs many tokens; where it is low, a few do."),
    StoryStep("budgets", "pages/3_Budgets.py", "The budgets that follow",
              "ZigZag splits one total budget over the layers in proportion to that need (ρ mixes it with an equal "
              "share); PyramidKV gives early layers more; uniform gives every layer the same."),
    StoryStep("answers", "pages/1_Compare.py", "What compression does to the answer",
              "The same prompt decoded with full KV and with each compressed cache: the first token where an answer "
              "leaves full KV's is marked."),
    StoryStep("why", "pages/1_Compare.py", "Why: which prompt tokens each layer kept",
              "Each row is a layer, each column a stretch of the prompt; dark cells were evicted. The box marks the "
              "answer's tokens: a method that evicted them there cannot say them."),
    StoryStep("often", "pages/4_Runs.py", "How often: the sweep",
              "One prompt is an anecdote. Generated tasks (pass keys, needles, variable chains, article questions) "
              "in several wordings say how often each method keeps the answer at each kept fraction."),
)
STEP_KEYS = tuple(step.key for step in STORY)


def step_index(key: str | None, page_steps: tuple[str, ...]) -> int:
    """Index in STORY of `key` when it is one of this page's steps, else of the page's first step."""
    return STEP_KEYS.index(key if key in page_steps else page_steps[0])


def scores_sentence(rows: pd.DataFrame, model: str, at: float = 0.2) -> str | None:
    """ZigZag's and uniform's mean score at kept fraction `at` in each setting, against full KV's, in one
    sentence (rows: a run's or a study's, with method, mode, budget and score); None when they are missing."""
    rows = rows.dropna(subset=["score"])
    chosen = rows[(rows["method"].isin(["zigzag", "uniform"]) & ((rows["budget"] - at).abs() < 1e-9))
                  | (rows["method"] == "full")]
    means = chosen.groupby(["mode", "method"])["score"].mean()
    parts = []
    for mode in sorted(chosen["mode"].unique()):
        found = means[mode]
        if {"zigzag", "uniform", "full"} <= set(found.index):
            verdict = ("ZigZag ahead" if found["zigzag"] > found["uniform"] else
                       "ZigZag behind uniform" if found["zigzag"] < found["uniform"] else "a tie")
            parts.append(f"{mode} setting: ZigZag {found['zigzag']:.2f}, uniform {found['uniform']:.2f}, full KV "
                         f"{found['full']:.2f} ({verdict})")
    return (f"Measured on {model}, mean task score at {at:.0%} kept — " + "; ".join(parts) + ".") if parts else None
