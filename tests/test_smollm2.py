"""The vertical slice on the embedded SmolLM2-135M-Instruct (real weights, offline)."""

import pytest

from zigzag_viz.evaluation.runner import compare
from zigzag_viz.evaluation.prompts import passkey_prompt

pytestmark = pytest.mark.slow


def test_full_kv_answers_a_generated_passkey_prompt(smollm2):
    prompt = passkey_prompt(n_sentences=60, depth=0.4, seed=11)
    result = compare(smollm2, prompt.text, "full", budget=1.0, max_new_tokens=16, answer=prompt.answer)
    assert result.n_tokens > 1000
    assert prompt.answer in result.results[0].text
    assert result.results[0].task_score == 1.0


def test_every_method_answers_when_the_needle_sits_in_the_kept_window(smollm2):
    prompt = passkey_prompt(n_sentences=60, depth=1.0, seed=12)
    result = compare(
        smollm2, prompt.text, "full,zigzag,pyramid,uniform", budget=0.3, max_new_tokens=16, window=64,
        answer=prompt.answer,
    )
    for row in result.results:
        assert row.task_score == 1.0, f"{row.method} answered {row.text!r}, expected {prompt.answer}"
        if row.method != "full":
            assert row.kv_fraction == pytest.approx(0.3, abs=0.01)
            assert 0 < row.kv_bytes < result.full_bytes
