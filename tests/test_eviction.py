"""Real eviction: layers hold exactly their budgets, bytes come from the held tensors, budget 1.0 is the identity."""

import gc
import weakref

import numpy as np
import pytest
import torch

from zigzag_viz.pipeline import cache as kvcache
from zigzag_viz.pipeline import runtime
from zigzag_viz.evaluation.runner import compare
from zigzag_viz.methods import CompressionContext, parse_spec
from zigzag_viz.evaluation.prompts import passkey_prompt
from zigzag_viz.pipeline.selection import keep_top


def test_keep_top_keeps_the_window_and_the_best_in_order():
    scores = torch.tensor([[5.0, 0.0, 9.0, 1.0, 0.0, 0.0], [0.0, 7.0, 0.0, 8.0, 0.0, 0.0]])
    keep = keep_top(scores, budget=4, window=2)
    assert keep.tolist() == [[0, 2, 4, 5], [1, 3, 4, 5]]
    assert keep_top(scores, budget=9, window=2).tolist() == [list(range(6))] * 2


@pytest.mark.parametrize("spec", ["uniform", "pyramid", "zigzag", "zigzag[signal=hidden,select=knorm]", "uniform[select=hybrid]"])
def test_layers_hold_their_budgets_and_bytes_match_the_tensors(tiny, random_ids, spec):
    pre = runtime.prefill(tiny, random_ids, window=16)
    cache = kvcache.clone(pre.cache)
    report = parse_spec(spec).compress(cache, CompressionContext(pre.analysis, 0.25))
    budgets = report.layer_budgets
    assert budgets.sum() == round(4 * 0.25 * 300)
    assert kvcache.layer_lengths(cache) == budgets.tolist()
    head_dim = tiny.config.hidden_size // tiny.num_query_heads
    for layer, budget in enumerate(budgets):
        assert cache.layers[layer].keys.shape == (1, 2, budget, head_dim)
        assert cache.layers[layer].values.shape == (1, 2, budget, head_dim)
    expected = sum(2 * 2 * int(b) * head_dim * 4 for b in budgets)  # K and V, 2 KV heads, float32
    assert kvcache.kv_bytes(cache) == expected
    assert kvcache.kv_bytes(cache) / kvcache.kv_bytes(pre.cache) == pytest.approx(0.25, abs=0.01)


def test_eviction_keeps_the_right_rows_and_releases_the_old_tensor(tiny, random_ids):
    pre = runtime.prefill(tiny, random_ids, window=16)
    cache = kvcache.clone(pre.cache)
    original = cache.layers[1].keys
    before = original.clone()
    released = weakref.ref(original)
    keep = torch.tensor([[0, 5, 299], [3, 4, 299]])
    kvcache.evict(cache, 1, keep)
    del original
    gc.collect()
    assert released() is None
    kept = cache.layers[1].keys
    assert torch.equal(kept[0, 0], before[0, 0, [0, 5, 299]])
    assert torch.equal(kept[0, 1], before[0, 1, [3, 4, 299]])


@pytest.mark.parametrize("spec", ["uniform", "pyramid", "zigzag"])
def test_budget_one_gives_the_same_tokens_and_logits_as_full(tiny, spec):
    ids = tiny.encode(passkey_prompt(n_sentences=10, seed=2).text)
    pre = runtime.prefill(tiny, ids, window=16)
    n = ids.shape[1]
    full_tokens, full_logits = runtime.greedy_decode(tiny, kvcache.clone(pre.cache), pre.next_logits, n, 12)
    cache = kvcache.clone(pre.cache)
    parse_spec(spec).compress(cache, CompressionContext(pre.analysis, 1.0))
    assert kvcache.layer_lengths(cache) == [n] * 4
    tokens, logits = runtime.greedy_decode(tiny, cache, pre.next_logits, n, 12)
    assert tokens == full_tokens
    assert max((a - b).abs().max().item() for a, b in zip(full_logits, logits)) == 0.0


def test_compare_reports_every_method_against_full(tiny):
    prompt = passkey_prompt(n_sentences=12, seed=5)
    result = compare(tiny, prompt.text, "full,zigzag,pyramid,uniform", budget=0.3, max_new_tokens=8, window=16)
    rows = {r.method: r for r in result.results}
    assert rows["full"].kv_fraction == 1.0 and rows["full"].first_divergence is None
    assert rows["full"].token_agreement == 1.0
    reference = rows["full"].token_ids
    for name in ("zigzag", "pyramid", "uniform"):
        assert rows[name].kv_fraction == pytest.approx(0.3, abs=0.01)
        tokens = rows[name].token_ids
        same = sum(a == b for a, b in zip(reference, tokens))
        assert rows[name].token_agreement == same / max(len(reference), len(tokens))
        diverged = next((i for i, (a, b) in enumerate(zip(reference, tokens)) if a != b), None)
        if diverged is None and len(reference) != len(tokens):
            diverged = min(len(reference), len(tokens))
        assert rows[name].first_divergence == diverged
        assert sum(rows[name].layer_budgets) == round(4 * 0.3 * result.n_tokens)
    assert np.isclose(result.results[0].kv_fraction, 1.0)


@pytest.mark.parametrize("spec", ["zigzag", "adakv", "kivi[residual=4096]", "think[keep=1.0]"])
def test_teacher_forced_kl_is_zero_when_everything_is_kept(tiny, spec):
    prompt = passkey_prompt(n_sentences=10, seed=6).text
    result = compare(tiny, prompt, f"full,{spec}", budget=1.0, max_new_tokens=8, window=16)
    for row in result.results:
        assert row.kl_mean <= 1e-6 and row.top1_agreement == 1.0
        assert len(row.kl_curve) == len(result.results[0].token_ids)


def test_a_destructive_budget_shows_kl_above_zero(tiny):
    prompt = passkey_prompt(n_sentences=20, seed=6).text
    result = compare(tiny, prompt, "full,uniform,streaming", budget=0.05, max_new_tokens=8, window=16)
    full, *compressed = result.results
    assert full.kl_mean == 0.0 and full.top1_agreement == 1.0
    for row in compressed:
        # the first token comes from the uncompressed prefill
        assert row.kl_curve[0] == 0.0 and row.top1_curve[0] == 1.0
        assert row.kl_mean > 0.0
        assert {"kl_mean", "top1_agreement", "kl_curve", "top1_curve"} <= set(row.to_json())


def test_kl_and_top1_helpers():
    from zigzag_viz.evaluation.metrics import kl_per_step, top1_per_step

    a = np.array([[2.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    b = np.array([[2.0, 0.0, 0.0], [1.0, 0.0, 0.0]])
    kl = kl_per_step(a, b)
    # step 1: p = softmax(0, 1, 0), q = softmax(1, 0, 0) share a normaliser, so KL = p1 - p0 = (e - 1) / (e + 2)
    assert kl.tolist() == pytest.approx([0.0, (np.e - 1) / (np.e + 2)], abs=1e-12)
    assert top1_per_step(a, b).tolist() == [1.0, 0.0]
