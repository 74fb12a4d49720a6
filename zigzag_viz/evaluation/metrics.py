"""Comparison metrics: pure functions of token lists and numbers."""

from __future__ import annotations

from typing import Sequence

import numpy as np


def first_divergence(reference: Sequence[int], candidate: Sequence[int]) -> int | None:
    """Index of the first generated token where `candidate` leaves `reference`; None if they are identical."""
    for index, (a, b) in enumerate(zip(reference, candidate)):
        if a != b:
            return index
    if len(reference) != len(candidate):
        return min(len(reference), len(candidate))
    return None


def token_agreement(reference: Sequence[int], candidate: Sequence[int]) -> float:
    """Share of positions (over the longer sequence) holding the same token in both; 1.0 for two empty lists."""
    length = max(len(reference), len(candidate))
    if length == 0:
        return 1.0
    same = sum(a == b for a, b in zip(reference, candidate))
    return same / length


def kv_fraction(kv_bytes: int, full_bytes: int) -> float:
    """Bytes held as a share of the full cache's bytes."""
    return kv_bytes / full_bytes if full_bytes else 0.0


def task_score(text: str, answer: str | None) -> float | None:
    """1.0 if the known answer appears in the text, 0.0 if not, None when the prompt has no known answer."""
    if not answer:
        return None
    return 1.0 if answer in text else 0.0


def kl_per_step(reference_logits: np.ndarray, candidate_logits: np.ndarray) -> np.ndarray:
    """KL(reference ‖ candidate) in nats for each step; logits (T, V) → (T,)."""
    def log_softmax(x):
        x = np.asarray(x, dtype=np.float64)
        shifted = x - x.max(axis=-1, keepdims=True)
        return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))

    log_p, log_q = log_softmax(reference_logits), log_softmax(candidate_logits)
    return np.maximum((np.exp(log_p) * (log_p - log_q)).sum(axis=-1), 0.0)


def top1_per_step(reference_logits: np.ndarray, candidate_logits: np.ndarray) -> np.ndarray:
    """1.0 where both logits (T, V) pick the same next token, else 0.0: (T,)."""
    return (np.argmax(reference_logits, axis=-1) == np.argmax(candidate_logits, axis=-1)).astype(np.float64)


def rouge_l(reference: str, candidate: str) -> float:
    """ROUGE-L F-measure of `candidate` against `reference` (rouge-score's tokenizer: lower-cased ASCII words)."""
    from rouge_score import rouge_scorer

    if not reference.strip() and not candidate.strip():
        return 1.0
    return float(rouge_scorer.RougeScorer(["rougeL"]).score(reference, candidate)["rougeL"].fmeasure)


def kept_token_map(
    kept: dict[int, list[np.ndarray]], held_lengths: Sequence[int], n_tokens: int, num_kv_heads: int
) -> np.ndarray:
    """Share of KV heads keeping each prompt token, (L, n) in [0, 1].

    `kept[layer]` lists the prompt positions each KV head kept; a layer absent from `kept` still holds the
    last `held_lengths[layer]` tokens (all of them, or a sliding window's).
    """
    shares = np.zeros((len(held_lengths), n_tokens))
    for layer, held in enumerate(held_lengths):
        if layer in kept:
            for positions in kept[layer]:
                shares[layer, np.asarray(positions, dtype=np.int64)] += 1.0 / num_kv_heads
        else:
            shares[layer, n_tokens - min(held, n_tokens) :] = 1.0
    return shares


def answer_token_positions(token_texts: Sequence[str], answer: str | None) -> list[int]:
    """Indices of the prompt tokens that spell any occurrence of `answer` in the joined token texts."""
    if not answer:
        return []
    text = "".join(token_texts)
    starts = np.cumsum([0] + [len(t) for t in token_texts])
    positions: set[int] = set()
    begin = text.find(answer)
    while begin >= 0:
        end = begin + len(answer)
        positions.update(i for i in range(len(token_texts)) if starts[i] < end and starts[i + 1] > begin)
        begin = text.find(answer, begin + 1)
    return sorted(positions)
