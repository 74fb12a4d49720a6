"""Signals from the window capture equal a reference from eager attention weights (`compare_with_eager` in
conftest.py)."""

import numpy as np
import pytest
import torch

from zigzag_viz.pipeline import attention, runtime
from zigzag_viz.pipeline.capture import LMBO_GRID, Cancelled, bin_columns, bin_edges, bin_texts, min_budget_fraction
from zigzag_viz.evaluation.prompts import passkey_prompt


def test_capture_matches_eager_on_tiny(tiny, random_ids, compare_with_eager):
    analysis = compare_with_eager(tiny, random_ids)
    assert analysis.entropy.shape == (4, 4)
    assert analysis.attention_rows.shape == (4, 4, 300)
    np.testing.assert_allclose(analysis.attention_rows.sum(-1), 1.0, atol=1e-5)
    assert analysis.kv_group.tolist() == [0, 0, 1, 1]


@pytest.mark.slow
@pytest.mark.parametrize("sentences, low, high", [(14, 250, 400), (55, 900, 1200)])
def test_capture_matches_eager_on_smollm2(smollm2, sentences, low, high, compare_with_eager):
    ids = smollm2.encode(passkey_prompt(n_sentences=sentences, seed=3).text)
    assert low <= ids.shape[1] <= high
    analysis = compare_with_eager(smollm2, ids)
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


def test_deep_capture_finds_the_smallest_budget_that_keeps_each_layer_output(tiny, random_ids):
    analysis = runtime.prefill(tiny, random_ids, 16, deep=True).analysis
    cos = analysis.lmbo_cos
    assert cos.shape == (4, len(LMBO_GRID))
    np.testing.assert_allclose(cos[:, -1], 1.0)
    assert np.all(cos <= 1.0 + 1e-6) and np.all(cos > 0)
    lmbo = analysis.lmbo(0.99)
    for layer in range(4):
        first = LMBO_GRID.index(lmbo[layer])
        assert cos[layer, first] >= 0.99
        assert np.all(cos[layer, :first] < 0.99)
    assert np.all(analysis.lmbo(0.5) <= lmbo)
    with pytest.raises(ValueError, match="deep"):
        runtime.prefill(tiny, random_ids, 16).analysis.lmbo()


def test_progress_reports_every_layer_and_can_cancel(tiny, random_ids):
    seen = []
    runtime.prefill(tiny, random_ids, 16, progress=seen.append)
    assert seen == [0, 1, 2, 3]

    def stop_at_two(layer):
        if layer == 2:
            raise Cancelled()

    with pytest.raises(Cancelled):
        runtime.prefill(tiny, random_ids, 16, deep=True, progress=stop_at_two)


def test_binning_keeps_totals_and_texts():
    edges = bin_edges(10, 4)
    assert edges.tolist() == [0, 2, 5, 8, 10]
    matrix = np.arange(20, dtype=float).reshape(2, 10)
    binned = bin_columns(matrix, edges)
    np.testing.assert_allclose(binned.sum(1), matrix.sum(1))
    np.testing.assert_allclose(bin_columns(matrix, edges, "mean")[0], [0.5, 3.0, 6.0, 8.5])
    assert bin_texts(list("abcdefghij"), edges) == ["ab", "cde", "fgh", "ij"]
    assert len(bin_edges(5000)) == 513


def test_window_output_used_by_lmbo_equals_the_attention_module_output(tiny, random_ids):
    from zigzag_viz.pipeline.capture import _window_output, decoder_layers

    seen, outputs = {}, {}

    class Keep:
        def on_attention(self, module, query, key, value, scaling, sliding_window):
            seen[module.layer_idx] = (module, query, key, value, scaling)

    handles = [
        layer.self_attn.register_forward_hook(lambda m, a, out, i=i: outputs.__setitem__(i, out[0]))
        for i, layer in enumerate(decoder_layers(tiny.model))
    ]
    try:
        with attention.observing(Keep()), torch.inference_mode():
            tiny.model(random_ids)
    finally:
        for handle in handles:
            handle.remove()
    for layer, (module, query, key, value, scaling) in seen.items():
        mine = _window_output(module, query, key, value, scaling, 16, None, None)
        assert (mine - outputs[layer][0, -16:].float()).abs().max().item() <= 1e-5
