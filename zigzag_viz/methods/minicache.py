"""MiniCache: adjacent layers from the middle of the network down share one direction per token.

MiniCache (Liu et al., arXiv 2405.14366) notes that the KV states of adjacent deep layers point in similar
directions. For each pair (l, l+1) from relative depth `start` to the end, per token and KV head, keys and
values are split into magnitude ‖x‖ and unit direction x/‖x‖; the pair keeps one merged direction, the SLERP
of the two directions at weight `t`, and each layer keeps its own magnitudes. The `retain` share of tokens
whose directions disagree most (largest angle, mean over heads of the key and value angles) keep their
original vectors in both layers (indices + originals stored) and are not merged.

Stored per pair: the merged key and value directions of the merged tokens (one tensor each, listed by both
layers, counted once by `kv_bytes`), the retained token indices (shared too), and per layer the key and value
magnitudes of the merged tokens, the retained originals and a full-precision tail of decoded tokens.
`update` rebuilds dense tensors (magnitude × direction, retained tokens restored, then the tail) on every
step: that costs time, not storage. Pairs are only formed from dense, global-attention layers that hold the
whole prompt (a sliding-window layer is left as it is), and the last layer stays alone when the count is odd.
No calibration. Differences from the paper: the paper picks retained tokens by an angular-distance threshold;
here a fixed share is retained (the `retain` parameter), which makes the memory predictable.
"""

from __future__ import annotations

import numpy as np
import torch

from ..pipeline import cache as kvcache
from ..errors import InputError
from .base import CompressionMethod, CompressionReport, Parameter, register
from .calibration import layer_kind


def slerp_directions(a: torch.Tensor, b: torch.Tensor, t: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Unit directions of a and b (…, d) merged by SLERP at weight t; returns (merged unit direction, angle)."""
    a, b = a.float(), b.float()
    ua = a / a.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    ub = b / b.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    cos = (ua * ub).sum(-1).clamp(-1.0, 1.0)
    angle = torch.arccos(cos)
    sin = torch.sin(angle)
    close = sin < 1e-6  # (anti)parallel: SLERP is undefined, interpolate linearly
    safe = torch.where(close, torch.ones_like(sin), sin)
    wa = torch.where(close, torch.full_like(sin, 1 - t), torch.sin((1 - t) * angle) / safe)
    wb = torch.where(close, torch.full_like(sin, t), torch.sin(t * angle) / safe)
    merged = wa[..., None] * ua + wb[..., None] * ub
    norm = merged.norm(dim=-1, keepdim=True)
    merged = torch.where(norm > 1e-6, merged / norm.clamp_min(1e-12), ua)  # antipodal at t=0.5: keep a's direction
    return merged, angle


class MergedPair:
    """What two merged layers share: merged key and value directions (1, H, m, d) and the retained indices (r,)."""

    def __init__(self, n_tokens: int, retained: torch.Tensor, key_direction: torch.Tensor, value_direction: torch.Tensor):
        self.n_tokens = n_tokens
        self.retained = retained
        self.key_direction = key_direction
        self.value_direction = value_direction

    def merged_index(self) -> torch.Tensor:
        mask = torch.ones(self.n_tokens, dtype=torch.bool, device=self.retained.device)
        mask[self.retained] = False
        return torch.nonzero(mask).flatten()

    def tensors(self) -> list[torch.Tensor]:
        return [self.key_direction, self.value_direction, self.retained]


class MergedLayer(kvcache.CompressedLayer):
    """One layer of a merged pair: its own magnitudes and retained originals, the pair's shared directions, a tail."""

    def __init__(self, pair: MergedPair, key_norm, value_norm, key_kept, value_kept, partner: int | None = None):
        super().__init__()
        self.pair = pair
        self.partner = partner
        self.key_norm, self.value_norm = key_norm, value_norm  # (1, H, m)
        self.key_kept, self.value_kept = key_kept, value_kept  # (1, H, r, d)
        self.tail_keys = key_kept[:, :, :0].clone()
        self.tail_values = value_kept[:, :, :0].clone()
        self.keys = self.values = None

    def _rebuild(self, norm, direction, kept) -> torch.Tensor:
        batch, heads, _, dim = direction.shape
        dense = torch.empty(batch, heads, self.pair.n_tokens, dim, dtype=kept.dtype, device=kept.device)
        dense[:, :, self.pair.merged_index()] = (norm[..., None].float() * direction.float()).to(kept.dtype)
        dense[:, :, self.pair.retained] = kept
        return dense

    def dense(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Reconstructed (1, H, n + tail, d) keys and values."""
        keys = self._rebuild(self.key_norm, self.pair.key_direction, self.key_kept)
        values = self._rebuild(self.value_norm, self.pair.value_direction, self.value_kept)
        return torch.cat([keys, self.tail_keys], dim=-2), torch.cat([values, self.tail_values], dim=-2)

    def update(self, key_states, value_states, *args, **kwargs):
        self.tail_keys = torch.cat([self.tail_keys, key_states.to(self.tail_keys.dtype)], dim=-2)
        self.tail_values = torch.cat([self.tail_values, value_states.to(self.tail_values.dtype)], dim=-2)
        return self.dense()

    def tensors(self):
        return [*self.pair.tensors(), self.key_norm, self.value_norm, self.key_kept, self.value_kept,
                self.tail_keys, self.tail_values]

    def held_tokens(self) -> int:
        return self.pair.n_tokens + int(self.tail_keys.shape[-2])


def merge_pair(first, second, retain: float, t: float) -> tuple[MergedLayer, MergedLayer]:
    """Merge two dense layers holding the same n tokens into two MergedLayers sharing one MergedPair."""
    k1, v1, k2, v2 = first.keys, first.values, second.keys, second.values
    n = k1.shape[-2]
    key_direction, key_angle = slerp_directions(k1, k2, t)  # (1, H, n, d), (1, H, n)
    value_direction, value_angle = slerp_directions(v1, v2, t)
    angle = 0.5 * (key_angle + value_angle)[0].mean(dim=0)  # (n,)
    count = min(n, int(round(retain * n)))
    retained = torch.sort(torch.topk(angle, count).indices).values if count else torch.zeros(0, dtype=torch.long)
    retained = retained.to(k1.device)
    mask = torch.ones(n, dtype=torch.bool, device=k1.device)
    mask[retained] = False
    merged = torch.nonzero(mask).flatten()
    pair = MergedPair(
        n,
        retained,
        key_direction[:, :, merged].to(k1.dtype).contiguous(),
        value_direction[:, :, merged].to(v1.dtype).contiguous(),
    )

    def layer(keys, values):
        return MergedLayer(
            pair,
            keys[:, :, merged].float().norm(dim=-1).to(keys.dtype).contiguous(),
            values[:, :, merged].float().norm(dim=-1).to(values.dtype).contiguous(),
            keys[:, :, retained].contiguous(),
            values[:, :, retained].contiguous(),
        )

    return layer(k1, v1), layer(k2, v2)


def pair_layers(num_layers: int, start: float) -> list[tuple[int, int]]:
    """Adjacent pairs (l, l+1) from layer round(start·L) to the end; an odd last layer stays alone."""
    first = int(round(start * num_layers))
    return [(layer, layer + 1) for layer in range(first, num_layers - 1, 2)]


@register
class MiniCache(CompressionMethod):
    name = "minicache"
    summary = "adjacent deep layers share one SLERP-merged direction per token, each keeping its magnitudes"
    paper = "MiniCache (arXiv 2405.14366)"
    compresses = "adjacent layer pairs merged"
    stage = "layers"
    calibration = "none"
    leaves_dense = False
    parameters = {
        "start": Parameter(float, 0.5, "relative depth from which adjacent pairs are merged", low=0.0, high=1.0),
        "retain": Parameter(float, 0.05, "share of tokens per pair (largest angle) kept unmerged", low=0.0, high=1.0),
        "t": Parameter(float, 0.5, "SLERP weight of the second layer's direction", low=0.0, high=1.0),
    }

    def compress(self, cache, context) -> CompressionReport:
        n = context.analysis.n_tokens
        num_layers = kvcache.layer_count(cache)
        merged, skipped = [], []
        for first, second in pair_layers(num_layers, self.params["start"]):
            a, b = cache.layers[first], cache.layers[second]
            if not (kvcache.is_dense(cache, first) and kvcache.is_dense(cache, second)):
                raise InputError("minicache merges dense layers: it cannot follow a method that changed their storage")
            if layer_kind(a) != (False, None) or layer_kind(b) != (False, None):
                skipped.append((first, second))
                continue
            if a.keys.shape[-2] != n or b.keys.shape[-2] != n:
                raise InputError("minicache merges layers token by token: it cannot follow token eviction")
            cache.layers[first], cache.layers[second] = merge_pair(a, b, self.params["retain"], self.params["t"])
            cache.layers[first].partner, cache.layers[second].partner = second, first
            merged.append((first, second))
        retained = int(round(self.params["retain"] * n)) if merged else 0
        notes = [
            f"minicache: {len(merged)} layer pairs merged"
            + (f" ({merged[0][0]}–{merged[-1][1]})" if merged else "")
            + f", {retained} of {n} tokens per pair kept unmerged"
        ]
        if skipped:
            notes.append(f"minicache: {len(skipped)} pairs left alone (sliding-window layers)")
        return CompressionReport(layer_budgets=np.asarray(kvcache.layer_lengths(cache)), notes=notes)
