"""Grouped-query attention over stored tensors: equal to SDPA with repeated KV heads, and per head to the dense result."""

import pytest
import torch

from zigzag_viz.pipeline import cache as kvcache
from zigzag_viz.pipeline.attention import bottom_right_causal_mask, grouped_attention


def _tensors(num_q, num_kv, q_len, k_len, dim=16, value_dim=12, seed=0):
    generator = torch.Generator().manual_seed(seed)
    query = torch.randn(1, num_q, q_len, dim, generator=generator)
    keys = torch.randn(1, num_kv, k_len, dim, generator=generator)
    values = torch.randn(1, num_kv, k_len, value_dim, generator=generator)
    return query, keys, values


def _sdpa(query, keys, values, scaling, sliding_window=None):
    """Reference: SDPA over KV heads repeated for every query head, bottom-right causal mask → (1, q, H_q, d_v)."""
    group = query.shape[1] // keys.shape[1]
    mask = bottom_right_causal_mask(query.shape[2], keys.shape[2], query.device, sliding_window)
    out = torch.nn.functional.scaled_dot_product_attention(
        query, keys.repeat_interleave(group, dim=1), values.repeat_interleave(group, dim=1), attn_mask=mask,
        scale=scaling,
    )
    return out.transpose(1, 2)


@pytest.mark.parametrize("num_q, num_kv", [(4, 4), (4, 2), (6, 2)])
@pytest.mark.parametrize("q_len", [1, 5])
@pytest.mark.parametrize("sliding_window", [None, 7])
def test_grouped_attention_equals_sdpa_with_repeated_kv_heads(num_q, num_kv, q_len, sliding_window):
    query, keys, values = _tensors(num_q, num_kv, q_len, k_len=20)
    out = grouped_attention(query, keys, values, 0.25, sliding_window)
    assert out.shape == (1, q_len, num_q, values.shape[-1])
    assert (out - _sdpa(query, keys, values, 0.25, sliding_window)).abs().max().item() <= 1e-5


def test_grouped_attention_keeps_the_query_dtype():
    query, keys, values = _tensors(4, 2, 3, k_len=9)
    out = grouped_attention(query.double(), keys, values, 0.25)
    assert out.dtype == torch.float64
    assert (out - _sdpa(query, keys, values, 0.25).double()).abs().max().item() <= 1e-5


@pytest.mark.parametrize("q_len", [1, 4])
def test_per_head_attention_over_heads_of_equal_length_equals_the_dense_result(q_len):
    query, keys, values = _tensors(6, 3, q_len, k_len=15, seed=1)
    view = kvcache.PerHeadView(list(keys[0]), list(values[0]))
    out = view.attend(None, query, 0.3)
    assert out.shape == (1, q_len, 6, values.shape[-1])
    assert (out - grouped_attention(query, keys, values, 0.3)).abs().max().item() <= 1e-6
    assert (out - _sdpa(query, keys, values, 0.3)).abs().max().item() <= 1e-5


def test_per_head_attention_reads_each_heads_own_keys():
    query, keys, values = _tensors(4, 2, 2, k_len=12, seed=2)
    view = kvcache.PerHeadView([keys[0, 0, 3:], keys[0, 1]], [values[0, 0, 3:], values[0, 1]])
    out = view.attend(None, query, 0.3)
    first = grouped_attention(query[:, :2], keys[:, :1, 3:], values[:, :1, 3:], 0.3)
    second = grouped_attention(query[:, 2:], keys[:, 1:], values[:, 1:], 0.3)
    assert (out - torch.cat([first, second], dim=2)).abs().max().item() <= 1e-6


def test_last_tokens_trims_consecutive_segments_and_copies_only_what_it_cuts():
    first, second = torch.arange(10.0).view(1, 5, 2), torch.arange(10.0, 16.0).view(1, 3, 2)
    head, tail = kvcache.last_tokens([first, second], 6)
    assert torch.equal(torch.cat([head, tail], dim=-2), torch.arange(4.0, 16.0).view(1, 6, 2))
    assert tail is second and head.data_ptr() == first[:, 2:].data_ptr()
    head, tail = kvcache.last_tokens([first, second], 2, release=True)
    assert head.shape[-2] == 0 and torch.equal(tail, second[:, 1:]) and tail.data_ptr() != second.data_ptr()
    assert all(a is b for a, b in zip(kvcache.last_tokens([first, second], 8, release=True), (first, second)))
    assert kvcache.window_length(64) == 63 and kvcache.window_length(64, new_tokens=4) == 67
