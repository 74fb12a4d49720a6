"""Signals from the window capture equal a reference from eager attention weights (tests only)."""

import numpy as np
import pytest
import torch

from zigzag_viz import attention, runtime
from zigzag_viz.capture import min_budget_fraction
from zigzag_viz.prompts import passkey_prompt


def eager_reference(loaded, ids, window):
    """Entropy (L, H), mean window rows (L, H, n) and hidden change (L, n) from full eager attention maps."""
    with attention.implementation(loaded.model, "eager"), torch.inference_mode():
        out = loaded.model(ids, output_attentions=True, output_hidden_states=True, use_cache=False)
    n = ids.shape[1]
    w = min(window, n)
    entropies, rows = [], []
    for maps in out.attentions:
        probs = maps[0, :, n - w :, :].double()  # (H, w, n)
        entropies.append(torch.special.entr(probs).sum(-1).mean(-1).numpy())
        rows.append(probs.mean(1).numpy())
    hidden = out.hidden_states
    changes = []
    for layer in range(len(out.attentions)):
        layer_in, layer_out = hidden[layer][0], hidden[layer + 1][0]
        if layer == len(out.attentions) - 1:
            continue  # the last hidden state has the final norm applied
        changes.append((1 - torch.nn.functional.cosine_similarity(layer_in, layer_out, dim=-1)).numpy())
    return np.stack(entropies), np.stack(rows), np.stack(changes)


def _compare_with_eager(loaded, ids, window=32):
    analysis = runtime.prefill(loaded, ids, window).analysis
    entropy, rows, hidden = eager_reference(loaded, ids, window)
    np.testing.assert_allclose(analysis.entropy, entropy, atol=1e-4)
    np.testing.assert_allclose(analysis.attention_rows, rows, atol=1e-4)
    np.testing.assert_allclose(analysis.lmba(0.9), min_budget_fraction(rows, 0.9), atol=1e-4)
    np.testing.assert_allclose(analysis.hidden_change[: len(hidden)], hidden, atol=1e-4)
    return analysis


def test_capture_matches_eager_on_tiny(tiny, random_ids):
    analysis = _compare_with_eager(tiny, random_ids)
    assert analysis.entropy.shape == (4, 4)
    assert analysis.attention_rows.shape == (4, 4, 300)
    np.testing.assert_allclose(analysis.attention_rows.sum(-1), 1.0, atol=1e-5)
    assert analysis.kv_group.tolist() == [0, 0, 1, 1]


@pytest.mark.slow
def test_capture_matches_eager_on_smollm2(smollm2):
    ids = smollm2.encode(passkey_prompt(n_sentences=14, seed=3).text)
    assert 250 <= ids.shape[1] <= 400
    analysis = _compare_with_eager(smollm2, ids)
    assert analysis.entropy.shape == (30, 9)


def test_min_budget_fraction_counts_the_smallest_covering_set():
    rows = np.array([[0.5, 0.3, 0.1, 0.1], [0.25, 0.25, 0.25, 0.25]])
    np.testing.assert_allclose(min_budget_fraction(rows, 0.8), [0.5, 1.0])
    np.testing.assert_allclose(min_budget_fraction(rows, 0.5), [0.25, 0.5])


def test_capture_prefill_gives_the_same_logits_as_plain_sdpa(tiny, random_ids):
    with attention.implementation(tiny.model, "sdpa"), torch.inference_mode():
        plain = tiny.model(random_ids).logits[0, -1]
    captured = runtime.prefill(tiny, random_ids, 32).next_logits
    assert (plain - captured).abs().max().item() <= 1e-5
