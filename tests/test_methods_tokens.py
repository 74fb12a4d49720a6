"""Token-eviction methods beyond the budget rules: StreamingLLM, L2-norm, AdaKV head split, and composition."""

import pytest
import torch

from zigzag_viz.pipeline import cache as kvcache
from zigzag_viz.pipeline import runtime
from zigzag_viz.evaluation.runner import compare
from zigzag_viz.errors import InputError
from zigzag_viz.methods import CompressionContext, parse_spec
from zigzag_viz.methods.adakv import head_split
from zigzag_viz.evaluation.prompts import passkey_prompt


@pytest.fixture(scope="module")
def prefilled(tiny):
    ids = tiny.encode(passkey_prompt(n_sentences=16, seed=9).text)
    return runtime.prefill(tiny, ids, window=16)


def _compressed(pre, spec, budget=0.3):
    cache = kvcache.clone(pre.cache)
    report = parse_spec(spec).compress(cache, CompressionContext(pre.analysis, budget))
    return cache, report


def test_streaming_keeps_the_sinks_and_the_most_recent_tokens(prefilled):
    cache, report = _compressed(prefilled, "streaming[sinks=4]")
    n = prefilled.n_tokens
    full_keys = prefilled.cache.layers[0].keys
    kept = cache.layers[0].keys
    budget = int(report.layer_budgets[0])
    expected = torch.cat([torch.arange(4), torch.arange(n - (budget - 4), n)])
    assert torch.equal(kept, full_keys[:, :, expected])


def test_l2norm_keeps_the_lowest_norm_keys_and_the_window(prefilled):
    cache, report = _compressed(prefilled, "l2norm")
    n, window = prefilled.n_tokens, prefilled.analysis.window
    norms = prefilled.cache.layers[1].keys[0].norm(dim=-1)  # (H_kv, n)
    kept = cache.layers[1].keys[0]
    budget = int(report.layer_budgets[1])
    for head in range(norms.shape[0]):
        others = norms[head, : n - window]
        expected = torch.sort(torch.topk(-others, budget - window).indices).values
        assert torch.equal(kept[head, : budget - window], prefilled.cache.layers[1].keys[0, head, expected])
        assert torch.equal(kept[head, budget - window :], prefilled.cache.layers[1].keys[0, head, n - window :])


def test_head_split_respects_the_safeguard_and_the_total():
    scores = torch.tensor([[9.0, 8.0, 7.0, 6.0, 0.1, 0.1, 0.1, 0.1], [0.1, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1]])
    keep = head_split(scores, budget=4, window=1, alpha=0.0)
    assert sum(len(k) for k in keep) == 8
    assert len(keep[0]) > len(keep[1])  # the head with concentrated scores takes more of the pooled budget
    assert all(k[-1].item() == 7 for k in keep)  # window kept per head
    even = head_split(scores, budget=4, window=1, alpha=1.0)
    assert [len(k) for k in even] == [4, 4]


def test_adakv_stores_heads_of_different_lengths_without_padding(prefilled, tiny):
    cache, report = _compressed(prefilled, "adakv")
    layer = cache.layers[0]
    assert isinstance(layer, kvcache.PerHeadLayer)
    lengths = layer.head_lengths()
    assert sum(lengths) == 2 * int(report.layer_budgets[0])
    head_dim = tiny.config.hidden_size // tiny.num_query_heads
    expected = sum(2 * sum(entry.head_lengths()) * head_dim * 4 for entry in cache.layers)
    assert kvcache.kv_bytes(cache) == expected
    tokens, logits = runtime.greedy_decode(tiny, cache, prefilled.next_logits, prefilled.n_tokens, 6)
    # six tokens unless an end-of-sequence token stops it earlier; the first comes from the prefill's logits
    stops = [i for i, token in enumerate(tokens) if token in tiny.eos_token_ids]
    assert len(tokens) == (stops[0] + 1 if stops else 6) and len(logits) == len(tokens)
    assert tokens[0] == int(prefilled.next_logits.argmax())
    # each token but the last was fed through the cache: every head grew by one entry per fed token
    assert layer.head_lengths() == [length + len(tokens) - 1 for length in lengths]
    extra = torch.tensor([[500, 600, 700]])
    together = runtime.forward_tokens(tiny, kvcache.clone(cache), extra, prefilled.n_tokens)
    stepwise_cache = kvcache.clone(cache)
    stepwise = torch.stack([runtime.forward_tokens(tiny, stepwise_cache, extra[:, i : i + 1], prefilled.n_tokens + i)[0]
                            for i in range(3)])
    assert (together - stepwise).abs().max().item() <= 1e-4


def test_head_split_keeps_infinite_scores_and_pools_negative_ones_by_their_order():
    sinks = torch.tensor([[float("inf"), 0.5, 0.2, 0.1, 0.1, 0.1], [float("inf"), 0.1, 0.1, 0.1, 0.1, 0.6]])
    keep = head_split(sinks, budget=3, window=1, alpha=0.0)
    assert sum(len(k) for k in keep) == 6 and all(k[0].item() == 0 and k[-1].item() == 5 for k in keep)
    assert 1 in keep[0].tolist()  # the best finite score of the first head
    norms = -torch.tensor([[1.0, 9.0, 8.0, 7.0, 6.0, 5.0], [5.0, 5.0, 5.0, 5.0, 5.0, 5.0]])  # −‖k‖: the lowest norm wins
    keep = head_split(norms, budget=3, window=1, alpha=0.0)
    assert sum(len(k) for k in keep) == 6 and 0 in keep[0].tolist() and all(torch.isfinite(k.float()).all() for k in keep)


@pytest.mark.parametrize("select", ["expected", "kvzip", "knorm", "hybrid"])
def test_adakv_splits_heads_on_any_selection(tiny, select):
    prompt = passkey_prompt(n_sentences=12, seed=6).text
    whole = compare(tiny, prompt, f"full,adakv[select={select}]", budget=1.0, max_new_tokens=6, window=16)
    assert whole.results[1].token_ids == whole.results[0].token_ids
    kept = compare(tiny, prompt, f"full,adakv[select={select}]", budget=0.3, max_new_tokens=6, window=16).results[1]
    assert kept.kv_fraction == pytest.approx(0.3, abs=0.01)


@pytest.mark.parametrize("spec", ["streaming", "l2norm", "adakv", "adakv[alloc=zigzag]"])
def test_budget_one_is_the_identity(tiny, spec):
    prompt = passkey_prompt(n_sentences=10, seed=4).text
    result = compare(tiny, prompt, f"full,{spec}", budget=1.0, max_new_tokens=8, window=16)
    assert result.results[1].token_ids == result.results[0].token_ids
    assert result.results[1].kv_fraction == 1.0


def test_compositions_must_mix_axes():
    with pytest.raises(InputError, match="different axes"):
        parse_spec("zigzag+l2norm")
    with pytest.raises(InputError, match="write method\\+method"):
        parse_spec("zigzag+")


@pytest.mark.slow
def test_token_methods_run_on_smollm2(smollm2):
    prompt = passkey_prompt(n_sentences=60, depth=0.5, seed=21)
    result = compare(smollm2, prompt.text, "full,streaming,l2norm,adakv", budget=0.3, max_new_tokens=12,
                     answer=prompt.answer)
    assert result.results[0].task_score == 1.0
    for row in result.results[1:]:
        assert row.kv_fraction == pytest.approx(0.3, abs=0.01)
