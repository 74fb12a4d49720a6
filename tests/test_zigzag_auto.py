"""ZigZag calibrated per model (`rho=auto`, `signal=auto`): the choice is the candidate with the smallest mean
KL to full KV, computed the slow obvious way here; it is stored and reused from disk; it never sees an
evaluation prompt; and a fixed parameter stays fixed."""

from collections import Counter

import numpy as np
import pytest
import torch

from zigzag_viz.evaluation import tasks
from zigzag_viz.evaluation.metrics import kl_per_step
from zigzag_viz.evaluation.prompts import EXAMPLES, passkey_prompt
from zigzag_viz.evaluation.runner import Runner
from zigzag_viz.methods import CompressionContext, calibration, parse_spec
from zigzag_viz.methods import zigzag as zigzag_module
from zigzag_viz.methods.calibration import CalibrationSet, calibration_path
from zigzag_viz.pipeline import cache as kvcache
from zigzag_viz.pipeline import runtime

SMALL = CalibrationSet(prompts=2, sentences=8, seed=7000)


@pytest.fixture(autouse=True)
def fresh_calibration(tmp_path, monkeypatch):
    monkeypatch.setenv("ZIGZAG_VIZ_CACHE", str(tmp_path))
    monkeypatch.setattr(zigzag_module.ZigZag, "calibration_set", SMALL)
    monkeypatch.setattr(calibration, "computations", Counter())
    calibration.memo.clear()


def slow_mean_kl(tiny, rho: float, signal: str) -> float:
    """Mean over prompts and kept fractions of KL(full ‖ ZigZag[ρ, signal]) per step of full KV's greedy answer,
    each step decoded one token at a time through its own compressed cache."""
    values = []
    for text in SMALL.texts():
        ids = tiny.encode(text)
        pre = runtime.prefill(tiny, ids, zigzag_module.CALIBRATION_WINDOW)
        tokens, steps = runtime.greedy_decode(tiny, kvcache.clone(pre.cache), pre.next_logits, pre.n_tokens,
                                              zigzag_module.CALIBRATION_TOKENS)
        for fraction in zigzag_module.CALIBRATION_FRACTIONS:
            cache = kvcache.clone(pre.cache)
            parse_spec(f"zigzag[rho={rho},signal={signal}]").compress(cache, CompressionContext(pre.analysis, fraction))
            logits = [pre.next_logits]
            for step, token in enumerate(tokens[:-1]):
                logits.append(runtime.forward_tokens(tiny, cache, torch.tensor([[token]]), pre.n_tokens + step)[-1])
            values.append(kl_per_step(torch.stack(steps).numpy(), torch.stack(logits).numpy()).mean())
    return float(np.mean(values))


def test_the_choice_is_the_candidate_with_the_smallest_mean_kl(tiny):
    result = parse_spec("zigzag[rho=auto,signal=auto]").calibrate(tiny)
    assert set(result["kl"]) == {f"{r:g}/{s}" for r in zigzag_module.RHO_GRID for s in zigzag_module.AUTO_SIGNALS}
    best = min(result["kl"], key=result["kl"].get)
    assert best == f"{result['rho']:g}/{result['signal']}"
    for key in (best, "0.2/lmba", "0.6/hidden"):
        rho, signal = key.split("/")
        assert result["kl"][key] == pytest.approx(slow_mean_kl(tiny, float(rho), signal), rel=1e-3, abs=1e-6)


def test_a_fixed_parameter_stays_fixed_and_only_the_other_is_searched(tiny):
    method = parse_spec("zigzag[rho=0.4,signal=auto]")
    assert method.candidates() == [(0.4, s) for s in zigzag_module.AUTO_SIGNALS]
    result = method.calibrate(tiny)
    assert result["rho"] == 0.4 and result["signal"] in zigzag_module.AUTO_SIGNALS
    assert not parse_spec("zigzag[rho=0.4,signal=entropy]").automatic


def test_the_calibration_is_stored_reused_from_disk_and_drives_the_budgets(tiny):
    spec = "zigzag[rho=auto,signal=auto]"
    prompt = passkey_prompt(n_sentences=10, seed=3).text
    runner = Runner(tiny)
    row = runner.compare(runner.request(prompt, f"full,{spec}", 0.4, window=16, max_new_tokens=4)).results[1]
    assert calibration.computations["zigzag"] == 1 and calibration_path(tiny, "zigzag").exists()
    calibration.memo.clear()  # as a new process would start
    chosen = parse_spec(spec).calibrate(tiny)
    assert calibration.computations["zigzag"] == 1  # read from disk, not computed again
    fixed = f"zigzag[rho={chosen['rho']:g},signal={chosen['signal']}]"
    again = runner.compare(runner.request(prompt, f"full,{fixed}", 0.4, window=16, max_new_tokens=4)).results[1]
    assert again.layer_budgets == row.layer_budgets and again.token_ids == row.token_ids


def test_the_calibration_never_sees_an_evaluation_prompt(tiny, monkeypatch):
    seen = []
    encode = type(tiny).encode
    monkeypatch.setattr(type(tiny), "encode", lambda self, text: seen.append(text) or encode(self, text))
    for task in tasks.TASKS.values():  # the sweep's generators are never called
        monkeypatch.setattr(task, "generate", lambda *a, **k: pytest.fail("an evaluation task made a prompt"))
    parse_spec("zigzag[rho=auto]").calibrate(tiny)
    assert seen == SMALL.texts()
    assert not set(seen) & {example().text for example in EXAMPLES.values()}
