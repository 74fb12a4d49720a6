"""LESS: evict tokens like a budget method, and fold what was evicted into a constant-size state that
attention still reads through learned kernels.

LESS (Dong et al., arXiv 2402.09398). Per layer and KV head, kernels φ_q, φ_k: R^d → R^r (≥ 0, a two-layer
MLP with a softplus) are trained so that φ_q(q)·φ_k(k) stands in for the attention weight of an evicted key.
After eviction each KV head stores, besides its kept keys and values,

    S = Σ_evicted φ_k(k_j) v_jᵀ   (r × d_v)        z = Σ_evicted φ_k(k_j)   (r,)

and a query q attends as

    out = (Σ_kept e^{s_i − m} v_i + φ_q(q)ᵀ S) / (Σ_kept e^{s_i − m} + φ_q(q)·z),   s_i = q·k_i·scale, m = max_kept s_i,

so the kernel product approximates e^{s − m} (at most about 1 for an evicted key, numerically safe). Tokens
decoded after compression join the softmax but not m, which stays the largest score over the kept prompt
tokens, as in training.

The kernels are trained once per model on this machine. Generated prompts (a pass key, where someone left
something, repeating a sentence of the prose; filler prose around them) are answered greedily by the model
with full KV; prompt and answer are prefilled once, and per layer two kinds of example are kept: the answer's
queries over the whole prompt (aware setting) and the question's and answer's queries over the context
(context setting). The prefix is evicted with SnapKV selection (its own last 32 queries) at kept fractions
0.1–0.5 and the kernels minimise the squared error of the formula above against full attention over the
prefix (Adam, a fixed number of full-batch steps). Held-out prompts measure the error against eviction
alone. The kernels (tens of KB per layer) are stored under the calibration folder and reused. The state
costs r·(d_v + 1) numbers per KV head and layer.
"""

from __future__ import annotations

import random
import time
from typing import ClassVar

import numpy as np
import torch

from ..pipeline import cache as kvcache
from ..pipeline import runtime
from ..pipeline.attention import grouped_queries, grouped_scores, masked_scores, ungrouped
from ..pipeline.capture import window_attention
from ..errors import InputError
from ..pipeline.models import LoadedModel
from ..pipeline.selection import keep_top, snapkv_scores
from ..evaluation.prompts import filler, paragraphs, passkey_prompt, split_question
from .base import CompressionReport, Parameter, TokenBudgetMethod, register
from .calibration import CalibratedMethod, Progress, context_model, model_fingerprint, report_progress

HIDDEN = 32
ANSWER_TOKENS = 24  # the model's own greedy answer: its queries train the kernels (they are what decoding sees)
TRAIN_WINDOW = 32
TRAIN_FRACTIONS = (0.1, 0.2, 0.3, 0.5)
TRAIN_STEPS = 150


def features(params: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """φ(x) ≥ 0 per KV head: x (H_kv, N, d) → (H_kv, N, r) with params w1 (H_kv, d, h), b1, w2 (H_kv, h, r), b2."""
    hidden = torch.nn.functional.gelu(torch.baddbmm(params["b1"][:, None], x, params["w1"]))
    return torch.nn.functional.softplus(torch.baddbmm(params["b2"][:, None], hidden, params["w2"]))


def combined_attention(
    query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, state: torch.Tensor, normaliser: torch.Tensor,
    kernel_q: dict[str, torch.Tensor], scaling: float, q_len: int = 1, kept: int | None = None,
) -> torch.Tensor:
    """Softmax over kept keys plus the evicted tokens' state, per KV head, in float32.

    query (H_kv, N, d): the N = g·q_len queries of the heads reading each KV head (`attention.grouped_queries`),
    bottom-right causal over q_len new positions; keys, values (H_kv, B, d); state (H_kv, r, d_v); normaliser
    (H_kv, r) → (H_kv, N, d_v). The shift m is the largest score over the first `kept` keys (the kept prompt
    tokens; all keys when None), as in training: tokens appended later must not change the scale the kernels
    were trained against.
    """
    scores = masked_scores(grouped_scores(query, keys, scaling), q_len)
    shift = scores[..., :kept].amax(dim=-1, keepdim=True)
    if kept is not None:  # appended tokens may score higher; stay well inside float32's range
        shift = torch.maximum(shift, scores.amax(dim=-1, keepdim=True) - 60.0)
    weights = torch.exp(scores - shift)
    phi = features(kernel_q, query)  # (H_kv, N, r)
    numerator = torch.matmul(weights, values) + torch.matmul(phi, state)
    denominator = weights.sum(dim=-1, keepdim=True) + (phi * normaliser[:, None, :]).sum(dim=-1, keepdim=True)
    return numerator / denominator


def evicted_state(kernel_k: dict[str, torch.Tensor], keys: torch.Tensor, values: torch.Tensor,
                  evicted: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(S (H_kv, r, d_v), z (H_kv, r)) of the evicted rows (mask (H_kv, n)) of keys/values (H_kv, n, d)."""
    phi = features(kernel_k, keys) * evicted[..., None].to(keys.dtype)
    return torch.matmul(phi.transpose(-1, -2), values), phi.sum(dim=1)


class LessView(kvcache.CacheView):
    def __init__(self, layer: "LessLayer"):
        self.layer = layer

    def attend(self, module, query, scaling):
        if query.shape[0] != 1:
            raise ValueError("LESS's cache supports batch 1 only")
        layer, q_len = self.layer, query.shape[2]
        grouped = grouped_queries(query, layer.keys.shape[1])[0]  # (H_kv, g·q_len, d)
        out = combined_attention(grouped, layer.keys[0].float(), layer.values[0].float(), layer.state,
                                 layer.normaliser, layer.kernel_q, scaling, q_len, kept=layer.kept)
        return ungrouped(out[None], q_len).to(query.dtype)


class LessLayer(kvcache.CompressedLayer):
    """Kept keys/values (1, H_kv, B, d) (decoded tokens appended after the B kept ones), the evicted tokens'
    state S (H_kv, r, d_v) and normaliser z (H_kv, r), and the layer's query kernel (model parameters, not cache)."""

    def __init__(self, keys, values, state, normaliser, kernel_q):
        super().__init__()
        self.kept = int(keys.shape[-2])  # prompt tokens kept; decoded tokens are appended after them
        self.keys, self.values = keys, values
        self.state, self.normaliser, self.kernel_q = state, normaliser, kernel_q

    def update(self, key_states, value_states, *args, **kwargs):
        self.keys = torch.cat([self.keys, key_states], dim=-2)
        self.values = torch.cat([self.values, value_states], dim=-2)
        view = LessView(self)
        return view, view

    def tensors(self):
        return [self.keys, self.values, self.state, self.normaliser]

    def held_tokens(self) -> int:
        return int(self.keys.shape[-2])


# ---------------------------------------------------------------------------------------------------------
# Training the kernels

_NAMES = ("Aurelio", "Brigid", "Casimir", "Dagny", "Eulalie", "Florian", "Ginevra", "Hamish", "Isolde", "Jasper")
_THINGS = ("the blue kettle", "a brass compass", "the oak chest", "a paper lantern", "the silver key",
           "a wool scarf", "the clay jug", "a leather map case")
_PLACES = ("under the stairs", "in the bell tower", "behind the bakery", "on the ferry", "in the orchard",
           "beside the mill pond", "at the station", "in the library attic")


def calibration_text(seed: int) -> str:
    """A generated prompt with a question at the end, one of three kinds by `seed`: a pass key, a person and
    the place where they left a thing, or repeating a sentence of the prose. Filler prose of 35–50 sentences."""
    rng = random.Random(seed)
    kind = seed % 3
    if kind == 0:
        return passkey_prompt(n_sentences=rng.randint(35, 50), depth=rng.uniform(0.1, 0.9), seed=seed).text
    sentences = filler(rng, rng.randint(35, 50))
    if kind == 1:
        name, thing, place = rng.choice(_NAMES), rng.choice(_THINGS), rng.choice(_PLACES)
        sentences.insert(rng.randrange(len(sentences)), f"{name} left {thing} {place}.")
        question = f"Where did {name} leave {thing}?"
    else:
        picked = rng.choice(sentences)
        question = f"Which sentence of the text mentions {' '.join(picked.split()[1:4]).strip('.,')}? Repeat it."
    return paragraphs(sentences) + "\n\n" + question


class _Collector:
    """Observer of one prefill: per layer, the queries from position `first` on and every key and value."""

    def __init__(self, first: int):
        self.first = first
        self.layers: dict[int, tuple] = {}

    def on_attention(self, module, query, key, value, scaling, sliding_window):
        self.layers[module.layer_idx] = (
            query[0, :, self.first :].float().clone(), key[0].float().clone(), value[0].float().clone(), float(scaling),
            sliding_window,
        )


def _examples(collected: tuple, first: int, prefix: int) -> dict[str, torch.Tensor]:
    """Training tensors of one layer: the queries after `prefix` attend to the prefix's keys, which SnapKV (from
    the prefix's last TRAIN_WINDOW queries) evicts at every training fraction. `first` is the first query kept."""
    queries, keys, values, scaling, sliding_window = collected
    start = 0 if sliding_window is None else max(0, prefix - (sliding_window - 1))
    # Clones leave inference mode, so autograd may use them.
    window_q = queries[:, prefix - TRAIN_WINDOW - first : prefix - first].clone()
    future_q = queries[:, prefix - first :].clone()
    keys, values = keys[:, start:prefix].clone(), values[:, start:prefix].clone()
    num_q, num_kv = queries.shape[0], keys.shape[0]
    group, n = num_q // num_kv, keys.shape[1]
    probs = window_attention(window_q[None], keys[None], scaling, TRAIN_WINDOW)  # (H_q, w, n)
    kv_scores = snapkv_scores(probs.view(num_kv, group, -1, n).sum(dim=(1, 2)))
    future = future_q.reshape(num_kv, group * future_q.shape[1], -1)
    scores = torch.matmul(future, keys.transpose(-1, -2)) * scaling  # (H_kv, g·Q, n)
    target = torch.matmul(torch.softmax(scores, dim=-1), values)
    evicted, kept_num, kept_den = [], [], []
    for fraction in TRAIN_FRACTIONS:
        budget = max(TRAIN_WINDOW, int(round(fraction * n)))
        keep = keep_top(kv_scores, budget, TRAIN_WINDOW)
        kept = torch.zeros(num_kv, n, dtype=torch.bool).scatter_(1, keep, True)
        masked = scores.masked_fill(~kept[:, None, :], float("-inf"))
        weights = torch.exp(masked - masked.amax(dim=-1, keepdim=True))
        evicted.append(~kept)
        kept_num.append(torch.matmul(weights, values))
        kept_den.append(weights.sum(dim=-1, keepdim=True))
    kept_num, kept_den = torch.stack(kept_num), torch.stack(kept_den)
    evict_mse = (kept_num / kept_den - target).square().mean(dim=(1, 2, 3))  # (F,): eviction alone, per fraction
    return {"future": future, "keys": keys, "values": values, "target": target, "evicted": torch.stack(evicted),
            "kept_num": kept_num, "kept_den": kept_den, "evict_mse": evict_mse}


def _error(kernel_q, kernel_k, examples: list[dict]) -> torch.Tensor:
    """Mean squared error of LESS's output against full attention, over examples and fractions."""
    total, count = 0.0, 0
    for ex in examples:
        phi_k = features(kernel_k, ex["keys"])  # (H_kv, n, r), shared by every fraction
        phi_q = features(kernel_q, ex["future"])  # (H_kv, gQ, r)
        for f in range(ex["evicted"].shape[0]):
            mask = ex["evicted"][f][..., None].float()
            state = torch.matmul((phi_k * mask).transpose(-1, -2), ex["values"])
            normaliser = (phi_k * mask).sum(dim=1)
            out = (ex["kept_num"][f] + torch.matmul(phi_q, state)) / (
                ex["kept_den"][f] + (phi_q * normaliser[:, None, :]).sum(dim=-1, keepdim=True))
            total = total + (out - ex["target"]).square().mean()
            count += 1
    return total / count


def _init_kernel(num_kv: int, dim: int, rank: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
    return {
        "w1": torch.randn(num_kv, dim, HIDDEN, generator=generator) / dim**0.5,
        "b1": torch.zeros(num_kv, HIDDEN),
        "w2": torch.randn(num_kv, HIDDEN, rank, generator=generator) * 0.1 / HIDDEN**0.5,
        "b2": torch.full((num_kv, rank), -6.0),  # softplus(−6) ≈ 0.0025: the state starts nearly silent
    }


def train_layer(train: list[dict], held_out: list[dict], rank: int, seed: int) -> tuple[dict, dict, dict]:
    """Kernels (φ_q, φ_k) of one layer, with the held-out errors of LESS and of eviction alone."""
    generator = torch.Generator().manual_seed(seed)
    num_kv, dim = train[0]["keys"].shape[0], train[0]["keys"].shape[-1]
    kernel_q, kernel_k = _init_kernel(num_kv, dim, rank, generator), _init_kernel(num_kv, dim, rank, generator)
    params = [*kernel_q.values(), *kernel_k.values()]
    for p in params:
        p.requires_grad_(True)
    optimiser = torch.optim.Adam(params, lr=1e-2)
    for _ in range(TRAIN_STEPS):
        optimiser.zero_grad()
        loss = _error(kernel_q, kernel_k, train)
        loss.backward()
        optimiser.step()
    with torch.no_grad():
        for p in params:
            p.requires_grad_(False)
        less = _error(kernel_q, kernel_k, held_out)
    evict = torch.cat([ex["evict_mse"] for ex in held_out]).mean()
    return kernel_q, kernel_k, {"held_out_mse": float(less), "held_out_mse_evict_only": float(evict)}


@register
class Less(CalibratedMethod, TokenBudgetMethod):
    name = "less"
    summary = "budget eviction plus a learned constant-size state of the evicted tokens that attention still reads"
    paper = "LESS (arXiv 2402.09398)"
    compresses = "tokens per layer, evicted tokens folded into a rank-r state"
    calibration = "once per model: kernels trained against full attention on generated prompts"
    leaves_dense = False
    parameters = {
        "alloc": TokenBudgetMethod.alloc_parameter,
        "rank": Parameter(int, 8, "size r of the state per KV head (kernels are trained per rank)", choices=(4, 8, 16)),
        "select": TokenBudgetMethod.select_parameter,
    }
    train_seeds: ClassVar[range] = range(3000, 3009)
    held_out_seeds: ClassVar[range] = range(3100, 3103)
    weight_fields = ("q", "k")

    def layer_budgets(self, context):
        return self.allocated_budgets(context)

    def calibration_key(self, loaded: LoadedModel) -> str:
        return (f"{model_fingerprint(loaded)}|rank={self.params['rank']} hidden={HIDDEN} steps={TRAIN_STEPS} "
                f"answer={ANSWER_TOKENS} window={TRAIN_WINDOW} shift=kept"
                f"|tasks{len(self.train_seeds)}s{self.train_seeds.start}")

    def needs_calibration(self, context) -> bool:
        """Kernels are needed only when some layer evicts."""
        return bool((np.asarray(self.layer_budgets(context)) < context.analysis.layer_caps).any())

    def check_calibration(self, loaded: LoadedModel, result: dict) -> None:
        """Per layer, φ_q and φ_k of this rank: w1 (H_kv, d, HIDDEN), b1 (H_kv, HIDDEN), w2 (H_kv, HIDDEN, r),
        b2 (H_kv, r), finite; and the summary's held-out error ratio."""
        config = loaded.config
        dim = getattr(config, "head_dim", None) or config.hidden_size // loaded.num_query_heads
        heads, rank = loaded.num_kv_heads, self.params["rank"]
        shapes = {"w1": (heads, dim, HIDDEN), "b1": (heads, HIDDEN), "w2": (heads, HIDDEN, rank), "b2": (heads, rank)}
        for side in ("q", "k"):
            if len(result[side]) != loaded.num_layers:
                raise ValueError(f"{len(result[side])} layers of φ_{side} kernels, the model has {loaded.num_layers}")
            for layer, kernel in enumerate(result[side]):
                for name, shape in shapes.items():
                    if tuple(kernel[name].shape) != shape or not torch.isfinite(kernel[name]).all():
                        raise ValueError(f"φ_{side} {name} of layer {layer} is not {shape} finite numbers")
        if not isinstance(result["summary"]["held_out_error_ratio"], (int, float)):
            raise TypeError("the summary has no held-out error ratio")

    def compute_calibration(self, loaded: LoadedModel, progress: Progress | None) -> dict:
        """{"q": [per-layer kernel], "k": [...], "summary": {...}}. Collect, for every prompt, the model's own
        greedy answer; then prefill prompt + answer once and keep two kinds of example per layer: the answer's
        queries over the whole prompt (aware setting) and the question's and answer's queries over the context
        before the question (context setting)."""
        started = time.perf_counter()
        prompts = {"train": [calibration_text(seed) for seed in self.train_seeds],
                   "held_out": [calibration_text(seed) for seed in self.held_out_seeds]}
        data = {part: [] for part in prompts}
        count = sum(len(t) for t in prompts.values())
        done = 0
        for part, texts in prompts.items():
            for text in texts:
                report_progress(progress, 0.3 * done / count, f"less: the model answers prompt {done + 1}/{count}")
                ids = loaded.encode(text)
                n = ids.shape[1]
                context = loaded.question_start(text, split_question(text)[1], ids)
                if context < 2 * TRAIN_WINDOW:
                    raise InputError("less: calibration prompts are too short for this tokenizer")
                answer = runtime.greedy_tokens(loaded, ids, ANSWER_TOKENS)
                full = torch.cat([ids, torch.tensor([answer], device=ids.device)], dim=1)
                collector = _Collector(first=context - TRAIN_WINDOW)
                runtime.observe_prefill(loaded, full, collector)
                first = context - TRAIN_WINDOW
                layers = [collector.layers[i] for i in range(loaded.num_layers)]
                data[part].append({"aware": [(layer, first, n) for layer in layers],
                                   "context": [(layer, first, context) for layer in layers]})
                done += 1
        kernels_q, kernels_k, layers = [], [], []
        for layer in range(loaded.num_layers):
            report_progress(progress, 0.3 + 0.7 * layer / loaded.num_layers,
                            f"less: training the kernels of layer {layer + 1}/{loaded.num_layers}")
            train, held_out = (
                [_examples(*prompt[kind][layer]) for prompt in data[part] for kind in ("aware", "context")]
                for part in ("train", "held_out")
            )
            kernel_q, kernel_k, errors = train_layer(train, held_out, self.params["rank"], seed=layer)
            kernels_q.append(kernel_q)
            kernels_k.append(kernel_k)
            layers.append(errors)
        seconds = time.perf_counter() - started
        less = np.asarray([e["held_out_mse"] for e in layers])
        evict = np.asarray([e["held_out_mse_evict_only"] for e in layers])
        summary = {
            "prompts": len(prompts["train"]), "held_out_prompts": len(prompts["held_out"]),
            "fractions": list(TRAIN_FRACTIONS), "seconds": round(seconds, 1),
            "held_out_error_ratio": round(float(less.sum() / evict.sum()), 4),
            "layers": [{k: round(v, 8) for k, v in e.items()} for e in layers],
        }
        report_progress(progress, 1.0, f"less: kernels trained in {seconds:.0f} s")
        return {"q": kernels_q, "k": kernels_k, "summary": summary}

    def compress(self, cache, context) -> CompressionReport:
        report = super().compress(cache, context)
        if not report.kept:
            report.notes.append("less: nothing evicted, no state")
            return report
        loaded = context_model(context, self.name)
        ratio = self.calibrate(loaded)["summary"]["held_out_error_ratio"]
        report.notes.append(f"less: rank-{self.params['rank']} state per KV head; on held-out prompts the kernels "
                            f"leave {ratio:.0%} of eviction's attention-output error")
        report.notes += self.calibration_notes(loaded)
        return report

    def evict_layer(self, cache, layer, keep, context) -> None:
        """Fold the layer's evicted rows into its state, then keep `keep` (H_kv, B) in a LessLayer."""
        kernels = self.calibrate(context_model(context, self.name), context.progress)
        if len(kernels["q"]) != kvcache.layer_count(cache):
            raise InputError(f"less: the kernels are for {len(kernels['q'])} layers, the cache has "
                             f"{kvcache.layer_count(cache)}")
        if not kvcache.is_dense(cache, layer):
            raise InputError("less evicts from dense layers: it cannot follow a method that changed their storage")
        entry = cache.layers[layer]
        device = entry.keys.device
        held = entry.keys.shape[-2]
        evicted = torch.ones(keep.shape[0], held, dtype=torch.bool, device=device).scatter_(1, keep.to(device), False)
        kernel_k = {k: v.to(device) for k, v in kernels["k"][layer].items()}
        state, normaliser = evicted_state(kernel_k, entry.keys[0].float(), entry.values[0].float(), evicted)
        kvcache.evict(cache, layer, keep)
        cache.layers[layer] = LessLayer(entry.keys, entry.values, state, normaliser,
                                        {k: v.to(device) for k, v in kernels["q"][layer].items()})
