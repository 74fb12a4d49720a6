"""KVzip against a reference computed the slow obvious way on the tiny model: eager attention with its weights
over [prompt, instruction, prompt], the largest weight each prompt token receives from the later queries of
its KV head's group. Then the method in the pipeline: identity at 1.0 in both modes, real eviction at the asked
fraction, several tokens at once like one at a time, and the extra pass only for the methods that need it."""

import numpy as np
import pytest
import torch

from zigzag_viz.errors import InputError
from zigzag_viz.evaluation.prompts import passkey_prompt
from zigzag_viz.evaluation.runner import Runner
from zigzag_viz.methods import METHODS, CompressionContext, parse_spec
from zigzag_viz.pipeline import attention, runtime
from zigzag_viz.pipeline import cache as kvcache
from zigzag_viz.pipeline import capture

WINDOW = 16


@pytest.fixture(scope="module")
def prefilled(tiny):
    ids = tiny.encode(passkey_prompt(n_sentences=10, seed=4).text)
    return ids, runtime.prefill(tiny, ids, WINDOW, needs=frozenset({"reconstruction"}))


def slow_reconstruction(tiny, ids) -> np.ndarray:
    """(L, H_kv, n) from eager attention weights over the whole repeated sequence."""
    instruction = tiny.tokenizer(runtime.REPEAT_INSTRUCTION, add_special_tokens=False)["input_ids"]
    sequence = torch.cat([ids, torch.tensor([instruction]), ids], dim=1)
    n, group = ids.shape[1], tiny.num_query_heads // tiny.config.num_key_value_heads
    with torch.inference_mode(), attention.implementation(tiny.model, "eager"):
        weights = tiny.model(sequence, output_attentions=True, use_cache=False).attentions
    scores = []
    for layer_weights in weights:  # (1, H_q, T, T)
        later = layer_weights[0, :, n:, :n].double()  # queries after the prompt, keys of the prompt
        per_query_head = later.amax(1)  # (H_q, n)
        scores.append(per_query_head.view(-1, group, n).amax(1).numpy())
    return np.stack(scores)


def test_scores_match_eager_attention_weights_of_the_repeated_prompt(tiny, prefilled, monkeypatch):
    ids, pre = prefilled
    expected = slow_reconstruction(tiny, ids)
    assert pre.analysis.reconstruction.shape == expected.shape == (tiny.num_layers, tiny.config.num_key_value_heads,
                                                                   ids.shape[1])
    np.testing.assert_allclose(pre.analysis.reconstruction, expected, atol=2e-5)
    monkeypatch.setattr(capture, "RECONSTRUCTION_QUERY_CHUNK", 7)  # chunking changes nothing
    np.testing.assert_allclose(runtime.reconstruction_scores(tiny, ids), pre.analysis.reconstruction, atol=1e-6)


def test_the_extra_pass_runs_only_for_methods_that_need_it_and_is_timed(tiny):
    assert METHODS["kvzip"]().prefill_needs == {"reconstruction"}
    assert parse_spec("pyramid[select=kvzip]").prefill_needs == {"reconstruction"}
    runner = Runner(tiny)
    prompt = passkey_prompt(n_sentences=8, seed=1).text
    plain = runner.reference(runner.request(prompt, "full,uniform", 0.5, window=WINDOW)).pre
    assert plain.analysis.reconstruction is None
    repeated = runner.reference(runner.request(prompt, "full,kvzip", 0.5, window=WINDOW)).pre
    assert repeated.analysis.reconstruction is not None and repeated.analysis_s > plain.analysis_s


def test_a_prompt_that_cannot_be_read_twice_is_refused_with_one_line(tiny, monkeypatch):
    ids = tiny.encode(passkey_prompt(n_sentences=8, seed=2).text)
    monkeypatch.setattr(type(tiny), "max_context", property(lambda self: int(ids.shape[1]) + 5))
    with pytest.raises(InputError, match="kvzip reads the prompt twice"):
        runtime.reconstruction_scores(tiny, ids)


@pytest.mark.parametrize("mode", ["aware", "context"])
def test_kvzip_keeps_everything_at_1_and_evicts_for_real_below(tiny, mode):
    prompt = passkey_prompt(n_sentences=12, seed=5).text
    runner = Runner(tiny)
    whole = runner.compare(runner.request(prompt, "full,kvzip,zigzag[select=kvzip]", 1.0, mode, window=WINDOW,
                                          max_new_tokens=6))
    reference, *rows = whole.results
    assert all(r.token_ids == reference.token_ids and r.kl_mean <= 1e-6 for r in rows)
    kept = runner.compare(runner.request(prompt, "full,kvzip,pyramid[select=kvzip]", 0.3, mode, window=WINDOW,
                                         max_new_tokens=6))
    for row in kept.results[1:]:
        assert row.kv_fraction == pytest.approx(0.3, abs=0.01)
        assert np.allclose(row.kept_map.sum(axis=1), row.layer_budgets, atol=1e-4)


def test_kvzip_keeps_the_tokens_it_scores_highest(tiny, prefilled):
    _, pre = prefilled
    cache = kvcache.clone(pre.cache)
    report = METHODS["kvzip"]().compress(cache, CompressionContext(pre.analysis, 0.3, loaded=tiny))
    assert kvcache.kv_bytes(cache) < 0.35 * kvcache.kv_bytes(pre.cache)
    n = pre.n_tokens
    for layer, positions in report.kept.items():
        scores = pre.analysis.reconstruction[layer]  # (H_kv, n)
        for head, kept in enumerate(np.asarray(positions)):
            outside = np.setdiff1d(np.arange(n - WINDOW), kept)
            inside = np.intersect1d(kept, np.arange(n - WINDOW))
            if len(outside) and len(inside):
                assert scores[head, inside].min() >= scores[head, outside].max() - 1e-7


def test_several_tokens_through_a_kvzip_cache_equal_one_at_a_time(tiny, prefilled):
    _, pre = prefilled
    cache = kvcache.clone(pre.cache)
    METHODS["kvzip"]().compress(cache, CompressionContext(pre.analysis, 0.4, loaded=tiny))
    chunk = torch.tensor([[11, 42, 7, 19]])
    together = runtime.forward_tokens(tiny, kvcache.clone(cache), chunk, pre.n_tokens)
    one_by_one = kvcache.clone(cache)
    alone = torch.cat([runtime.forward_tokens(tiny, one_by_one, chunk[:, i:i + 1], pre.n_tokens + i) for i in range(4)])
    torch.testing.assert_close(together, alone, rtol=1e-4, atol=1e-4)
