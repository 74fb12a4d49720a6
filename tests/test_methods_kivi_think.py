"""KIVI (packed low-bit keys and values) and ThinK (pruned key channels): bytes, exactness, error bounds, composition."""

import math

import pytest
import torch

from zigzag_viz.pipeline import cache as kvcache
from zigzag_viz.pipeline import runtime
from zigzag_viz.evaluation.runner import compare
from zigzag_viz.errors import InputError
from zigzag_viz.methods import CompressionContext, parse_spec
from zigzag_viz.methods.kivi import KiviLayer, pack, unpack
from zigzag_viz.methods.think import ThinkLayer
from zigzag_viz.pipeline.models import _load_smollm2_tokenizer, wrap_model
from zigzag_viz.evaluation.prompts import passkey_prompt

H_KV, HEAD_DIM, LAYERS = 2, 16, 4  # the tiny model


@pytest.fixture(scope="module")
def prefilled(tiny):
    """300 random tokens through the tiny model: longer than KIVI's residual of 128."""
    ids = torch.randint(100, 20000, (1, 300), generator=torch.Generator().manual_seed(1))
    return runtime.prefill(tiny, ids, window=16, needs=frozenset({"query_energy"}))


def _compressed(pre, spec, budget=0.3):
    cache = kvcache.clone(pre.cache)
    report = parse_spec(spec).compress(cache, CompressionContext(pre.analysis, budget))
    return cache, report


def _stored_bytes(cache) -> int:
    return sum(t.numel() * t.element_size() for entry in cache.layers for t in kvcache.layer_tensors(entry))


def test_pack_and_unpack_round_trip():
    for bits in (2, 4):
        codes = torch.randint(0, 1 << bits, (2, 3, 7, 19), dtype=torch.uint8, generator=torch.Generator().manual_seed(bits))
        packed = pack(codes, bits)
        assert packed.dtype == torch.uint8 and packed.shape[-1] == math.ceil(19 * bits / 8)
        assert torch.equal(unpack(packed, bits, 19), codes)


@pytest.mark.parametrize("bits, group, residual", [(2, 32, 128), (4, 8, 20), (2, 64, 0)])
def test_kivi_bytes_are_the_packed_codes_fp16_scales_and_the_tail(prefilled, bits, group, residual):
    cache, report = _compressed(prefilled, f"kivi[bits={bits},group={group},residual={residual}]")
    n = prefilled.n_tokens
    quantized = (n - residual) // group * group
    tail = n - quantized
    assert report.layer_budgets.tolist() == [n] * LAYERS  # KIVI keeps every token
    value_groups = math.ceil(HEAD_DIM / min(group, HEAD_DIM))
    per_layer = (
        2 * H_KV * quantized * HEAD_DIM * bits // 8  # packed key and value codes
        + 2 * H_KV * (quantized // group) * HEAD_DIM * 2  # key scale and zero: per channel per token group, fp16
        + 2 * H_KV * quantized * value_groups * 2  # value scale and zero: per token per channel group, fp16
        + 2 * H_KV * tail * HEAD_DIM * 4  # full-precision tail (float32)
    )
    for entry in cache.layers:
        assert isinstance(entry, KiviLayer)
        assert entry.key_codes.dtype == entry.value_codes.dtype == torch.uint8
        assert entry.key_scale.dtype == entry.value_zero.dtype == torch.float16
        assert entry.tail_keys.dtype == torch.float32 and entry.tail_keys.shape[-2] == tail
    assert kvcache.kv_bytes(cache) == _stored_bytes(cache) == LAYERS * per_layer
    fraction = kvcache.kv_bytes(cache) / kvcache.kv_bytes(prefilled.cache)
    assert 0 < fraction < 1
    print(f"kivi[bits={bits},group={group},residual={residual}] on {n} tokens: kv_fraction {fraction:.3f}")


def test_think_bytes_are_the_pruned_keys_channels_and_full_values(prefilled):
    cache, report = _compressed(prefilled, "think")
    n, d_keep = prefilled.n_tokens, math.ceil(0.6 * HEAD_DIM)
    assert report.layer_budgets.tolist() == [n] * LAYERS
    for entry in cache.layers:
        assert isinstance(entry, ThinkLayer)
        assert entry.pruned_keys.shape == (1, H_KV, n, d_keep)
        assert entry.channels.shape == (H_KV, d_keep)
        assert all(torch.equal(row, row.sort().values) for row in entry.channels)
    per_layer = H_KV * n * d_keep * 4 + H_KV * d_keep * 8 + H_KV * n * HEAD_DIM * 4
    assert kvcache.kv_bytes(cache) == _stored_bytes(cache) == LAYERS * per_layer
    assert 0 < kvcache.kv_bytes(cache) / kvcache.kv_bytes(prefilled.cache) < 1


def test_think_keeps_the_channels_with_the_largest_query_key_magnitude(prefilled):
    cache, _ = _compressed(prefilled, "think[keep=0.25]")
    analysis, layer = prefilled.analysis, 2
    keys = prefilled.cache.layers[layer].keys[0]  # (H_kv, n, d)
    for head in range(H_KV):
        energy = analysis.query_channel_energy[layer][analysis.kv_group == head].sum(0)
        score = torch.from_numpy(energy).sqrt() * keys[head].double().norm(dim=0)
        expected = torch.topk(score, 4).indices.sort().values
        assert torch.equal(cache.layers[layer].channels[head], expected)
        assert torch.equal(cache.layers[layer].pruned_keys[0, head], keys[head][:, expected])


def test_kivi_with_residual_over_the_prompt_and_think_keeping_every_channel_equal_full(tiny):
    ids = tiny.encode(passkey_prompt(n_sentences=10, seed=2).text)
    pre = runtime.prefill(tiny, ids, window=16, needs=frozenset({"query_energy"}))
    n = ids.shape[1]
    full_tokens, full_logits = runtime.greedy_decode(tiny, kvcache.clone(pre.cache), pre.next_logits, n, 12)
    for spec, tolerance in ((f"kivi[residual={n}]", 0.0), ("think[keep=1.0]", 1e-5)):
        cache, _ = _compressed(pre, spec)
        tokens, logits = runtime.greedy_decode(tiny, cache, pre.next_logits, n, 12)
        assert tokens == full_tokens, spec
        assert max((a - b).abs().max().item() for a, b in zip(full_logits, logits)) <= tolerance, spec
    assert sum(layer.quantized_tokens() for layer in _compressed(pre, f"kivi[residual={n}]")[0].layers) == 0


@pytest.mark.parametrize("bits", [2, 4])
def test_kivi_error_stays_within_half_a_quantization_step(prefilled, bits):
    group, levels = 32, (1 << bits) - 1
    keys, values = prefilled.cache.layers[1].keys, prefilled.cache.layers[1].values
    layer = KiviLayer(keys, values, bits, group, residual=0)
    quantized = layer.quantized_tokens()
    assert quantized == prefilled.n_tokens // group * group

    def check(original, restored, reduce_dim):
        low, high = original.amin(reduce_dim, keepdim=True), original.amax(reduce_dim, keepdim=True)
        half_step = (high - low) / levels / 2
        fp16_slack = 2.0**-10 * (high - low + torch.maximum(low.abs(), high.abs())) / levels  # fp16 scale and zero
        assert ((restored - original).abs() <= half_step + fp16_slack + 1e-7).all()
        return ((restored - original).abs() / half_step.clamp_min(1e-12)).max().item()

    # keys per channel: min/max over each group of 32 tokens, per head and channel
    shape = (1, H_KV, quantized // group, group, HEAD_DIM)
    key_ratio = check(keys[..., :quantized, :].reshape(shape), layer.dequantized_keys().reshape(shape), 3)
    # values per token: min/max over each group of channels (the whole 16-channel head here) within a token
    check(values[..., :quantized, :], layer.dequantized_values(), -1)
    assert 0.5 < key_ratio <= 1.01  # the bound is reached, not loose
    assert torch.equal(layer.tail_keys, keys[..., quantized:, :])


def test_kivi_quantizes_decoded_tokens_group_by_group_keeping_the_residual(tiny, prefilled):
    cache, _ = _compressed(prefilled, "kivi[group=8,residual=16]")
    n = prefilled.n_tokens
    tokens, _ = runtime.greedy_decode(tiny, cache, prefilled.next_logits, n, 30)
    held = n + len(tokens) - 1
    for entry in cache.layers:
        assert entry.held_tokens() == held
        assert 16 <= entry.tail_keys.shape[-2] < 16 + 8
        assert entry.quantized_tokens() == (held - 16) // 8 * 8


def test_think_and_kivi_feed_several_tokens_at_once_like_one_at_a_time(tiny, prefilled):
    n = prefilled.n_tokens
    new = torch.randint(100, 20000, (1, 4), generator=torch.Generator().manual_seed(4))
    for spec, budget in (("kivi", 1.0), ("think", 1.0), ("uniform+kivi[group=16,residual=32]", 0.5), ("zigzag+think", 0.5)):
        batched, _ = _compressed(prefilled, spec, budget)
        single, _ = _compressed(prefilled, spec, budget)
        if "kivi" in spec:  # no group is flushed while the 4 tokens arrive one at a time
            assert all(e.tail_keys.shape[-2] + 4 < e.residual + e.group for e in batched.layers)
            assert all(e.quantized_tokens() > 0 for e in batched.layers)
        together = runtime.forward_tokens(tiny, batched, new, n)
        one_by_one = torch.cat([runtime.forward_tokens(tiny, single, new[:, i : i + 1], n + i) for i in range(4)])
        assert (together - one_by_one).abs().max().item() < 1e-4, spec
        assert kvcache.layer_lengths(batched) == kvcache.layer_lengths(single)


def test_compressed_layers_refuse_a_second_compression(prefilled):
    cache = kvcache.clone(prefilled.cache)
    entry = cache.layers[2]
    keep = [torch.arange(0, 300, 2), torch.arange(100, 300)]
    cache.layers[2] = kvcache.PerHeadLayer.from_dense(entry.keys, entry.values, keep)
    for spec in ("kivi", "think"):
        with pytest.raises(InputError, match=rf"{spec}: layer 2 is already compressed \(PerHeadLayer\)"):
            parse_spec(spec).compress(cache, CompressionContext(prefilled.analysis, 0.3))
    assert kvcache.is_dense(cache, 0)  # nothing was touched before the error
    for spec in ("think+kivi", "kivi+zigzag[rho=0.5]+think"):
        with pytest.raises(InputError, match="cannot be followed"):
            parse_spec(spec)
    with pytest.raises(InputError, match="'keep' must lie in"):
        parse_spec("think[keep=0]")
    with pytest.raises(InputError, match="'bits' must be one of 2, 4"):
        parse_spec("kivi[bits=3]")


def test_compare_runs_kivi_think_and_their_compositions_on_tiny(tiny):
    prompt = passkey_prompt(n_sentences=45, seed=5)
    specs = "full,kivi,think,zigzag,zigzag+kivi,zigzag+think,l2norm+kivi,uniform+think"
    result = compare(tiny, prompt.text, specs, budget=0.3, max_new_tokens=6, window=16)
    rows = {r.method: r for r in result.results}
    assert list(rows) == specs.split(",")
    for name, row in rows.items():
        if name != "full":
            assert 0 < row.kv_fraction < 1, name
    assert rows["kivi"].layer_budgets == rows["think"].layer_budgets == [result.n_tokens] * LAYERS
    for spec in ("zigzag+kivi", "zigzag+think"):
        assert rows[spec].layer_budgets == rows["zigzag"].layer_budgets
        assert rows[spec].kv_fraction < rows["zigzag"].kv_fraction  # layers hold more than the residual here
    assert min(rows["zigzag"].layer_budgets) > 128 + 32


def _tiny_gemma3():
    """A tiny Gemma 3 whose sliding layers (window 64) hold fewer tokens than the prompt."""
    import transformers

    tokenizer = _load_smollm2_tokenizer()
    config = transformers.Gemma3TextConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=2048, sliding_window=64,
        layer_types=["sliding_attention", "sliding_attention", "full_attention", "sliding_attention"],
    )
    torch.manual_seed(0)
    model = transformers.Gemma3ForCausalLM(config)
    return wrap_model("tiny-gemma3", model, tokenizer, torch.device("cpu"), use_chat_template=False)


def test_sliding_layers_keep_their_window_through_kivi_and_think():
    gemma = _tiny_gemma3()
    ids = torch.randint(100, 20000, (1, 200), generator=torch.Generator().manual_seed(3))
    pre = runtime.prefill(gemma, ids, window=16, needs=frozenset({"query_energy"}))
    full_tokens, full_logits = runtime.greedy_decode(gemma, kvcache.clone(pre.cache), pre.next_logits, 200, 12)
    for spec, tolerance in (("kivi[residual=200]", 0.0), ("think[keep=1.0]", 1e-5)):
        cache, _ = _compressed(pre, spec)
        tokens, logits = runtime.greedy_decode(gemma, cache, pre.next_logits, 200, 12)
        assert tokens == full_tokens, spec
        assert max((a - b).abs().max().item() for a, b in zip(full_logits, logits)) <= tolerance, spec
        assert kvcache.layer_lengths(cache) == [63, 63, 211, 63]
    # 0.6 of what full KV holds keeps ≈ 58 tokens per layer: 24 decoded tokens push the sliding layers past their window
    cache, report = _compressed(pre, "uniform+kivi[group=8,residual=16]", budget=0.6)
    assert report.layer_budgets.tolist() == kvcache.layer_lengths(cache)
    runtime.greedy_decode(gemma, cache, pre.next_logits, 200, 24)
    for layer in (0, 1, 3):
        assert 63 <= cache.layers[layer].held_tokens() < 63 + 8  # whole groups leave the window
    cache, _ = _compressed(pre, "zigzag+think", budget=0.6)
    runtime.greedy_decode(gemma, cache, pre.next_logits, 200, 24)
    assert [kvcache.layer_lengths(cache)[i] for i in (0, 1, 3)] == [63] * 3


@pytest.mark.slow
def test_smollm2_full_and_kivi_answer_a_passkey_and_every_method_compresses(smollm2):
    prompt = passkey_prompt(n_sentences=55, depth=0.4, seed=11)
    specs = "full,kivi,think,zigzag+kivi,zigzag+think,l2norm+kivi"
    result = compare(smollm2, prompt.text, specs, budget=0.3, max_new_tokens=10, answer=prompt.answer)
    assert result.n_tokens > 900
    for row in result.results:
        print(f"{row.method:14s} kv_fraction {row.kv_fraction:.3f} score {row.task_score} answer {row.text!r}")
        if row.method != "full":
            assert 0 < row.kv_fraction < 1, row.method
    rows = {r.method: r for r in result.results}
    assert rows["full"].task_score == 1.0
    assert rows["kivi"].task_score == 1.0, f"kivi answered {rows['kivi'].text!r}, expected {prompt.answer}"
