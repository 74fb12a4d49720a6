"""The per-layer attention path: equal to plain SDPA, and right on caches whose layers differ in length."""

import torch

from zigzag_viz.pipeline import attention, runtime
from zigzag_viz.pipeline import cache as kvcache
from zigzag_viz.pipeline.attention import bottom_right_causal_mask
from zigzag_viz.pipeline.selection import keep_top


def test_bottom_right_mask_aligns_new_queries_with_the_end_of_the_cache():
    mask = bottom_right_causal_mask(2, 5, "cpu")[0, 0]
    assert mask.tolist() == [[True, True, True, True, False], [True, True, True, True, True]]
    sliding = bottom_right_causal_mask(1, 5, "cpu", sliding_window=2)[0, 0]
    assert sliding.tolist() == [[False, False, False, True, True]]


def _feed(loaded, ids, extra, implementation):
    with attention.implementation(loaded.model, implementation):
        cache = runtime.new_cache(loaded)
        first = runtime.forward_tokens(loaded, cache, ids, 0)
        second = runtime.forward_tokens(loaded, cache, extra, ids.shape[1])
    return first, second


def test_keep_everything_matches_plain_sdpa_when_feeding_several_tokens(tiny, random_ids):
    extra = torch.tensor([[500, 600, 700, 800, 900]])
    plain = _feed(tiny, random_ids, extra, "sdpa")
    ours = _feed(tiny, random_ids, extra, attention.IMPLEMENTATION)
    for a, b in zip(plain, ours):
        assert (a - b).abs().max().item() <= 1e-5


def _ragged_cache(loaded, ids):
    """A cache whose layers keep 300, 200, 120 and 60 of the prompt's tokens."""
    cache = runtime.new_cache(loaded)
    runtime.forward_tokens(loaded, cache, ids, 0)
    for layer, budget in enumerate([300, 200, 120, 60]):
        scores = torch.rand(loaded.num_kv_heads, ids.shape[1], generator=torch.Generator().manual_seed(layer))
        kvcache.evict(cache, layer, keep_top(scores, budget, window=16))
    return cache


def test_several_tokens_at_once_equal_one_at_a_time_on_a_ragged_cache(tiny, random_ids):
    extra = torch.tensor([[500, 600, 700, 800]])
    n = random_ids.shape[1]
    together_cache = _ragged_cache(tiny, random_ids)
    assert kvcache.layer_lengths(together_cache) == [300, 200, 120, 60]
    together = runtime.forward_tokens(tiny, together_cache, extra, n)
    single_cache = _ragged_cache(tiny, random_ids)
    single = torch.stack(
        [runtime.forward_tokens(tiny, single_cache, extra[:, i : i + 1], n + i)[0] for i in range(extra.shape[1])]
    )
    assert (together - single).abs().max().item() <= 1e-5
    assert kvcache.layer_lengths(together_cache) == [304, 204, 124, 64]
