"""The model-facing core: prefill (optionally recording signals) and feeding tokens through a cache.

Positions are always explicit: after compression a layer may hold far fewer entries than the prompt had
tokens, so RoPE positions come from the true token index, never from the cache length.
"""

from __future__ import annotations

import contextlib
import inspect
import time
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from .attention import observing
from .capture import PromptAnalysis, ReconstructionObserver, recording
from ..errors import InputError, OutOfMemoryError
from .models import LoadedModel


@dataclass
class Prefill:
    """A prompt after prefill: ids (1, n), the full cache, next-token logits (V,), signals, and wall seconds
    in all (`seconds`) of which `analysis_s` went to computing the signals."""

    input_ids: torch.Tensor
    cache: object
    next_logits: torch.Tensor
    analysis: PromptAnalysis
    seconds: float
    analysis_s: float = 0.0

    @property
    def n_tokens(self) -> int:
        return int(self.input_ids.shape[1])


def _cache_argument(model) -> str:
    """Name of the forward argument that takes the cache ('cache' in recent transformers)."""
    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


@contextlib.contextmanager
def _memory_guard():
    try:
        yield
    except torch.OutOfMemoryError:
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        raise OutOfMemoryError(
            "the device ran out of memory: try a shorter prompt, fewer methods, or the CPU"
        ) from None


def rotation(loaded: LoadedModel, layer: int) -> Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    """`rotation(offsets) → (cos, sin)`, each (len(offsets), d) float32: the RoPE of decoder layer `layer` at those
    positions (a sliding-window layer of Gemma 3 has its own base), from the model's own rotary module."""
    model = loaded.model
    rotary = getattr(getattr(model, "model", model), "rotary_emb", None)
    if rotary is None:
        raise InputError(f"{loaded.name} has no rotary position embedding that expected attention can move queries with")
    extra = {}
    if "layer_type" in inspect.signature(rotary.forward).parameters:
        extra["layer_type"] = model.config.layer_types[layer]
    probe = torch.zeros(1, device=loaded.device, dtype=torch.float32)

    def at(offsets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.inference_mode():
            cos, sin = rotary(probe, offsets.to(loaded.device).long()[None], **extra)
        return cos[0].float(), sin[0].float()

    return at


def reset_peak_memory(device: torch.device) -> None:
    """Start counting the peak GPU memory anew on a CUDA `device` (nothing elsewhere)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory(device: torch.device) -> int | None:
    """Most bytes allocated on a CUDA `device` since `reset_peak_memory` (`torch.cuda.max_memory_allocated`):
    weights, every held cache and the work of the step in between; None on other devices."""
    return int(torch.cuda.max_memory_allocated(device)) if device.type == "cuda" else None


def forward_tokens(loaded: LoadedModel, cache, token_ids: torch.Tensor, start: int, last_only: bool = False) -> torch.Tensor:
    """Feed tokens (1, k) at true positions start..start+k−1 through `cache` (updated in place); logits (k, V)."""
    model = loaded.model
    k = token_ids.shape[1]
    positions = torch.arange(start, start + k, device=loaded.device)[None]
    kwargs = {_cache_argument(model): cache, "use_cache": True, "position_ids": positions}
    if last_only:
        kwargs["logits_to_keep"] = 1
    with torch.inference_mode(), _memory_guard():
        out = model(input_ids=token_ids.to(loaded.device), **kwargs)
    return out.logits[0].float()


def teacher_forced_logits(
    loaded: LoadedModel, cache, first_logits: torch.Tensor, start: int, reference: list[int]
) -> np.ndarray:
    """Next-token logits (T, V) at each step of `reference`, feeding its tokens through `cache` from `start` at once."""
    first = first_logits[None].float().cpu()
    if len(reference) == 1:
        return first.numpy()
    fed = torch.tensor([reference[:-1]], device=loaded.device)
    with loaded.lock:
        rest = forward_tokens(loaded, cache, fed, start).float().cpu()
    return torch.cat([first, rest]).numpy()


def new_cache(loaded: LoadedModel):
    from transformers import DynamicCache

    return DynamicCache(config=loaded.model.config)


def prefill(
    loaded: LoadedModel, input_ids: torch.Tensor, window: int = 32, deep: bool = False,
    progress: Callable[[int], None] | None = None, needs: frozenset[str] = frozenset(),
) -> Prefill:
    """Prefill the prompt into a fresh cache, recording every layer's signals on the way.

    `deep` adds LMBO; `needs` adds records that methods declare (`capture.PREFILL_RECORDS`);
    `progress(layer)` is called after each layer and may raise `capture.Cancelled`.
    """
    if window < 1:
        raise ValueError("window must be at least 1")
    with loaded.lock:
        cache = new_cache(loaded)
        started = time.perf_counter()
        with recording(loaded.model, window, deep=deep, progress=progress, needs=needs) as recorder:
            logits = forward_tokens(loaded, cache, input_ids, 0, last_only=True)
        analysis = recorder.analysis()
        analysis_s = recorder.seconds
        if "reconstruction" in needs:
            repeated = time.perf_counter()
            analysis.reconstruction = reconstruction_scores(loaded, input_ids)
            analysis_s += time.perf_counter() - repeated
        seconds = time.perf_counter() - started
    return Prefill(input_ids, cache, logits[-1], analysis, seconds, analysis_s)


REPEAT_INSTRUCTION = "\n\nRepeat the previous context exactly.\n\n"


def reconstruction_scores(loaded: LoadedModel, input_ids: torch.Tensor) -> np.ndarray:
    """KVzip's score (L, H_kv, n) of each token of `input_ids` (1, n): one extra forward pass over
    [prompt, REPEAT_INSTRUCTION, prompt], recording the largest attention each prompt token receives from the
    instruction's and the repeated prompt's queries (`capture.ReconstructionObserver`)."""
    n = int(input_ids.shape[1])
    instruction = ([] if loaded.tokenizer is None  # a bare model (the GPU check's) reads the prompt twice as is
                   else loaded.tokenizer(REPEAT_INSTRUCTION, add_special_tokens=False)["input_ids"])
    repeat = torch.cat([input_ids.cpu(), torch.tensor([instruction], dtype=torch.long).reshape(1, -1), input_ids.cpu()],
                       dim=1)
    if repeat.shape[1] > loaded.max_context:
        raise InputError(f"kvzip reads the prompt twice ({repeat.shape[1]} tokens), more than {loaded.name} accepts "
                         f"({loaded.max_context}): use a shorter prompt or another selection")
    observer = ReconstructionObserver(loaded.num_layers, n, first_query=n)
    observe_prefill(loaded, repeat, observer)
    return np.stack(observer.scores)


def observe_prefill(loaded: LoadedModel, input_ids: torch.Tensor, observer) -> None:
    """Prefill `input_ids` (1, n) into a throwaway cache while `observer.on_attention` sees every layer."""
    with loaded.lock, observing(observer):
        forward_tokens(loaded, new_cache(loaded), input_ids, 0, last_only=True)


def greedy_tokens(loaded: LoadedModel, input_ids: torch.Tensor, max_new_tokens: int) -> list[int]:
    """The model's greedy continuation of `input_ids` (1, n) with full KV, at most `max_new_tokens` tokens."""
    cache = new_cache(loaded)
    with loaded.lock:
        logits = forward_tokens(loaded, cache, input_ids, 0, last_only=True)[-1]
    return greedy_decode(loaded, cache, logits, input_ids.shape[1], max_new_tokens)[0]


def greedy_decode(
    loaded: LoadedModel, cache, next_logits: torch.Tensor, start: int, max_new_tokens: int,
    static: bool | None = None,
) -> tuple[list[int], list[torch.Tensor]]:
    """Greedy tokens from `next_logits` on, fed one at a time from position `start`; with each step's logits (V,).

    `static` (default: on CUDA) first turns the cache's dense layers into preallocated ragged buffers
    (`static_cache`); on CUDA, with every layer static, each step is then one replayed CUDA graph."""
    from .static_cache import GraphedDecoder, to_static

    tokens: list[int] = []
    step_logits: list[torch.Tensor] = []
    logits = next_logits
    stop = loaded.eos_token_ids
    with loaded.lock:
        graphed = None
        if (loaded.device.type == "cuda" if static is None else static) and max_new_tokens > 1:
            every_layer = to_static(cache, max_new_tokens)
            if every_layer and loaded.device.type == "cuda":
                graphed = GraphedDecoder(loaded.model, cache, _cache_argument(loaded.model), loaded.device)
        for step in range(max_new_tokens):
            step_logits.append(logits)
            token = int(torch.argmax(logits))
            tokens.append(token)
            if token in stop or step == max_new_tokens - 1:
                break
            if graphed is not None:
                with _memory_guard():
                    logits = graphed.step([token], start + step)[0]
            else:
                logits = forward_tokens(loaded, cache, torch.tensor([[token]]), start + step)[-1]
    return tokens, step_logits
