"""KIVI: asymmetric low-bit quantization, keys per channel and values per token, recent tokens in full precision.

KIVI (Liu et al., arXiv 2402.02750). Each dense layer becomes a `KiviLayer`:
- tokens older than the most recent `residual`, in whole groups of `group` tokens, are quantized to `bits` bits;
  keys per channel (min/max over each group of `group` tokens, per head and channel: key outliers live in a
  few channels), values per token (min/max over each group of `group` channels within a token);
- codes are stored packed (four 2-bit or two 4-bit codes per byte), scales and zero points in float16;
- the residual tail (and any partial group) stays in the layer's dtype.

During decoding new tokens join the full-precision tail; whenever the tail holds `residual + group` tokens its
oldest `group` are quantized, so the tail stays between `residual` and `residual + group − 1` tokens (the paper
flushes the whole residual once it reaches R; grouping the flush keeps at least R tokens exact at every step).
`update` dequantizes the packed part on every call and returns dense temporaries (dequantized ‖ tail), so
attention needs no special view.

Notes against the primary source: the paper quantizes with per-group scale and zero point in the model's
half-precision dtype; here they are float16 too, rounded outward (zero down, scale up) so that every value of a
group lies inside the representable range and the error stays within half a step.
"""

from __future__ import annotations

import numpy as np
import torch

from ..pipeline import cache as kvcache
from .base import CompressionMethod, CompressionReport, Parameter, register

SCALE_DTYPE = torch.float16


def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """uint8 codes (..., m) in [0, 2^bits) → packed uint8 (..., ceil(m·bits/8)), low bits first."""
    per = 8 // bits
    m = codes.shape[-1]
    pad = (-m) % per
    if pad:
        codes = torch.nn.functional.pad(codes, (0, pad))
    codes = codes.reshape(*codes.shape[:-1], -1, per).to(torch.uint8)
    shifts = torch.arange(0, 8, bits, dtype=torch.uint8, device=codes.device)
    return (codes << shifts).sum(dim=-1, dtype=torch.uint8)


def unpack(packed: torch.Tensor, bits: int, m: int) -> torch.Tensor:
    """Inverse of `pack`: packed uint8 (..., p) → codes uint8 (..., m)."""
    shifts = torch.arange(0, 8, bits, dtype=torch.uint8, device=packed.device)
    codes = (packed[..., None] >> shifts) & ((1 << bits) - 1)
    return codes.flatten(-2)[..., :m]


def _outward_fp16(low: torch.Tensor, high: torch.Tensor, levels: int) -> tuple[torch.Tensor, torch.Tensor]:
    """float16 zero ≤ low and scale with zero + levels·scale ≥ high (so no value falls outside the grid)."""
    zero = low.to(SCALE_DTYPE)
    below = zero.float() > low
    zero = torch.where(below, torch.nextafter(zero, torch.full_like(zero, -float("inf"))), zero)
    scale = ((high - zero.float()) / levels).to(SCALE_DTYPE)
    short = zero.float() + levels * scale.float() < high
    scale = torch.where(short, torch.nextafter(scale, torch.full_like(scale, float("inf"))), scale)
    return scale, zero


def quantize(x: torch.Tensor, dim: int, bits: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Asymmetric quantization of `x` with min/max taken over `dim` (kept with size 1 in scale and zero).

    Returns uint8 codes shaped like x, float16 scale and zero shaped like x with `dim` reduced to 1.
    """
    levels = (1 << bits) - 1
    xf = x.float()
    scale, zero = _outward_fp16(xf.amin(dim=dim, keepdim=True), xf.amax(dim=dim, keepdim=True), levels)
    s = scale.float()
    steps = torch.where(s > 0, (xf - zero.float()) / torch.where(s > 0, s, torch.ones_like(s)), torch.zeros_like(xf))
    codes = steps.round().clamp_(0, levels).to(torch.uint8)
    return codes, scale, zero


class KiviLayer(kvcache.CompressedLayer):
    """Packed low-bit keys (per-channel groups of tokens) and values (per-token groups of channels) + a dense tail.

    Shapes (batch B, KV heads H, head dim d, Nq = quantized tokens = whole groups, P = packed bytes per row):
    key_codes (B, H, Nq, P), key_scale / key_zero (B, H, Nq / group, d);
    value_codes (B, H, Nq, P), value_scale / value_zero (B, H, Nq, ⌈d / group⌉);
    tail_keys / tail_values (B, H, tail, d) in the layer's dtype.
    """

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, bits: int, group: int, residual: int,
                 sliding_window: int | None = None):
        super().__init__()
        self.bits, self.group, self.residual = bits, group, residual
        self.sliding_window = sliding_window
        self.dtype = keys.dtype
        batch, heads, _, dim = keys.shape
        self.key_dim, self.value_dim = dim, values.shape[-1]
        packed_k = -(-self.key_dim * bits // 8)
        packed_v = -(-self.value_dim * bits // 8)
        value_groups = -(-self.value_dim // min(group, self.value_dim))
        empty = dict(device=keys.device)
        self.key_codes = torch.empty(batch, heads, 0, packed_k, dtype=torch.uint8, **empty)
        self.key_scale = torch.empty(batch, heads, 0, self.key_dim, dtype=SCALE_DTYPE, **empty)
        self.key_zero = torch.empty_like(self.key_scale)
        self.value_codes = torch.empty(batch, heads, 0, packed_v, dtype=torch.uint8, **empty)
        self.value_scale = torch.empty(batch, heads, 0, value_groups, dtype=SCALE_DTYPE, **empty)
        self.value_zero = torch.empty_like(self.value_scale)
        self.tail_keys, self.tail_values = keys, values
        self.keys = self.values = None
        self._flush(keep=residual)

    # -- quantization of the oldest whole groups of the tail ---------------------------------------------------

    def _flush(self, keep: int) -> None:
        """Quantize the oldest whole groups of the tail so that at least `keep` tokens stay in full precision."""
        count = max(0, self.tail_keys.shape[-2] - keep) // self.group * self.group
        if count == 0:
            return
        keys, values = self.tail_keys[..., :count, :], self.tail_values[..., :count, :]
        codes, scale, zero = self._quantize_keys(keys)
        self.key_codes = torch.cat([self.key_codes, codes], dim=-2)
        self.key_scale = torch.cat([self.key_scale, scale], dim=-2)
        self.key_zero = torch.cat([self.key_zero, zero], dim=-2)
        codes, scale, zero = self._quantize_values(values)
        self.value_codes = torch.cat([self.value_codes, codes], dim=-2)
        self.value_scale = torch.cat([self.value_scale, scale], dim=-2)
        self.value_zero = torch.cat([self.value_zero, zero], dim=-2)
        self.tail_keys = self.tail_keys[..., count:, :].clone()
        self.tail_values = self.tail_values[..., count:, :].clone()

    def _quantize_keys(self, keys):
        """Per channel over groups of `group` tokens: (B, H, N, d) → packed codes, scale and zero (B, H, N/g, d)."""
        b, h, n, d = keys.shape
        grouped = keys.reshape(b, h, n // self.group, self.group, d)
        codes, scale, zero = quantize(grouped, dim=3, bits=self.bits)
        return pack(codes.reshape(b, h, n, d), self.bits), scale.squeeze(3), zero.squeeze(3)

    def _value_groups(self, values):
        """(B, H, N, d) → (B, H, N, groups, size), the last group padded by repeating its last channel."""
        size = min(self.group, self.value_dim)
        pad = (-self.value_dim) % size
        if pad:
            values = torch.cat([values, values[..., -1:].expand(*values.shape[:-1], pad)], dim=-1)
        return values.unflatten(-1, (values.shape[-1] // size, size))

    def _quantize_values(self, values):
        """Per token over groups of `group` channels: (B, H, N, d) → packed codes, scale and zero (B, H, N, groups)."""
        codes, scale, zero = quantize(self._value_groups(values), dim=-1, bits=self.bits)
        codes = codes.flatten(-2)[..., : self.value_dim]
        return pack(codes, self.bits), scale.squeeze(-1), zero.squeeze(-1)

    # -- dequantization ----------------------------------------------------------------------------------------

    def dequantized_keys(self, start_group: int = 0) -> torch.Tensor:
        """Quantized keys from group `start_group` on, back in the layer's dtype: (B, H, Nq', d)."""
        codes = unpack(self.key_codes[..., start_group * self.group :, :], self.bits, self.key_dim)
        b, h, n, d = codes.shape
        grouped = codes.reshape(b, h, n // self.group, self.group, d).float()
        scale = self.key_scale[..., start_group:, :].float()[..., None, :]
        zero = self.key_zero[..., start_group:, :].float()[..., None, :]
        return (grouped * scale + zero).reshape(b, h, n, d).to(self.dtype)

    def dequantized_values(self, start_group: int = 0) -> torch.Tensor:
        """Quantized values from group `start_group` on, back in the layer's dtype: (B, H, Nq', d_v)."""
        start = start_group * self.group
        codes = unpack(self.value_codes[..., start:, :], self.bits, self.value_dim)
        grouped = self._value_groups(codes).float()
        scale = self.value_scale[..., start:, :].float()[..., None]
        zero = self.value_zero[..., start:, :].float()[..., None]
        return (grouped * scale + zero).flatten(-2)[..., : self.value_dim].to(self.dtype)

    # -- cache layer interface ---------------------------------------------------------------------------------

    def quantized_tokens(self) -> int:
        return self.key_codes.shape[-2]

    def held_tokens(self) -> int:
        return self.quantized_tokens() + self.tail_keys.shape[-2]

    def update(self, key_states, value_states, *args, **kwargs):
        self.tail_keys = torch.cat([self.tail_keys, key_states.to(self.dtype)], dim=-2)
        self.tail_values = torch.cat([self.tail_values, value_states.to(self.dtype)], dim=-2)
        total = self.held_tokens()
        visible = total
        if self.sliding_window is not None:
            visible = min(total, kvcache.window_length(self.sliding_window, key_states.shape[-2]))
        skip = total - visible  # oldest tokens this call does not show to attention
        start_group = min(skip // self.group, self.quantized_tokens() // self.group)
        keys = kvcache.last_tokens([self.dequantized_keys(start_group), self.tail_keys], visible)
        values = kvcache.last_tokens([self.dequantized_values(start_group), self.tail_values], visible)
        keys, values = torch.cat(keys, dim=-2), torch.cat(values, dim=-2)
        self._flush(keep=self.residual)
        if self.sliding_window is not None:
            self._drop_outside_window()
        return keys, values

    def _drop_outside_window(self) -> None:
        """Release whole quantized groups (then tail tokens) that no later query of a sliding layer can see."""
        window = kvcache.window_length(self.sliding_window)
        excess = self.held_tokens() - window
        groups = min(max(excess, 0) // self.group, self.quantized_tokens() // self.group)
        if groups:
            tokens = groups * self.group
            self.key_codes = self.key_codes[..., tokens:, :].clone()
            self.key_scale = self.key_scale[..., groups:, :].clone()
            self.key_zero = self.key_zero[..., groups:, :].clone()
            self.value_codes = self.value_codes[..., tokens:, :].clone()
            self.value_scale = self.value_scale[..., tokens:, :].clone()
            self.value_zero = self.value_zero[..., tokens:, :].clone()
        if self.quantized_tokens() == 0:
            [self.tail_keys] = kvcache.last_tokens([self.tail_keys], window, release=True)
            [self.tail_values] = kvcache.last_tokens([self.tail_values], window, release=True)

    def tensors(self):
        return [
            self.key_codes, self.key_scale, self.key_zero,
            self.value_codes, self.value_scale, self.value_zero,
            self.tail_keys, self.tail_values,
        ]


@register
class Kivi(CompressionMethod):
    name = "kivi"
    summary = "asymmetric low-bit quantization: keys per channel, values per token, recent tokens in full precision"
    paper = "KIVI (arXiv 2402.02750)"
    compresses = "bits (2-bit keys per channel, values per token)"
    stage = "bits"
    leaves_dense = False
    parameters = {
        "bits": Parameter(int, 2, "bits per quantized key or value", choices=(2, 4)),
        "group": Parameter(int, 32, "group size: tokens per key group, channels per value group", low=1, high=4096),
        "residual": Parameter(int, 128, "most recent tokens kept in full precision", low=0, high=1_000_000),
    }

    def compress(self, cache, context) -> CompressionReport:
        p = self.params
        entries = [kvcache.dense_entry(cache, layer, self.name) for layer in range(kvcache.layer_count(cache))]
        for layer, entry in enumerate(entries):
            cache.layers[layer] = KiviLayer(
                entry.keys, entry.values, p["bits"], p["group"], p["residual"], kvcache.sliding_window_of(entry)
            )
        quantized = sum(cache.layers[layer].quantized_tokens() for layer in range(len(entries)))
        held = kvcache.layer_lengths(cache)
        notes = [
            f"{quantized} of {sum(held)} held tokens (all layers) quantized to {p['bits']} bits; "
            "the budget fraction does not apply to KIVI (it compresses bits, not tokens)"
        ]
        return CompressionReport(layer_budgets=np.asarray(held), notes=notes)
