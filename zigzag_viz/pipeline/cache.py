"""Stage 4, the compressed cache: real eviction (kept tensors only) and bytes counted from what is held.

A layer of a transformers cache is either a plain dense layer (keys, values: (batch, H_kv, tokens, d)) or a
`CompressedLayer` that stores another form (per-head lengths, quantized codes, pruned channels, a share of
another layer) and hands attention a `CacheView` that knows how to attend over that form.
"""

from __future__ import annotations

import copy
from typing import Iterable, Sequence

import torch
from transformers.cache_utils import DynamicLayer

from ..errors import InputError
from .attention import grouped_queries, grouped_scores, softmax_values, ungrouped


class CacheView:
    """What a compressed layer gives attention instead of dense key/value tensors."""

    def attend(self, module, query: torch.Tensor, scaling: float) -> torch.Tensor:
        """Attention output (batch, q_len, H_q, d_v) of new queries (batch, H_q, q_len, d), bottom-right causal."""
        raise NotImplementedError


class CompressedLayer(DynamicLayer):
    """A cache layer holding a compressed form. Subclasses implement `update`, `tensors` and `held_tokens`."""

    is_sliding = False

    def __init__(self):
        super().__init__()
        self.is_initialized = True

    def tensors(self) -> Iterable[torch.Tensor]:
        """Every tensor this layer stores (shared tensors may also be listed by other layers)."""
        raise NotImplementedError

    def held_tokens(self) -> int:
        raise NotImplementedError

    def get_seq_length(self) -> int:
        return self.held_tokens()

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.held_tokens() + query_length, 0


def window_length(sliding_window: int, new_tokens: int = 0) -> int:
    """Tokens a sliding layer keeps for attention: its last window − 1 entries, plus the new tokens attending now."""
    return sliding_window - 1 + new_tokens


def last_tokens(segments: Sequence[torch.Tensor], count: int, release: bool = False) -> list[torch.Tensor]:
    """The last `count` tokens of one sequence stored as consecutive segments (…, n_i, d), one tensor per segment
    (an uncut segment is returned as is); with `release`, cut segments are copies, so the dropped tokens are freed."""
    drop = max(sum(segment.shape[-2] for segment in segments) - count, 0)
    trimmed = []
    for segment in segments:
        cut = min(drop, segment.shape[-2])
        drop -= cut
        if cut == 0:
            trimmed.append(segment)
        else:
            part = segment[..., cut:, :]
            trimmed.append(part.clone() if release else part)
    return trimmed


class PerHeadView(CacheView):
    """KV heads of different lengths: each head's group of query heads attends over that head's keys."""

    def __init__(self, keys: list[torch.Tensor], values: list[torch.Tensor]):
        self.keys, self.values = keys, values

    def attend(self, module, query, scaling):
        q_len = query.shape[2]
        grouped = grouped_queries(query, len(self.keys))  # (B, H_kv, g·q_len, d)
        outputs = [
            softmax_values(grouped_scores(grouped[:, head], keys, scaling), values, q_len)  # (B, g·q_len, d_v)
            for head, (keys, values) in enumerate(zip(self.keys, self.values))
        ]
        return ungrouped(torch.stack(outputs, dim=1), q_len).to(query.dtype)


class PerHeadLayer(CompressedLayer):
    """Each KV head keeps its own number of tokens: keys[h], values[h] are (tokens_h, d)."""

    def __init__(self, keys: list[torch.Tensor], values: list[torch.Tensor]):
        super().__init__()
        self.head_keys, self.head_values = keys, values
        self.keys = self.values = None

    @classmethod
    def from_dense(cls, keys: torch.Tensor, values: torch.Tensor, keep: list[torch.Tensor]) -> "PerHeadLayer":
        """From dense (1, H_kv, n, d) tensors and ascending kept indices per head."""
        return cls(
            [keys[0, h].index_select(0, idx.to(keys.device)).contiguous() for h, idx in enumerate(keep)],
            [values[0, h].index_select(0, idx.to(values.device)).contiguous() for h, idx in enumerate(keep)],
        )

    def update(self, key_states, value_states, *args, **kwargs):
        for h in range(len(self.head_keys)):
            self.head_keys[h] = torch.cat([self.head_keys[h], key_states[0, h]], dim=0)
            self.head_values[h] = torch.cat([self.head_values[h], value_states[0, h]], dim=0)
        view = PerHeadView(self.head_keys, self.head_values)
        return view, view

    def tensors(self):
        return [*self.head_keys, *self.head_values]

    def held_tokens(self) -> int:
        return max(k.shape[0] for k in self.head_keys)

    def head_lengths(self) -> list[int]:
        return [k.shape[0] for k in self.head_keys]


def layer_count(cache) -> int:
    return len(cache.layers)


def layer_keys(cache, layer: int) -> torch.Tensor:
    """Keys held by one dense layer, (batch, H_kv, tokens, d)."""
    return cache.layers[layer].keys


def layer_lengths(cache) -> list[int]:
    """Tokens held per layer (a sliding-window layer holds only the most recent ones)."""
    return [
        entry.held_tokens() if isinstance(entry, CompressedLayer) else int(entry.keys.shape[-2]) for entry in cache.layers
    ]


def is_dense(cache, layer: int) -> bool:
    return not isinstance(cache.layers[layer], CompressedLayer)


def dense_entry(cache, layer: int, method: str):
    """The dense cache layer `layer`, or a clear error when an earlier method already compressed it."""
    entry = cache.layers[layer]
    if not is_dense(cache, layer):
        raise InputError(
            f"{method}: layer {layer} is already compressed ({type(entry).__name__}); {method} works on dense "
            "layers only, so combine it only after methods that leave dense layers (token eviction such as "
            "zigzag, uniform, pyramid, l2norm)"
        )
    if entry.keys is None or entry.keys.dim() != 4 or entry.keys.shape[-2] == 0:
        raise InputError(f"{method}: layer {layer} holds no keys; compress after prefill")
    return entry


def sliding_window_of(entry) -> int | None:
    """The attention span of a sliding-window layer (None for a global layer)."""
    return int(entry.sliding_window) if getattr(entry, "is_sliding", False) else None


def evict(cache, layer: int, keep: torch.Tensor) -> None:
    """Keep only tokens `keep` (H_kv, B) of one layer, per KV head, in place; the old tensors are released."""
    entry = cache.layers[layer]
    index = keep.to(entry.keys.device)[None, :, :, None]
    entry.keys = torch.gather(entry.keys, 2, index.expand(-1, -1, -1, entry.keys.shape[-1])).contiguous()
    entry.values = torch.gather(entry.values, 2, index.expand(-1, -1, -1, entry.values.shape[-1])).contiguous()


def layer_tensors(entry) -> list[torch.Tensor]:
    if isinstance(entry, CompressedLayer):
        return list(entry.tensors())
    return [t for t in (entry.keys, entry.values) if t is not None]


def kv_bytes(cache) -> int:
    """Bytes of every tensor the cache actually holds (numel × element size), each shared tensor counted once."""
    seen: set[int] = set()
    total = 0
    for entry in cache.layers:
        for tensor in layer_tensors(entry):
            if id(tensor) not in seen:
                seen.add(id(tensor))
                total += tensor.numel() * tensor.element_size()
    return total


def clone(cache):
    """An independent copy, so that one prefill can feed several compressions."""
    return copy.deepcopy(cache)
