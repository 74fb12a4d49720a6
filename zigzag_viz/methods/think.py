"""ThinK: prune key channels per KV head by query-driven magnitude, keeping a fraction of head_dim.

ThinK (Xu et al., arXiv 2407.21018). For each layer and KV head the score of key channel c is
‖Q[:, c]‖ · ‖K[:, c]‖: Q stacks the observation-window queries of every query head that reads this KV head
(RoPE applied; from `PromptAnalysis.query_channel_energy`, Σ q_c²), K the keys the layer holds. The top
⌈keep · d⌉ channels are kept (in ascending order); the held keys are stored with those channels only, values in
full. ThinK prunes the cache built at prefill; keys of tokens fed after compression are kept whole in a small
full-precision buffer. Attention scores are q[channels]·K_pruned for the pruned part and q·K_new for the new tokens,
with one softmax over both.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from ..pipeline import cache as kvcache
from ..pipeline.attention import grouped_queries, grouped_scores, softmax_values, ungrouped
from ..errors import InputError
from .base import CompressionMethod, CompressionReport, Parameter, register


class ThinkView(kvcache.CacheView):
    """Pruned keys (H_kv, n, d_keep) with their channels (H_kv, d_keep), full new keys (H_kv, m, d), values (H_kv, n + m, d_v)."""

    def __init__(self, pruned_keys, channels, new_keys, values, sliding_window: int | None):
        self.pruned_keys, self.channels, self.new_keys, self.values = pruned_keys, channels, new_keys, values
        self.sliding_window = sliding_window

    def attend(self, module, query, scaling):
        if query.shape[0] != 1:
            raise ValueError("ThinK's cache supports batch 1 only")
        q = grouped_queries(query, self.pruned_keys.shape[1])  # (1, H_kv, g·q_len, d)
        index = self.channels.to(q.device)[None, :, None, :].expand(1, -1, q.shape[2], -1)
        q_pruned = torch.gather(q, -1, index)  # (1, H_kv, g·q_len, d_keep)
        scores = torch.cat(
            [grouped_scores(q_pruned, self.pruned_keys, scaling), grouped_scores(q, self.new_keys, scaling)], dim=-1
        )
        q_len = query.shape[2]
        return ungrouped(softmax_values(scores, self.values, q_len, self.sliding_window), q_len).to(query.dtype)


class ThinkLayer(kvcache.CompressedLayer):
    """Keys of the compressed tokens with only their kept channels; later tokens' keys whole; all values whole."""

    def __init__(self, pruned_keys, channels, values, new_keys, sliding_window: int | None = None):
        super().__init__()
        self.pruned_keys = pruned_keys  # (1, H_kv, n, d_keep): the compressed tokens, kept channels only
        self.channels = channels  # (H_kv, d_keep), ascending
        self.new_keys = new_keys  # (1, H_kv, m, d): tokens fed after compression, all channels
        self.head_values = values  # (1, H_kv, n + m, d_v)
        self.sliding_window = sliding_window
        self.keys = self.values = None

    @classmethod
    def from_dense(cls, keys, values, channels, sliding_window=None) -> "ThinkLayer":
        """From dense (1, H_kv, n, d) keys and values and the kept channels (H_kv, d_keep) of each KV head."""
        index = channels.to(keys.device)[None, :, None, :].expand(keys.shape[0], -1, keys.shape[2], -1)
        pruned = torch.gather(keys, -1, index).contiguous()
        return cls(pruned, channels, values, keys.new_empty(*keys.shape[:2], 0, keys.shape[-1]), sliding_window)

    def held_tokens(self) -> int:
        return self.pruned_keys.shape[-2] + self.new_keys.shape[-2]

    def update(self, key_states, value_states, *args, **kwargs):
        if key_states.shape[0] != 1:
            raise ValueError("ThinK's cache supports batch 1 only")
        self.new_keys = torch.cat([self.new_keys, key_states.to(self.new_keys.dtype)], dim=-2)
        self.head_values = torch.cat([self.head_values, value_states.to(self.head_values.dtype)], dim=-2)
        pruned, new, values = self.pruned_keys, self.new_keys, self.head_values
        if self.sliding_window is not None:
            shown = kvcache.window_length(self.sliding_window, key_states.shape[-2])
            pruned, new = kvcache.last_tokens([pruned, new], shown)
            [values] = kvcache.last_tokens([values], shown)
            held = kvcache.window_length(self.sliding_window)
            self.pruned_keys, self.new_keys = kvcache.last_tokens([self.pruned_keys, self.new_keys], held, release=True)
            [self.head_values] = kvcache.last_tokens([self.head_values], held, release=True)
        view = ThinkView(pruned, self.channels, new, values, self.sliding_window)
        return view, view

    def tensors(self):
        return [self.pruned_keys, self.channels, self.new_keys, self.head_values]


def channel_scores(query_energy: np.ndarray, kv_group: np.ndarray, keys: torch.Tensor) -> torch.Tensor:
    """(H_kv, d) ‖Q[:, c]‖ · ‖K[:, c]‖ per KV head: query energy (H_q, d) summed over each group, keys (1, H_kv, n, d)."""
    num_kv, dim = keys.shape[1], keys.shape[-1]
    energy = np.zeros((num_kv, dim), dtype=np.float64)
    np.add.at(energy, kv_group, query_energy)
    query_norm = torch.from_numpy(np.sqrt(energy)).to(keys.device)
    key_norm = keys[0].double().norm(dim=1)  # (H_kv, d)
    return query_norm * key_norm


@register
class Think(CompressionMethod):
    name = "think"
    summary = "prunes key channels per head by query-driven magnitude |q_c|·|k_c|, keeping a fraction of head_dim"
    paper = "ThinK (arXiv 2407.21018)"
    compresses = "key channels per head"
    stage = "channels"
    leaves_dense = False
    prefill_needs = frozenset({"query_energy"})
    parameters = {
        "keep": Parameter(float, 0.6, "fraction of head_dim key channels kept, in (0, 1]", low=0.0, high=1.0),
    }

    def __init__(self, **params):
        super().__init__(**params)
        if not self.params["keep"] > 0:
            raise InputError(f"{self.name}: parameter 'keep' must lie in (0, 1], got {self.params['keep']}")

    def compress(self, cache, context) -> CompressionReport:
        analysis = context.analysis
        if analysis.query_channel_energy is None:
            raise InputError(f"{self.name} scores key channels by the window queries: prefill with needs={{'query_energy'}}")
        entries = [kvcache.dense_entry(cache, layer, self.name) for layer in range(kvcache.layer_count(cache))]
        if any(entry.keys.shape[0] != 1 for entry in entries):
            raise InputError(f"{self.name}: the pruned-channel cache supports batch 1 only")
        dims = set()
        for layer, entry in enumerate(entries):
            keys = entry.keys
            dim = keys.shape[-1]
            d_keep = min(dim, max(1, math.ceil(self.params["keep"] * dim - 1e-9)))
            scores = channel_scores(analysis.query_channel_energy[layer], analysis.kv_group, keys)
            channels = torch.topk(scores, d_keep, dim=-1).indices.sort(dim=-1).values
            cache.layers[layer] = ThinkLayer.from_dense(keys, entry.values, channels, kvcache.sliding_window_of(entry))
            dims.add((d_keep, dim))
        held = kvcache.layer_lengths(cache)
        notes = [f"key channels kept per head: {', '.join(f'{k} of {d}' for k, d in sorted(dims))}"]
        return CompressionReport(layer_budgets=np.asarray(held), notes=notes)
