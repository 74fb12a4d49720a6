"""LESS: eviction plus a learned constant-size state of the evicted tokens (kernels trained on the model)."""

import json
from collections import Counter

import pytest
import torch

from zigzag_viz.pipeline import cache as kvcache
from zigzag_viz.pipeline import runtime
from zigzag_viz.evaluation.runner import compare
from zigzag_viz.methods import CompressionContext, calibration, parse_spec
from zigzag_viz.methods import less as less_module
from zigzag_viz.methods.calibration import calibration_path, key_file
from zigzag_viz.methods.less import Less, LessLayer, calibration_text, combined_attention, features
from zigzag_viz.evaluation.prompts import passkey_prompt


@pytest.fixture(autouse=True)
def fresh_calibration(tmp_path, monkeypatch):
    """Kernels go to a temporary folder and train on four short prompts (three for training, one held out);
    trainings are counted from zero."""
    monkeypatch.setenv("ZIGZAG_VIZ_CACHE", str(tmp_path))
    monkeypatch.setattr(Less, "train_seeds", range(3000, 3003))
    monkeypatch.setattr(Less, "held_out_seeds", range(3100, 3101))
    monkeypatch.setattr(calibration, "computations", Counter())


@pytest.fixture(scope="module")
def prefilled(tiny):
    return runtime.prefill(tiny, tiny.encode(passkey_prompt(n_sentences=14, seed=8).text), window=16)


def _compress(loaded, pre, spec="less", budget=0.3):
    cache = kvcache.clone(pre.cache)
    report = parse_spec(spec).compress(cache, CompressionContext(pre.analysis, budget, loaded=loaded))
    return cache, report


def test_features_are_non_negative_and_a_silent_state_is_plain_softmax():
    generator = torch.Generator().manual_seed(0)
    kernel = less_module._init_kernel(2, 8, 4, generator)
    x = torch.randn(2, 5, 8, generator=generator)
    assert (features(kernel, x) >= 0).all()
    keys, values = torch.randn(2, 7, 8, generator=generator), torch.randn(2, 7, 8, generator=generator)
    out = combined_attention(x, keys, values, torch.zeros(2, 4, 8), torch.zeros(2, 4), kernel, 0.35)
    expected = torch.softmax(torch.matmul(x, keys.transpose(-1, -2)) * 0.35, dim=-1) @ values
    assert torch.allclose(out, expected, atol=1e-6)


def test_calibration_prompts_are_varied_and_end_with_a_question():
    texts = [calibration_text(seed) for seed in range(3000, 3006)]
    assert len(set(texts)) == 6
    assert any("pass key" in t for t in texts) and any("Where did" in t for t in texts)
    assert any("Repeat it." in t for t in texts)
    assert all("\n\n" in t.strip() for t in texts)


def test_trained_kernels_beat_eviction_on_held_out_prompts_and_are_reused(tiny, prefilled):
    cache, report = _compress(tiny, prefilled)
    trained = Less().calibrate(tiny)
    assert calibration.computations["less"] == 1  # trained once for every layer, then held in memory
    manifest = calibration_path(tiny, "less")
    key = Less().calibration_key(tiny)
    assert json.loads(manifest.read_text())["entries"] == {key: {"summary": trained["summary"]}}
    assert key_file(manifest, key, ".pt").exists()
    calibration.memo.clear()  # as a new process: kernels read back from disk, equal to the trained ones
    read = Less().calibrate(tiny)
    assert calibration.computations["less"] == 1 and read["summary"] == trained["summary"]
    for side in ("q", "k"):
        for ours, theirs in zip(read[side], trained[side]):
            assert all(torch.equal(ours[name], theirs[name]) for name in ("w1", "b1", "w2", "b2"))
    summary = trained["summary"]
    assert len(summary["layers"]) == tiny.num_layers
    for layer in summary["layers"]:
        assert layer["held_out_mse"] < layer["held_out_mse_evict_only"]
    assert summary["held_out_error_ratio"] < 0.8
    assert any("held-out" in note for note in report.notes)


def test_less_layers_hold_kept_tokens_plus_a_small_state(tiny, prefilled):
    cache, report = _compress(tiny, prefilled, "less[rank=4]", budget=0.3)
    uniform, _ = _compress(tiny, prefilled, "uniform", budget=0.3)
    assert kvcache.layer_lengths(cache) == kvcache.layer_lengths(uniform) == [int(b) for b in report.layer_budgets]
    extra = 0
    for entry in cache.layers:
        assert isinstance(entry, LessLayer)
        assert entry.state.shape == (tiny.num_kv_heads, 4, entry.values.shape[-1])
        assert entry.normaliser.shape == (tiny.num_kv_heads, 4)
        extra += entry.state.numel() * 4 + entry.normaliser.numel() * 4
    assert kvcache.kv_bytes(cache) == kvcache.kv_bytes(uniform) + extra
    assert sorted(report.kept) == [0, 1, 2, 3]


def test_a_silent_state_decodes_exactly_like_its_eviction(tiny, prefilled, monkeypatch):
    real = less_module.evicted_state
    monkeypatch.setattr(less_module, "evicted_state", lambda *a: tuple(torch.zeros_like(t) for t in real(*a)))
    cache, _ = _compress(tiny, prefilled)
    uniform, _ = _compress(tiny, prefilled, "uniform")
    n = prefilled.n_tokens
    extra = torch.tensor([[500, 600, 700]])
    ours = runtime.forward_tokens(tiny, cache, extra, n)
    theirs = runtime.forward_tokens(tiny, uniform, extra, n)
    assert (ours - theirs).abs().max().item() <= 1e-4


def test_several_tokens_at_once_equal_one_at_a_time(tiny, prefilled):
    cache, _ = _compress(tiny, prefilled)
    n = prefilled.n_tokens
    extra = torch.tensor([[500, 600, 700, 800]])
    together = runtime.forward_tokens(tiny, kvcache.clone(cache), extra, n)
    stepwise_cache = kvcache.clone(cache)
    stepwise = torch.stack([runtime.forward_tokens(tiny, stepwise_cache, extra[:, i : i + 1], n + i)[0] for i in range(4)])
    assert (together - stepwise).abs().max().item() <= 1e-4


def test_budget_one_keeps_everything_and_trains_nothing(tiny, prefilled):
    result = compare(tiny, passkey_prompt(n_sentences=10, seed=4).text, "full,less", budget=1.0, max_new_tokens=6,
                     window=16)
    assert result.results[1].token_ids == result.results[0].token_ids and result.results[1].kv_fraction == 1.0
    assert calibration.computations["less"] == 0


@pytest.mark.slow
@pytest.mark.timeout(1800)  # trains the kernels on SmolLM2 first
def test_less_on_smollm2_in_both_modes(smollm2):
    prompt = passkey_prompt(n_sentences=40, depth=0.4, seed=31)
    for mode in ("aware", "context"):
        result = compare(smollm2, prompt.text, "full,uniform,less", budget=0.3, max_new_tokens=10,
                         answer=prompt.answer, mode=mode)
        full, uniform, less = result.results
        assert full.task_score == 1.0
        assert less.kv_fraction == pytest.approx(uniform.kv_fraction, abs=0.01) and less.kv_fraction > uniform.kv_fraction
        assert len(less.kl_curve) == len(full.token_ids)  # teacher-forced along the full-KV answer
        assert less.kept_map.sum(axis=1).tolist() == pytest.approx(less.layer_budgets)


def test_training_reports_progress_through_the_runner(tiny):
    from zigzag_viz.evaluation.runner import Runner

    messages = []
    runner = Runner(tiny, progress=lambda f, m: messages.append((f, m)))
    request = runner.request(passkey_prompt(n_sentences=12, seed=2).text, "less", 0.3, max_new_tokens=3, window=16)
    (row,) = runner.rows(request)
    assert any("training the kernels of layer 4/4" in m for _, m in messages)
    assert messages[-1] == (1.0, "done") and row.kv_fraction < 0.35
