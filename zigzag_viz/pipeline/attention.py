"""Per-layer attention that works on caches whose layers hold different numbers of tokens.

Registered as the attention implementation "zigzag_viz" in both transformers interfaces. Numerically it is
transformers' SDPA path; what it adds:
- a bottom-right causal mask built from *this* layer's key length, so several new tokens can be fed
  through a compressed cache (the model-level mask is sized from layer 0 and is wrong elsewhere);
- an optional observer that sees each layer's RoPE'd queries and keys during a fresh prefill
  (used by `capture` to measure window attention without materialising n × n scores).

Compressed layers attend through `grouped_attention` over the tensors they store (or through its parts, when
they score keys their own way): float32, the same bottom-right causal mask and sliding window, and each KV head
read by its group of query heads without repeating it.
"""

from __future__ import annotations

import contextlib
import contextvars
from typing import Protocol

import torch

IMPLEMENTATION = "zigzag_viz"


class AttentionObserver(Protocol):
    def on_attention(
        self, module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scaling: float,
        sliding_window: int | None,
    ) -> None:
        """query (batch, H_q, n, d), key and value (batch, H_kv, n, d), RoPE applied, KV heads not repeated;
        `sliding_window` is the layer's own attention span (None for global attention)."""


_observer: contextvars.ContextVar[AttentionObserver | None] = contextvars.ContextVar("zigzag_observer", default=None)


@contextlib.contextmanager
def observing(observer: AttentionObserver):
    """Within this block, every layer's prefill attention is shown to `observer`."""
    token = _observer.set(observer)
    try:
        yield observer
    finally:
        _observer.reset(token)


def bottom_right_causal_mask(q_len: int, k_len: int, device, sliding_window: int | None = None) -> torch.Tensor:
    """Boolean (1, 1, q_len, k_len) mask: new query i sees key j iff j ≤ k_len − q_len + i (and within the window)."""
    query_pos = torch.arange(q_len, device=device)[:, None] + (k_len - q_len)
    key_pos = torch.arange(k_len, device=device)[None, :]
    visible = key_pos <= query_pos
    if sliding_window is not None:
        visible &= (query_pos - key_pos) < sliding_window
    return visible.view(1, 1, q_len, k_len)


def grouped_queries(query: torch.Tensor, num_kv_heads: int) -> torch.Tensor:
    """Queries (B, H_q, q, d) → float32 (B, H_kv, g·q, d): the g query heads that read each KV head, stacked."""
    batch, num_q, q_len, dim = query.shape
    return query.float().reshape(batch, num_kv_heads, (num_q // num_kv_heads) * q_len, dim)


def grouped_scores(grouped_query: torch.Tensor, keys: torch.Tensor, scaling: float) -> torch.Tensor:
    """Scaled dot products (…, H_kv, g·q, k), float32, of grouped queries (…, H_kv, g·q, d) and keys (…, H_kv, k, d)."""
    return torch.matmul(grouped_query, keys.float().transpose(-1, -2)) * scaling


def masked_scores(scores: torch.Tensor, q_len: int, sliding_window: int | None = None) -> torch.Tensor:
    """Grouped scores (…, g·q, k), −inf where the bottom-right causal mask or the sliding window hides a key."""
    if q_len == 1 and sliding_window is None:
        return scores
    visible = bottom_right_causal_mask(q_len, scores.shape[-1], scores.device, sliding_window)[0, 0]
    return scores.unflatten(-2, (-1, q_len)).masked_fill(~visible, float("-inf")).flatten(-3, -2)


def ungrouped(grouped_output: torch.Tensor, q_len: int) -> torch.Tensor:
    """Grouped outputs (B, H_kv, g·q, d_v) → (B, q, H_q, d_v), the layout attention returns."""
    batch, num_kv, rows, dim = grouped_output.shape
    return grouped_output.reshape(batch, num_kv * (rows // q_len), q_len, dim).transpose(1, 2)


def softmax_values(
    scores: torch.Tensor, values: torch.Tensor, q_len: int, sliding_window: int | None = None
) -> torch.Tensor:
    """Float32 grouped output (…, g·q, d_v) of grouped scores (…, g·q, k) over values (…, k, d_v): masked
    (bottom-right causal, sliding window), softmax over the keys, weighted sum of the values."""
    probabilities = torch.softmax(masked_scores(scores, q_len, sliding_window), dim=-1)
    return torch.matmul(probabilities, values.float())


def grouped_attention(query, keys, values, scaling: float, sliding_window: int | None = None) -> torch.Tensor:
    """Attention of new queries (B, H_q, q, d) over stored keys (B, H_kv, k, d) and values (B, H_kv, k, d_v) →
    (B, q, H_q, d_v) in the query's dtype; float32 math, bottom-right causal, KV heads read by groups of query heads."""
    q_len = query.shape[2]
    scores = grouped_scores(grouped_queries(query, keys.shape[1]), keys, scaling)
    return ungrouped(softmax_values(scores, values, q_len, sliding_window), q_len).to(query.dtype)


def zigzag_attention_forward(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """Drop-in attention function: (batch, q_len, H_q, d) output, no weights."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if hasattr(key, "attend"):  # a compressed layer's view (see cache.CacheView)
        return key.attend(module, query, scaling if scaling is not None else query.shape[-1] ** -0.5), None
    q_len, k_len = query.shape[2], key.shape[2]
    sliding_window = kwargs.get("sliding_window")
    observer = _observer.get()
    if observer is not None and q_len == k_len:
        scale = scaling if scaling is not None else query.shape[-1] ** -0.5
        observer.on_attention(module, query, key, value, scale, sliding_window)
    if q_len == k_len or q_len == 1:
        # A fresh prefill (the model's own mask is right) or a single new token (it may see every cached entry).
        mask = attention_mask if q_len == k_len else None
    else:
        mask = bottom_right_causal_mask(q_len, k_len, query.device, sliding_window)
    return sdpa_attention_forward(module, query, key, value, mask, dropout=dropout, scaling=scaling, **kwargs)


_registered = False


def register() -> None:
    """Make "zigzag_viz" known to transformers' attention and mask interfaces (idempotent)."""
    global _registered
    if _registered:
        return
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(IMPLEMENTATION, zigzag_attention_forward)
    AttentionMaskInterface.register(IMPLEMENTATION, sdpa_mask)
    _registered = True


def install(model: torch.nn.Module) -> None:
    """Switch `model` to the "zigzag_viz" attention implementation."""
    register()
    model.set_attn_implementation(IMPLEMENTATION)


@contextlib.contextmanager
def implementation(model: torch.nn.Module, name: str):
    """Temporarily run `model` with another attention implementation (e.g. "sdpa" or "eager" as a reference)."""
    previous = model.config._attn_implementation
    model.set_attn_implementation(name)
    try:
        yield model
    finally:
        model.set_attn_implementation(previous)
