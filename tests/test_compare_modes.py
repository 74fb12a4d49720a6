"""Side by side: aware and context modes, the kept-token map, ROUGE-L and the timing fields."""

import json

import numpy as np
import pytest

from zigzag_viz.pipeline.capture import bin_edges, bins_of
from zigzag_viz.evaluation.runner import compare
from zigzag_viz.errors import InputError
from zigzag_viz.methods import METHODS, TokenBudgetMethod
from zigzag_viz.evaluation.metrics import answer_token_positions, kept_token_map, rouge_l
from zigzag_viz.evaluation.prompts import EXAMPLES, example_prompt, passkey_prompt, split_question

TOKEN_METHODS = ["zigzag", "pyramid", "uniform", "streaming", "l2norm", "adakv", "uniform[select=hybrid]", "expected",
                 "zigzag[select=expected]"]


def test_rouge_l_comes_from_rouge_score():
    assert rouge_l("The pass key is 52445", "The pass key is 52445.") == 1.0
    assert rouge_l("The pass key is 52445", "nothing alike here") == 0.0
    assert 0.0 < rouge_l("The pass key is 52445", "The pass key is 52") < 1.0
    assert rouge_l("", "") == 1.0


def test_kept_token_map_counts_heads_and_untouched_layers():
    kept = {0: [np.array([0, 2, 4]), np.array([1, 2, 4])]}
    shares = kept_token_map(kept, held_lengths=[5, 5, 3], n_tokens=5, num_kv_heads=2)
    assert shares[0].tolist() == [0.5, 0.5, 1.0, 0.0, 1.0]
    assert shares[1].tolist() == [1.0] * 5  # not evicted: holds everything
    assert shares[2].tolist() == [0.0, 0.0, 1.0, 1.0, 1.0]  # a sliding layer holds only its last tokens


def test_answer_token_positions_and_their_bins():
    texts = ["The", " pass", " key", " is", " 52", "445", ".", " 52", "445"]
    assert answer_token_positions(texts, "52445") == [4, 5, 7, 8]
    assert answer_token_positions(texts, "99999") == [] and answer_token_positions(texts, None) == []
    edges = bin_edges(9, 3)
    assert bins_of([4, 5, 7, 8], edges) == [1, 2]


def test_split_question_takes_the_last_paragraph_or_the_given_question():
    context, question, text = split_question("Some context.\n\nMore context.\n  \nWhat is it?")
    assert (context, question, text) == ("Some context.\n\nMore context.", "What is it?", "Some context.\n\nMore context.\n  \nWhat is it?")
    context, question, text = split_question("Only context", "Which one?")
    assert (context, question, text) == ("Only context", "Which one?", "Only context\n\nWhich one?")
    with pytest.raises(InputError, match="context mode needs a question"):
        split_question("one paragraph, no question")


@pytest.mark.parametrize("mode", ["aware", "context"])
def test_everything_kept_decodes_like_full_in_both_modes(tiny, mode):
    """Every budget method in the registry, plus KIVI and ThiNK at their lossless settings."""
    prompt = passkey_prompt(n_sentences=12, seed=8).text
    budget_methods = [name for name, cls in METHODS.items() if issubclass(cls, TokenBudgetMethod)]
    assert {"zigzag", "pyramid", "uniform", "streaming", "l2norm", "adakv", "baklava"} <= set(budget_methods)
    specs = budget_methods + ["kivi[residual=4096]", "think[keep=1.0]"]
    result = compare(tiny, prompt, "full," + ",".join(specs), budget=1.0,
                     max_new_tokens=8, window=16, mode=mode)
    full, *rows = result.results
    assert result.mode == mode and all(r.mode == mode for r in result.results)
    for row in rows:
        assert row.token_ids == full.token_ids, row.method
        assert row.kl_mean <= 1e-6 and row.top1_agreement == 1.0 and row.rouge_l == 1.0


def test_context_mode_compresses_only_the_context(tiny):
    prompt = passkey_prompt(n_sentences=12, seed=8)
    aware = compare(tiny, prompt.text, "full,uniform", budget=0.3, max_new_tokens=6, window=16)
    context = compare(tiny, prompt.text, "full,uniform", budget=0.3, max_new_tokens=6, window=16, mode="context")
    question_tokens = context.n_tokens - context.n_context
    assert aware.n_context == aware.n_tokens == context.n_tokens and aware.question is None
    assert context.question == prompt.text.rsplit("\n\n", 1)[1]  # the prompt's last paragraph
    assert 10 < question_tokens < 30
    assert "".join(context.prompt_tokens[context.n_context :]).startswith(context.question)
    assert sum(context.results[1].layer_budgets) == round(4 * 0.3 * context.n_context)
    # The full-KV answer does not depend on where the question is fed (same cache, same positions).
    assert context.results[0].token_ids == aware.results[0].token_ids


@pytest.mark.parametrize("mode", ["aware", "context"])
def test_kept_map_count_per_layer_equals_the_layer_budget(tiny, mode):
    prompt = passkey_prompt(n_sentences=14, seed=9).text
    result = compare(tiny, prompt, "full," + ",".join(TOKEN_METHODS), budget=0.25, max_new_tokens=4, window=16, mode=mode)
    for row in result.results:
        assert row.kept_map.shape == (4, result.n_context)
        assert np.allclose(row.kept_map.sum(axis=1), row.layer_budgets, atol=1e-4), row.method
        assert row.kept_map[:, -16:].min() == 1.0  # the observation window is always kept
    assert result.results[0].kept_map.min() == 1.0


def test_timing_fields_and_the_whole_comparison_json(tiny):
    prompt = passkey_prompt(n_sentences=12, seed=3)
    result = compare(tiny, prompt.text, "full,zigzag,kivi", budget=0.3, max_new_tokens=5, window=16,
                     answer=prompt.answer, mode="context")
    full, zigzag, kivi = result.results
    for row in result.results:
        assert row.prefill_s > 0 and row.decode_s > 0
        assert row.ms_per_token == pytest.approx(1000 * row.decode_s / len(row.token_ids))
    assert full.analysis_s == 0.0 and full.compress_s == 0.0
    assert zigzag.analysis_s > 0 and kivi.analysis_s > 0 and zigzag.compress_s > 0
    data = json.loads(json.dumps(result.to_json()))
    assert data["mode"] == "context" and data["n_context"] == result.n_context
    assert set(data["kept_map"]["methods"]) == {"full", "zigzag", "kivi"}
    edges = data["kept_map"]["bin_edges"]
    assert edges[-1] == result.n_context and len(data["kept_map"]["bin_texts"]) == len(edges) - 1
    assert all(p < result.n_context for p in data["answer_positions"])
    # the needle states the pass key twice, and those are the tokens marked
    assert "".join(result.prompt_tokens[p] for p in data["answer_positions"]).count(prompt.answer) == 2
    for row in data["results"]:
        assert {"token_ids", "rouge_l", "prefill_s", "analysis_s", "decode_s", "ms_per_token", "mode", "kl_mean",
                "top1_agreement", "kv_bytes", "kv_fraction", "task_score", "first_divergence"} <= set(row)


def test_bad_mode_and_missing_question_are_user_errors(tiny):
    with pytest.raises(InputError, match="mode must be one of"):
        compare(tiny, "some text", "full", budget=1.0, mode="sideways")
    with pytest.raises(InputError, match="context mode needs a question"):
        compare(tiny, "a single paragraph without any question", "full", budget=1.0, mode="context")


@pytest.mark.slow
@pytest.mark.timeout(1200)  # nine decodes on SmolLM2: about 3 minutes on a busy 2-core CPU
@pytest.mark.parametrize("mode", ["aware", "context"])
def test_smollm2_both_modes_identity_and_destruction(smollm2, mode):
    prompt = example_prompt()
    keep_all = compare(smollm2, prompt.text, "full,zigzag,pyramid,uniform,streaming,l2norm,adakv", budget=1.0,
                       max_new_tokens=12, answer=prompt.answer, mode=mode)
    for row in keep_all.results:
        assert row.token_ids == keep_all.results[0].token_ids and row.kl_mean <= 1e-6 and row.top1_agreement == 1.0
    assert keep_all.results[0].task_score == 1.0
    squeezed = compare(smollm2, prompt.text, "full,uniform", budget=0.05, max_new_tokens=8, mode=mode)
    assert squeezed.results[1].kl_mean > 0


@pytest.mark.slow
def test_smollm2_kept_map_shows_where_the_needle_went(smollm2):
    """At 30 % kept, aware mode: SnapKV scoring with the question in the window keeps the pass key in most KV
    heads of some deep layers (on SmolLM2 layers 15–22) and the answer survives; recency keeps none of it."""
    prompt = example_prompt()
    result = compare(smollm2, prompt.text, "full,uniform,streaming", budget=0.3, max_new_tokens=12, answer=prompt.answer)
    assert "".join(result.prompt_tokens[p] for p in result.answer_positions).count(prompt.answer) == 2
    needle = {r.method: float(r.kept_map[:, result.answer_positions].mean()) for r in result.results}
    assert needle["full"] == 1.0
    per_layer = result.results[1].kept_map[:, result.answer_positions].mean(axis=1)
    assert per_layer.max() >= 0.5 and per_layer[: smollm2.num_layers // 3].max() < 0.5
    assert needle["streaming"] == 0.0  # recency keeps the end of the prompt; the needle sits a third of the way in
    rows = {r.method: r for r in result.results}
    assert rows["uniform"].task_score == 1.0 and rows["streaming"].task_score == 0.0


@pytest.mark.slow
@pytest.mark.parametrize("name", list(EXAMPLES))
def test_bundled_examples_are_answered_with_full_kv(smollm2, name):
    prompt = EXAMPLES[name]()
    result = compare(smollm2, prompt.text, "full", budget=1.0, max_new_tokens=24, answer=prompt.answer, mode="context")
    assert result.results[0].task_score == 1.0, result.results[0].text
