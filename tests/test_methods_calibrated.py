"""Layer-sharing, layer-merging and profiled per-head methods: KVSharer, MiniCache and BaKlaVa.

Calibrated methods use a small calibration set here (2 short prompts) and a fresh cache folder per test.
"""

import json
from collections import Counter

import numpy as np
import pytest
import torch

from zigzag_viz.pipeline import cache as kvcache
from zigzag_viz.pipeline import runtime
from zigzag_viz.evaluation.runner import compare
from zigzag_viz.errors import InputError
from zigzag_viz.methods import CompressionContext, parse_spec
from zigzag_viz.methods import calibration
from zigzag_viz.methods.baklava import BaKlaVa, head_budgets
from zigzag_viz.methods.calibration import CalibrationSet, calibration_path
from zigzag_viz.methods.kvsharer import KVSharer, SharedLayer
from zigzag_viz.methods.minicache import MergedLayer, pair_layers, slerp_directions
from zigzag_viz.evaluation.prompts import passkey_prompt

SMALL = CalibrationSet(prompts=2, sentences=8)


@pytest.fixture(autouse=True)
def fresh_calibration(tmp_path, monkeypatch):
    """Calibration files go to a temporary folder; calibration runs on two short prompts; computations are
    counted from zero."""
    monkeypatch.setenv("ZIGZAG_VIZ_CACHE", str(tmp_path))
    monkeypatch.setattr(KVSharer, "calibration_set", SMALL)
    monkeypatch.setattr(BaKlaVa, "calibration_set", SMALL)
    monkeypatch.setattr(calibration, "computations", Counter())


def _another_process():
    """Forget the calibrations held in memory, as a new process would start."""
    calibration.memo.clear()


@pytest.fixture(scope="module")
def prefilled(tiny):
    ids = tiny.encode(passkey_prompt(n_sentences=14, seed=8).text)
    return runtime.prefill(tiny, ids, window=16)


def _compress(loaded, pre, spec, budget=0.3):
    cache = kvcache.clone(pre.cache)
    context = CompressionContext(pre.analysis, budget)
    context.loaded = loaded
    report = parse_spec(spec).compress(cache, context)
    return cache, report


def _decode(loaded, pre, cache, steps=10):
    return runtime.greedy_decode(loaded, cache, pre.next_logits, pre.n_tokens, steps)[0]


# ------------------------------------------------------------------ KVSharer


def test_kvsharer_shared_layers_hold_nothing(tiny, prefilled):
    cache, report = _compress(tiny, prefilled, "kvsharer[share=0.5,threshold=-1]")
    shared = [i for i, entry in enumerate(cache.layers) if isinstance(entry, SharedLayer)]
    assert len(shared) == 2  # round(0.5·4); threshold −1 accepts every admissible pair
    full = kvcache.kv_bytes(prefilled.cache)
    assert kvcache.kv_bytes(cache) == full * (4 - len(shared)) // 4
    for layer in shared:
        entry = cache.layers[layer]
        assert list(entry.tensors()) == [] and entry.source_index < layer
        assert not isinstance(cache.layers[entry.source_index], SharedLayer)
        assert report.layer_budgets[layer] == 0
    # a shared layer attends over its source's keys, including the token just fed
    _decode(tiny, prefilled, cache, 3)
    for layer in shared:
        entry = cache.layers[layer]
        assert entry.update(None, None)[0] is cache.layers[entry.source_index].keys
        assert entry.held_tokens() == prefilled.n_tokens + 2


def test_kvsharer_calibration_is_saved_and_reused(tiny, prefilled, tmp_path):
    messages = []
    method = parse_spec("kvsharer")
    plan = method.calibrate(tiny, progress=lambda fraction, message: messages.append((fraction, message)))
    path = calibration_path(tiny, "kvsharer")
    assert path == tmp_path / "calibration" / "tiny" / "kvsharer.json"
    stored = json.loads(path.read_text())
    assert stored["model"] == "tiny" and stored["entries"] == {method.calibration_key(tiny): plan}
    assert plan["wanted"] == 1 and len(plan["pairs"]) <= 1 and plan["seconds"] > 0
    fractions = [f for f, _ in messages]
    assert fractions == sorted(fractions) and fractions[0] == 0.0 and fractions[-1] == 1.0
    assert messages[0][1] == "kvsharer: calibration prompt 1/2" and "layers share" in messages[-1][1]
    mtime = path.stat().st_mtime_ns
    assert parse_spec("kvsharer").calibrate(tiny) is plan  # the same process: from memory
    _another_process()
    heard = []
    assert parse_spec("kvsharer").calibrate(tiny, lambda f, m: heard.append((f, m))) == plan  # read from disk
    assert heard == [(1.0, f"kvsharer: calibration read from {path.parent}")]
    assert calibration.computations["kvsharer"] == 1 and path.stat().st_mtime_ns == mtime
    _compress(tiny, prefilled, "kvsharer")  # compress reuses it too
    assert calibration.computations["kvsharer"] == 1
    parse_spec("kvsharer[threshold=0.5]").calibrate(tiny)  # another parameter: another entry, same file
    assert calibration.computations["kvsharer"] == 2
    assert len(json.loads(path.read_text())["entries"]) == 2


def test_kvsharer_smaller_share_reuses_the_start_of_a_larger_plan(tiny):
    larger = parse_spec("kvsharer[share=0.5,threshold=-1]").calibrate(tiny)
    smaller = parse_spec("kvsharer[share=0.25,threshold=-1]").calibrate(tiny)
    assert calibration.computations["kvsharer"] == 1
    first = min(larger["pairs"], key=lambda p: p["order"])
    assert smaller["pairs"] == [first] and smaller["wanted"] == 1 and smaller["derived_from_share"] == 0.5
    parse_spec("kvsharer[share=0.75,threshold=-1]").calibrate(tiny)  # a larger share needs its own search
    assert calibration.computations["kvsharer"] == 2
    assert len(json.loads(calibration_path(tiny, "kvsharer").read_text())["entries"]) == 2  # derived: not stored


def test_kvsharer_needs_the_model_in_the_context(prefilled):
    cache = kvcache.clone(prefilled.cache)
    with pytest.raises(InputError, match="context.loaded"):
        parse_spec("kvsharer").compress(cache, CompressionContext(prefilled.analysis, 0.3))


# ------------------------------------------------------------------ MiniCache


def test_slerp_keeps_unit_length_and_interpolates_the_angle():
    a = torch.tensor([[3.0, 0.0]])
    b = torch.tensor([[0.0, 0.5]])
    merged, angle = slerp_directions(a, b, 0.5)
    assert torch.allclose(merged, torch.tensor([[2**-0.5, 2**-0.5]]), atol=1e-6)
    assert angle.item() == pytest.approx(np.pi / 2)
    assert torch.allclose(slerp_directions(a, b, 0.0)[0], torch.tensor([[1.0, 0.0]]), atol=1e-6)
    same, zero = slerp_directions(a, 2 * a, 0.3)
    assert torch.allclose(same, torch.tensor([[1.0, 0.0]])) and zero.item() == pytest.approx(0.0, abs=1e-3)


def test_minicache_bytes_are_the_listed_tensors_with_directions_counted_once(tiny, prefilled):
    cache, report = _compress(tiny, prefilled, "minicache[retain=0.1]")
    n = prefilled.n_tokens
    assert pair_layers(4, 0.5) == [(2, 3)]
    assert not isinstance(cache.layers[1], MergedLayer)
    first, second = cache.layers[2], cache.layers[3]
    assert isinstance(first, MergedLayer) and first.pair is second.pair
    retained = round(0.1 * n)
    heads, dim = 2, tiny.config.hidden_size // tiny.num_query_heads
    assert first.pair.retained.shape == (retained,)
    assert first.pair.key_direction.shape == (1, heads, n - retained, dim)
    assert first.key_norm.shape == (1, heads, n - retained) and first.key_kept.shape == (1, heads, retained, dim)
    per_layer_dense = 2 * heads * n * dim * 4
    shared = 2 * heads * (n - retained) * dim * 4 + retained * 8  # K and V directions, int64 indices
    own = 2 * heads * (n - retained) * 4 + 2 * heads * retained * dim * 4  # magnitudes, retained originals
    assert kvcache.kv_bytes(cache) == 2 * per_layer_dense + shared + 2 * own
    listed = sum(t.numel() * t.element_size() for entry in cache.layers for t in kvcache.layer_tensors(entry))
    assert listed - kvcache.kv_bytes(cache) == shared  # both layers list the shared tensors, counted once
    # decoded tokens go to each layer's own full-precision tail
    _decode(tiny, prefilled, cache, 4)
    assert first.tail_keys.shape[-2] == 3 and first.held_tokens() == n + 3
    assert kvcache.kv_bytes(cache) == 2 * (2 * heads * (n + 3) * dim * 4) + shared + 2 * (own + 2 * heads * 3 * dim * 4)


def test_minicache_reconstruction_keeps_magnitudes_and_retained_tokens(tiny, prefilled):
    cache, _ = _compress(tiny, prefilled, "minicache[retain=0.2]")
    original = prefilled.cache.layers[3]
    keys, values = cache.layers[3].dense()
    retained = cache.layers[3].pair.retained
    assert torch.equal(keys[:, :, retained], original.keys[:, :, retained])
    assert torch.equal(values[:, :, retained], original.values[:, :, retained])
    assert torch.allclose(keys.norm(dim=-1), original.keys.norm(dim=-1), rtol=1e-4, atol=1e-5)
    # the two layers of a pair share directions on the merged tokens
    other, _ = cache.layers[2].dense()
    merged = cache.layers[2].pair.merged_index()
    unit = lambda x: x / x.norm(dim=-1, keepdim=True)  # noqa: E731
    assert torch.allclose(unit(keys[:, :, merged]), unit(other[:, :, merged]), atol=1e-5)


# ------------------------------------------------------------------ BaKlaVa


def test_head_budgets_follow_importance_with_floor_and_bounds():
    importance = np.array([[1.0, 3.0], [0.0, 0.0], [10.0, 0.5]])
    held = np.array([100, 100, 40])
    budgets = head_budgets(importance, avg_budget=30.0, held=held, window=8, floor=0.3)
    assert budgets.sum() == round(6 * 30.0)
    assert np.all(budgets >= 8) and np.all(budgets <= held[:, None])
    assert budgets[0, 1] > budgets[0, 0] and budgets[2, 0] == 40  # capped at what the layer holds
    assert budgets[1, 0] == budgets[1, 1] == 9  # floor share: 0.3·30 = 9 tokens for a head of no importance
    even = head_budgets(importance, avg_budget=30.0, held=held, window=8, floor=1.0)
    assert even.tolist() == [[30, 30], [30, 30], [30, 30]]


def test_baklava_per_head_lengths_sum_to_the_plan(tiny, prefilled):
    method = parse_spec("baklava")
    context = CompressionContext(prefilled.analysis, 0.3)
    context.loaded = tiny
    plan = method.head_budgets(context)
    cache = kvcache.clone(prefilled.cache)
    report = method.compress(cache, context)
    n = prefilled.n_tokens
    assert plan.sum() == round(4 * 2 * 0.3 * n)
    lengths = np.array([entry.head_lengths() for entry in cache.layers])
    assert all(isinstance(entry, kvcache.PerHeadLayer) for entry in cache.layers)
    assert np.array_equal(lengths, plan)
    assert report.layer_budgets.tolist() == np.rint(plan.mean(axis=1)).astype(int).tolist()
    fraction = kvcache.kv_bytes(cache) / kvcache.kv_bytes(prefilled.cache)
    assert fraction == pytest.approx(0.3, abs=0.01)
    # every head keeps the window, in order
    window = prefilled.analysis.window
    full_keys = prefilled.cache.layers[1].keys[0]
    for head, keys in enumerate(cache.layers[1].head_keys):
        assert torch.equal(keys[-window:], full_keys[head, -window:])


def test_baklava_with_an_even_split_selects_like_uniform_snapkv(tiny, prefilled):
    even, _ = _compress(tiny, prefilled, "baklava[floor=1.0]")
    uniform, _ = _compress(tiny, prefilled, "uniform")
    for per_head, dense in zip(even.layers, uniform.layers):
        assert all(torch.equal(k, dense.keys[0, h]) for h, k in enumerate(per_head.head_keys))
    assert kvcache.kv_bytes(even) == kvcache.kv_bytes(uniform)


def test_baklava_profile_is_saved_and_reused(tiny, prefilled):
    first = parse_spec("baklava").calibrate(tiny)
    path = calibration_path(tiny, "baklava")
    mtime = path.stat().st_mtime_ns
    importance = np.asarray(first["importance"])
    assert importance.shape == (4, 2) and np.all((importance > 0) & (importance <= 1))
    _another_process()
    _compress(tiny, prefilled, "baklava[floor=0.5]")  # floor does not change the profile
    assert calibration.computations["baklava"] == 1 and path.stat().st_mtime_ns == mtime
    assert parse_spec("baklava").calibrate(tiny) == first


# ------------------------------------------------------------------ all three


@pytest.mark.parametrize("spec, budget", [("kvsharer[share=0]", 0.3), ("minicache[retain=1.0]", 0.3), ("baklava", 1.0)])
def test_keep_everything_decodes_like_full(tiny, prefilled, spec, budget):
    full = _decode(tiny, prefilled, kvcache.clone(prefilled.cache), 12)
    cache, _ = _compress(tiny, prefilled, spec, budget)
    assert _decode(tiny, prefilled, cache, 12) == full


def test_generation_through_compare_on_tiny(tiny):
    prompt = passkey_prompt(n_sentences=12, seed=5)
    sharer = "kvsharer[threshold=0.5]"  # the random tiny model cannot pass the default 0.95 check
    messages = []
    result = compare(tiny, prompt.text, f"full,{sharer},minicache,baklava,uniform+{sharer}", budget=0.3,
                     max_new_tokens=8, window=16, progress=lambda f, m: messages.append(m))
    rows = {r.method: r for r in result.results}
    for name in (sharer, "minicache", "baklava", f"uniform+{sharer}"):
        # the first token comes from the prefill, before any compression; the random model never stops early
        assert 0 < rows[name].kv_fraction < 1 and len(rows[name].token_ids) == 8
        assert rows[name].token_ids[0] == rows["full"].token_ids[0]
    # both calibrations run once, reported before the first row is decoded (baklava's included)
    first_row = next(i for i, m in enumerate(messages) if m.endswith("compress and decode"))
    assert any(m.startswith("kvsharer: calibration prompt 1/2") for m in messages[:first_row])
    assert any(m.startswith("baklava: profiling prompt 1/2") for m in messages[:first_row])
    assert calibration.computations == {"kvsharer": 1, "baklava": 1}
    assert rows["baklava"].kv_fraction == pytest.approx(0.3, abs=0.01)
    assert rows[sharer].kv_fraction == pytest.approx(0.75)  # one of four layers shares
    assert rows[f"uniform+{sharer}"].kv_fraction == pytest.approx(0.3 * 0.75, abs=0.01)


def test_layer_methods_cannot_follow_per_head_storage():
    with pytest.raises(InputError, match="no longer dense"):
        parse_spec("baklava+kvsharer")


@pytest.mark.slow
@pytest.mark.timeout(1800)  # calibrates KVSharer (every layer pair) and BaKlaVa on SmolLM2 first
def test_calibrated_and_merged_methods_run_on_smollm2(smollm2):
    prompt = passkey_prompt(n_sentences=55, depth=0.5, seed=21)
    result = compare(smollm2, prompt.text, "full,kvsharer,minicache,baklava", budget=0.3, max_new_tokens=10,
                     answer=prompt.answer)
    rows = {r.method: r for r in result.results}
    assert rows["full"].task_score == 1.0
    for name in ("kvsharer", "minicache", "baklava"):
        assert 0 < rows[name].kv_fraction < 1
    assert rows["baklava"].kv_fraction == pytest.approx(0.3, abs=0.01)
