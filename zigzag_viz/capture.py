"""Stage 2, capture layer-uncertainty signals during the prefill that fills the cache (METHOD §2).

Window attention softmax(q_win Kᵀ/√d + causal) is computed per layer from the last `w` RoPE'd queries and
the layer's keys: O(w·n) memory, reduced at once and freed. Hidden-state change is reduced on the fly by
forward hooks on the decoder layers. No `output_attentions`, no eager attention, no n × n matrix.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import numpy as np
import torch

from . import attention

SIGNALS = ("lmba", "entropy", "hidden")


@dataclass
class PromptAnalysis:
    """Signals of one prompt. L layers, H_q query heads, n prompt tokens, w window queries.

    entropy, entropy_norm: (L, H_q) nats (and nats / log #keys), mean over window queries.
    attention_rows: (L, H_q, n) mean attention of the window queries to each key (rows sum to 1).
    hidden_change: (L, n) 1 − cos(residual in, residual out) of each decoder layer, per token.
    kv_group: (H_q,) index of the KV head each query head reads.
    """

    n_tokens: int
    window: int
    entropy: np.ndarray
    entropy_norm: np.ndarray
    attention_rows: np.ndarray
    hidden_change: np.ndarray
    kv_group: np.ndarray

    @property
    def num_layers(self) -> int:
        return self.entropy.shape[0]

    def lmba(self, tau: float = 0.9) -> np.ndarray:
        """(L, H_q) minimum attention budget as a fraction of n."""
        return min_budget_fraction(self.attention_rows, tau)

    def layer_signal(self, name: str, tau: float = 0.9) -> np.ndarray:
        """(L,) per-layer uncertainty: 'lmba' and 'entropy' are means over query heads."""
        if name == "lmba":
            return self.lmba(tau).mean(axis=1)
        if name == "entropy":
            return self.entropy.mean(axis=1)
        if name == "hidden":
            return self.hidden_change.mean(axis=1)
        raise ValueError(f"unknown signal '{name}': choose {', '.join(SIGNALS)}")

    def kv_scores(self, layer: int) -> np.ndarray:
        """(H_kv, n) SnapKV scores of one layer: attention mass each key gets from the window, summed over a KV group."""
        scores = np.zeros((int(self.kv_group.max()) + 1, self.n_tokens), dtype=np.float64)
        np.add.at(scores, self.kv_group, self.attention_rows[layer])
        return scores


def min_budget_fraction(rows: np.ndarray, tau: float) -> np.ndarray:
    """Smallest share of keys whose attention mass reaches tau of the row's total; rows (..., n) → (...)."""
    if not 0.0 < tau <= 1.0:
        raise ValueError(f"tau must lie in (0, 1], got {tau}")
    ordered = -np.sort(-rows, axis=-1)
    cumulative = np.cumsum(ordered, axis=-1)
    target = tau * cumulative[..., -1:]
    count = (cumulative < target * (1 - 1e-9)).sum(axis=-1) + 1
    return np.minimum(count, rows.shape[-1]) / rows.shape[-1]


def window_attention(query: torch.Tensor, key: torch.Tensor, scaling: float, window: int) -> torch.Tensor:
    """Softmax rows of the last `window` queries over all causal keys: (H_q, w, n) float32.

    query (1, H_q, n, d), key (1, H_kv, n, d); grouped heads share keys without repeating them.
    """
    _, num_q, n, dim = query.shape
    num_kv = key.shape[1]
    group = num_q // num_kv
    w = min(window, n)
    q_win = query[0, :, n - w :, :].float().reshape(num_kv, group * w, dim)
    scores = torch.matmul(q_win, key[0].float().transpose(-1, -2)).mul_(scaling).view(num_q, w, n)
    query_pos = torch.arange(n - w, n, device=query.device)[:, None]
    key_pos = torch.arange(n, device=query.device)[None, :]
    scores.masked_fill_(key_pos > query_pos, float("-inf"))
    return torch.softmax(scores, dim=-1)


class SignalRecorder:
    """Collects per-layer signals during one prefill; `analysis()` returns them as a PromptAnalysis."""

    def __init__(self, num_layers: int, window: int):
        self.window = window
        self.entropy: list[np.ndarray | None] = [None] * num_layers
        self.entropy_norm: list[np.ndarray | None] = [None] * num_layers
        self.rows: list[np.ndarray | None] = [None] * num_layers
        self.hidden: list[np.ndarray | None] = [None] * num_layers
        self.kv_group: np.ndarray | None = None
        self.n_tokens = 0

    def on_attention(self, module, query, key, scaling) -> None:
        layer = module.layer_idx
        n = query.shape[2]
        probs = window_attention(query, key, scaling, self.window)  # (H_q, w, n)
        w = probs.shape[1]
        entropy = torch.special.entr(probs).sum(-1)  # (H_q, w)
        key_counts = torch.arange(n - w + 1, n + 1, device=probs.device, dtype=torch.float32)
        normaliser = torch.log(key_counts).clamp_min(1e-12)
        entropy_norm = torch.where(key_counts > 1, entropy / normaliser, torch.zeros_like(entropy))
        self.entropy[layer] = entropy.mean(-1).cpu().numpy()
        self.entropy_norm[layer] = entropy_norm.mean(-1).cpu().numpy()
        self.rows[layer] = probs.mean(1).cpu().numpy()
        if self.kv_group is None:
            group = query.shape[1] // key.shape[1]
            self.kv_group = np.arange(query.shape[1]) // group
        self.n_tokens = n

    def on_layer(self, layer: int, hidden_in: torch.Tensor, hidden_out: torch.Tensor) -> None:
        cos = torch.nn.functional.cosine_similarity(hidden_in[0].float(), hidden_out[0].float(), dim=-1)
        self.hidden[layer] = (1.0 - cos).cpu().numpy()

    def analysis(self) -> PromptAnalysis:
        missing = [i for i, rows in enumerate(self.rows) if rows is None]
        if missing:
            raise RuntimeError(f"no attention was observed for layers {missing}")
        return PromptAnalysis(
            n_tokens=self.n_tokens,
            window=min(self.window, self.n_tokens),
            entropy=np.stack(self.entropy),
            entropy_norm=np.stack(self.entropy_norm),
            attention_rows=np.stack(self.rows),
            hidden_change=np.stack(self.hidden),
            kv_group=self.kv_group,
        )


def decoder_layers(model: torch.nn.Module) -> torch.nn.ModuleList:
    """The list of decoder blocks of a causal LM (the ModuleList whose items hold `self_attn`)."""
    for module in model.modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) and hasattr(module[0], "self_attn"):
            return module
    raise ValueError(f"cannot find decoder layers in {type(model).__name__}")


@contextlib.contextmanager
def recording(model: torch.nn.Module, window: int):
    """Within this block the next prefill of `model` is recorded; yields the SignalRecorder."""
    layers = decoder_layers(model)
    recorder = SignalRecorder(len(layers), window)
    handles = []
    for index, layer in enumerate(layers):

        def hook(module, args, kwargs, output, index=index):
            hidden_in = args[0] if args else kwargs["hidden_states"]
            hidden_out = output[0] if isinstance(output, tuple) else output
            if hidden_in.shape[1] == recorder.n_tokens:
                recorder.on_layer(index, hidden_in, hidden_out)

        handles.append(layer.register_forward_hook(hook, with_kwargs=True))
    try:
        with attention.observing(recorder):
            yield recorder
    finally:
        for handle in handles:
            handle.remove()

