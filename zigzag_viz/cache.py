"""Stage 4, the compressed cache: real eviction (kept tensors only) and bytes counted from what is held."""

from __future__ import annotations

import copy

import torch


def layer_count(cache) -> int:
    return len(cache.layers)


def layer_keys(cache, layer: int) -> torch.Tensor:
    """Keys held by one layer, (batch, H_kv, tokens, d)."""
    return cache.layers[layer].keys


def layer_lengths(cache) -> list[int]:
    """Tokens held per layer (a sliding-window layer holds only the most recent ones)."""
    return [int(layer.keys.shape[-2]) for layer in cache.layers]


def evict(cache, layer: int, keep: torch.Tensor) -> None:
    """Keep only tokens `keep` (H_kv, B) of one layer, per KV head, in place; the old tensors are released."""
    entry = cache.layers[layer]
    index = keep.to(entry.keys.device)[None, :, :, None]
    entry.keys = torch.gather(entry.keys, 2, index.expand(-1, -1, -1, entry.keys.shape[-1])).contiguous()
    entry.values = torch.gather(entry.values, 2, index.expand(-1, -1, -1, entry.values.shape[-1])).contiguous()


def kv_bytes(cache) -> int:
    """Bytes of the key and value tensors the cache actually holds (numel × element size)."""
    total = 0
    for entry in cache.layers:
        for tensor in (entry.keys, entry.values):
            if tensor is not None:
                total += tensor.numel() * tensor.element_size()
    return total


def clone(cache):
    """An independent copy, so that one prefill can feed several compressions."""
    return copy.deepcopy(cache)
