"""Expected Attention against a reference computed the slow obvious way on the tiny model: each window token's
query recomputed from its hidden state by the layer's own projection and RoPE at every future position, moments
taken over those, and every key scored in a loop. Then the method in the pipeline: identity at 1.0, real
eviction, several tokens at once like one at a time, and the prefill records only what it needs."""

import numpy as np
import pytest
import torch
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from zigzag_viz.evaluation.prompts import passkey_prompt
from zigzag_viz.evaluation.runner import Runner
from zigzag_viz.methods import METHODS, CompressionContext, parse_spec
from zigzag_viz.pipeline import cache as kvcache
from zigzag_viz.pipeline import runtime
from zigzag_viz.pipeline.capture import decoder_layers
from zigzag_viz.pipeline.selection import EXPECTED_EPSILON, LayerInputs, expected_scores, future_query_moments

FUTURE, WINDOW = 8, 16


@pytest.fixture(scope="module")
def prefilled(tiny):
    ids = tiny.encode(passkey_prompt(n_sentences=10, seed=4).text)
    return ids, runtime.prefill(tiny, ids, WINDOW, needs=frozenset({"window_queries"}))


def slow_moments(tiny, ids, layer: int):
    """Mean (H_q, d) and covariance (H_q, d, d) of the window tokens' queries at each of the next FUTURE positions,
    recomputed from the layer's input hidden states."""
    model = tiny.model
    with torch.inference_mode():
        hidden = model(ids, output_hidden_states=True, use_cache=False).hidden_states[layer][0]
        block = decoder_layers(model)[layer]
        n, heads, dim = ids.shape[1], tiny.num_query_heads, tiny.config.head_dim
        window = block.self_attn.q_proj(block.input_layernorm(hidden[n - WINDOW:]))
        queries = window.view(WINDOW, heads, dim).transpose(0, 1)[None]  # (1, H_q, w, d), before RoPE
        moved = []
        for t in range(n, n + FUTURE):
            cos, sin = model.model.rotary_emb(hidden[None], torch.full((1, WINDOW), t))
            rotated, _ = apply_rotary_pos_emb(queries, queries, cos, sin)
            moved.append(rotated[0])
    moved = torch.cat(moved, dim=1).double()  # (H_q, w·F, d)
    mean = moved.mean(1)
    centred = moved - mean[:, None]
    return mean, torch.einsum("hnd,hne->hde", centred, centred) / (moved.shape[1] - 1)


def test_moments_of_future_queries_match_recomputed_queries(tiny, prefilled):
    ids, pre = prefilled
    n = ids.shape[1]
    for layer in range(tiny.num_layers):
        mean, covariance = future_query_moments(torch.from_numpy(pre.analysis.window_queries[layer]),
                                                torch.arange(n - WINDOW, n), n, runtime.rotation(tiny, layer), FUTURE)
        slow_mean, slow_covariance = slow_moments(tiny, ids, layer)
        np.testing.assert_allclose(mean.double(), slow_mean, atol=1e-4)
        np.testing.assert_allclose(covariance.double(), slow_covariance, atol=1e-4)


def test_scores_match_a_key_by_key_loop_and_rank_the_same(tiny, prefilled):
    ids, pre = prefilled
    n, layer = ids.shape[1], 2
    keys, values = pre.cache.layers[layer].keys, pre.cache.layers[layer].values
    scaling = decoder_layers(tiny.model)[layer].self_attn.scaling
    inputs = LayerInputs(torch.zeros(1), keys, values, torch.from_numpy(pre.analysis.window_queries[layer]),
                         torch.arange(n - WINDOW, n), n, runtime.rotation(tiny, layer), scaling)
    fast = expected_scores(inputs, future=FUTURE)
    mean, covariance = slow_moments(tiny, ids, layer)
    heads_kv, group = keys.shape[1], tiny.num_query_heads // keys.shape[1]
    slow = torch.zeros(heads_kv, n, dtype=torch.float64)
    for head in range(tiny.num_query_heads):
        kv = head // group
        exponents = torch.tensor([scaling * mean[head] @ k + 0.5 * scaling**2 * k @ covariance[head] @ k
                                  for k in keys[0, kv].double()])
        shares = torch.softmax(exponents, dim=0)
        slow[kv] += (shares + EXPECTED_EPSILON) * values[0, kv].double().norm(dim=-1) / group
    slow[:, :4] = float("inf")  # attention sinks
    finite = torch.isfinite(slow)
    np.testing.assert_allclose(fast.double()[finite], slow[finite], rtol=1e-4)
    assert torch.equal(torch.argsort(fast[:, 4:], dim=-1), torch.argsort(slow[:, 4:].float(), dim=-1))


def test_the_prefill_records_window_queries_only_for_methods_that_need_them(tiny):
    assert METHODS["expected"]().prefill_needs == {"window_queries"}
    assert parse_spec("zigzag[select=expected]").prefill_needs == {"window_queries"}
    assert parse_spec("zigzag").prefill_needs == frozenset()
    runner = Runner(tiny)
    request = runner.request(passkey_prompt(n_sentences=8, seed=1).text, "full,uniform", 0.5, window=WINDOW)
    assert runner.reference(request).pre.analysis.window_queries is None
    request = runner.request(passkey_prompt(n_sentences=8, seed=1).text, "full,expected", 0.5, window=WINDOW)
    queries = runner.reference(request).pre.analysis.window_queries
    assert queries.shape == (tiny.num_layers, tiny.num_query_heads, WINDOW, tiny.config.head_dim)


@pytest.mark.parametrize("mode", ["aware", "context"])
def test_expected_attention_keeps_everything_at_1_and_evicts_for_real_below(tiny, mode):
    prompt = passkey_prompt(n_sentences=12, seed=5).text
    runner = Runner(tiny)
    full_budget = runner.compare(runner.request(prompt, "full,expected,pyramid[select=expected]", 1.0, mode,
                                                window=WINDOW, max_new_tokens=6))
    reference, *rows = full_budget.results
    assert all(r.token_ids == reference.token_ids and r.kl_mean <= 1e-6 for r in rows)
    kept = runner.compare(runner.request(prompt, "full,expected,zigzag[select=expected]", 0.3, mode, window=WINDOW,
                                         max_new_tokens=6))
    for row in kept.results[1:]:
        assert row.kv_fraction == pytest.approx(0.3, abs=0.01)
        assert np.allclose(row.kept_map.sum(axis=1), row.layer_budgets, atol=1e-4)


def test_several_tokens_through_an_expected_attention_cache_equal_one_at_a_time(tiny, prefilled):
    _, pre = prefilled
    method = METHODS["expected"]()
    cache = kvcache.clone(pre.cache)
    method.compress(cache, CompressionContext(pre.analysis, 0.4, loaded=tiny))
    assert kvcache.kv_bytes(cache) < 0.45 * kvcache.kv_bytes(pre.cache)
    chunk = torch.tensor([[11, 42, 7, 19]])
    together = runtime.forward_tokens(tiny, kvcache.clone(cache), chunk, pre.n_tokens)
    one_by_one = kvcache.clone(cache)
    alone = torch.cat([runtime.forward_tokens(tiny, one_by_one, chunk[:, i:i + 1], pre.n_tokens + i) for i in range(4)])
    torch.testing.assert_close(together, alone, rtol=1e-4, atol=1e-4)
