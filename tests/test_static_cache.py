"""The static cache of ragged layers (the decode path used on CUDA): on the CPU it gives exactly the tokens,
and the logits to float32 rounding, of the dynamic path for every token-budget method; each layer's buffer
holds its own kept tokens plus the tokens to come, nothing more; a full buffer says so."""

import pytest
import torch

from zigzag_viz.errors import InputError
from zigzag_viz.evaluation.prompts import passkey_prompt
from zigzag_viz.evaluation.runner import Runner
from zigzag_viz.methods import METHODS
from zigzag_viz.pipeline import cache as kvcache
from zigzag_viz.pipeline import runtime
from zigzag_viz.pipeline.static_cache import StaticLayer, to_static

PROMPT = passkey_prompt(n_sentences=14, seed=31)
TOKEN_METHODS = [name for name, cls in METHODS.items() if cls.stage == "tokens" and not cls.lossless]
NEW_TOKENS = 16


def compressed(loaded, spec: str, budget: float = 0.3):
    """A compressed copy of the prompt's cache and what decoding starts from: (cache, next logits, position)."""
    runner = Runner(loaded)
    request = runner.request(PROMPT.text, spec, budget, window=16, max_new_tokens=NEW_TOKENS)
    reference = runner.reference(request)
    method = request.methods[0]
    context, _ = runner.prepare_row(request, reference, method, budget)
    cache = kvcache.clone(reference.pre.cache)
    method.compress(cache, context)
    return cache, reference.pre.next_logits, reference.pre.n_tokens


@pytest.mark.parametrize("spec", TOKEN_METHODS + ["zigzag[select=knorm]", "uniform[select=hybrid]"])
def test_static_decoding_equals_dynamic_decoding(tiny, spec):
    cache, logits, position = compressed(tiny, spec)
    lengths = kvcache.layer_lengths(cache)
    dynamic, static = kvcache.clone(cache), kvcache.clone(cache)
    tokens, steps = runtime.greedy_decode(tiny, dynamic, logits, position, NEW_TOKENS, static=False)
    static_tokens, static_steps = runtime.greedy_decode(tiny, static, logits, position, NEW_TOKENS, static=True)
    assert static_tokens == tokens
    torch.testing.assert_close(torch.stack(static_steps), torch.stack(steps), rtol=1e-5, atol=1e-5)
    assert kvcache.layer_lengths(static) == kvcache.layer_lengths(dynamic)
    converted = [entry for entry in static.layers if isinstance(entry, StaticLayer)]
    other_forms = [entry for entry in cache.layers if isinstance(entry, kvcache.CompressedLayer)]
    assert len(converted) == len(cache.layers) - len(other_forms)  # per-head or LESS layers stay as they are
    for entry, kept in zip(static.layers, lengths):
        if isinstance(entry, StaticLayer):
            assert entry.capacity == kept + NEW_TOKENS  # ragged: each layer its own kept length


def test_static_layers_hold_only_what_was_kept_plus_room_for_new_tokens(tiny):
    cache, _, _ = compressed(tiny, "pyramid", 0.2)
    kept = kvcache.layer_lengths(cache)
    assert len(set(kept)) > 1  # pyramid budgets differ per layer
    bytes_before = kvcache.kv_bytes(cache)
    assert to_static(cache, 8) is True
    per_token = bytes_before // sum(kept)
    assert kvcache.kv_bytes(cache) == per_token * (sum(kept) + 8 * len(kept))
    assert [entry.held_tokens() for entry in cache.layers] == kept


def test_a_chunk_of_new_tokens_through_a_static_cache_is_causal(tiny):
    cache, _, position = compressed(tiny, "pyramid")
    chunk = torch.tensor([[5, 17, 99, 3, 42]])
    dynamic, static = kvcache.clone(cache), kvcache.clone(cache)
    to_static(static, 8)
    expected = runtime.forward_tokens(tiny, dynamic, chunk, position)
    torch.testing.assert_close(runtime.forward_tokens(tiny, static, chunk, position), expected, rtol=1e-5, atol=1e-5)


def test_a_full_static_layer_refuses_more_tokens(tiny):
    cache, logits, position = compressed(tiny, "uniform")
    to_static(cache, 2)
    runtime.forward_tokens(tiny, cache, torch.tensor([[7, 8]]), position)
    with pytest.raises(InputError, match="the static cache holds"):
        runtime.forward_tokens(tiny, cache, torch.tensor([[9]]), position + 2)
