"""Stage 5 on a GPU: decoding from a static cache of ragged layers, so each step can be replayed as a CUDA graph.

Eager decoding on a GPU is bound by kernel launches, not by the bytes of the cache, so a compressed cache
decodes no faster than a full one. `to_static` gives every dense global layer one buffer sized to *its own*
kept tokens + the tokens still to come (layers stay ragged: nothing is padded to a common length, and the evicted
tokens stay freed); the write position and the causal mask come from a length held on the device, so the shapes
of a decode step never change and `GraphedDecoder` can capture it once and replay it per token.

Sliding-window layers and layers of other forms (per-head, quantized, shared) stay as they are; a cache with
any of them decodes eagerly.
"""

from __future__ import annotations

import threading

import torch

from ..errors import InputError
from .cache import CacheView, CompressedLayer


_CAPTURE_LOCK = threading.Lock()  # one CUDA graph capture at a time in this process


class StaticView(CacheView):
    """Attention over a layer's buffers (B, H_kv, capacity, d) of which the first `length` entries are filled,
    the new queries being the last of them (bottom-right causal)."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, length: torch.Tensor):
        self.keys, self.values, self.length = keys, values, length

    def attend(self, module, query, scaling):
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        q_len = query.shape[2]
        key_pos = torch.arange(self.keys.shape[-2], device=query.device)[None, :]
        query_pos = self.length - q_len + torch.arange(q_len, device=query.device)[:, None]
        visible = (key_pos <= query_pos).view(1, 1, q_len, -1)
        output, _ = sdpa_attention_forward(module, query, self.keys, self.values, visible, scaling=scaling)
        return output


class StaticLayer(CompressedLayer):
    """One layer's kept keys and values in buffers with room for `extra` more tokens; `length` (a device
    tensor, (1,)) counts the filled entries and advances in place, so a captured step replays correctly."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, extra: int):
        super().__init__()
        batch, heads, kept, _ = keys.shape
        self.key_buffer = keys.new_zeros(batch, heads, kept + extra, keys.shape[-1])
        self.value_buffer = values.new_zeros(batch, heads, kept + extra, values.shape[-1])
        self.key_buffer[..., :kept, :] = keys
        self.value_buffer[..., :kept, :] = values
        self.length = torch.full((1,), kept, dtype=torch.long, device=keys.device)
        self.filled = kept  # the same count on the host, for lengths and the capacity check
        self.keys = self.values = None

    @property
    def capacity(self) -> int:
        return self.key_buffer.shape[-2]

    def update(self, key_states, value_states, *args, **kwargs):
        count = key_states.shape[-2]
        if self.filled + count > self.capacity:
            raise InputError(f"the static cache holds {self.capacity} tokens per layer here; decoding needs more")
        positions = self.length + torch.arange(count, device=self.length.device)
        self.key_buffer.index_copy_(2, positions, key_states.to(self.key_buffer.dtype))
        self.value_buffer.index_copy_(2, positions, value_states.to(self.value_buffer.dtype))
        self.length += count
        self.filled += count
        view = StaticView(self.key_buffer, self.value_buffer, self.length)
        return view, view

    def advance(self, count: int) -> None:
        """Record on the host that a replayed graph filled `count` more entries (the device length moved)."""
        self.filled += count

    def tensors(self):
        return [self.key_buffer, self.value_buffer]

    def held_tokens(self) -> int:
        return self.filled


def to_static(cache, extra: int) -> bool:
    """Turn every dense global layer of `cache` into a StaticLayer with room for `extra` tokens, in place;
    True when every layer is static now (the whole step can be captured), False when some keep another form."""
    if extra < 1:
        raise ValueError("extra must be at least 1")
    every = True
    for index, entry in enumerate(cache.layers):
        if isinstance(entry, StaticLayer):
            continue
        if isinstance(entry, CompressedLayer) or getattr(entry, "is_sliding", False) or entry.keys is None:
            every = False
            continue
        cache.layers[index] = StaticLayer(entry.keys, entry.values, extra)
    return every


class GraphedDecoder:
    """One greedy decode step of `model` for `batch` sequences over a fully static cache, captured once as a CUDA
    graph and replayed per token. `step(tokens, position)` feeds one token per sequence at `position` and gives
    the next-token logits (batch, V), float32."""

    def __init__(self, model, cache, cache_argument: str, device: torch.device, batch: int = 1):
        self.model, self.cache, self.cache_argument = model, cache, cache_argument
        self.tokens = torch.zeros((batch, 1), dtype=torch.long, device=device)
        self.position = torch.zeros((batch, 1), dtype=torch.long, device=device)
        self.graph: torch.cuda.CUDAGraph | None = None
        self.logits: torch.Tensor | None = None

    def _forward(self) -> torch.Tensor:
        kwargs = {self.cache_argument: self.cache, "use_cache": True, "position_ids": self.position}
        return self.model(input_ids=self.tokens, **kwargs).logits[:, -1].float()

    def _capture(self) -> None:
        layers = [entry for entry in self.cache.layers if isinstance(entry, StaticLayer)]
        saved = [(entry.length.clone(), entry.filled) for entry in layers]

        def restore() -> None:
            for entry, (length, filled) in zip(layers, saved):
                entry.length.copy_(length)
                entry.filled = filled

        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            self._forward()  # warm-up outside the graph: kernels chosen, workspaces allocated
        torch.cuda.current_stream().wait_stream(stream)
        restore()
        self.graph = torch.cuda.CUDAGraph()
        with _CAPTURE_LOCK, torch.cuda.graph(self.graph, capture_error_mode="thread_local"):
            self.logits = self._forward()  # other threads (other models, other sessions) may use the GPU meanwhile
        restore()  # capture records kernels without running them; only the host counts moved

    def step(self, tokens, position: int) -> torch.Tensor:
        for entry in self.cache.layers:  # a replay past a buffer's end would write outside it
            if entry.filled >= entry.capacity:
                raise InputError(f"the static cache holds {entry.capacity} tokens per layer here; decoding needs more")
        self.tokens.copy_(torch.as_tensor(tokens, dtype=torch.long).view(-1, 1))
        self.position.fill_(position)
        with torch.inference_mode():
            if self.graph is None:
                self._capture()
            self.graph.replay()
        for entry in self.cache.layers:
            entry.advance(1)
        return self.logits.clone()
