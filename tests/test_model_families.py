"""Any HF causal LM family works: tiny random Llama, Qwen2, Mistral and Gemma 3 configs, plus the embedded Gemma 3."""

import numpy as np
import pytest
import torch

from zigzag_viz.evaluation.runner import compare
from zigzag_viz.pipeline.models import _load_smollm2_tokenizer, wrap_model
from zigzag_viz.evaluation.prompts import passkey_prompt

COMMON = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=2048)


def _tiny(family: str):
    import transformers

    tokenizer = _load_smollm2_tokenizer()
    vocab = dict(vocab_size=len(tokenizer))
    if family == "qwen2":
        config = transformers.Qwen2Config(**COMMON, **vocab)
        model_cls = transformers.Qwen2ForCausalLM
    elif family == "mistral":
        config = transformers.MistralConfig(**COMMON, **vocab, sliding_window=None)
        model_cls = transformers.MistralForCausalLM
    elif family == "gemma3":
        config = transformers.Gemma3TextConfig(
            **COMMON, **vocab, head_dim=16, sliding_window=64,
            layer_types=["sliding_attention", "sliding_attention", "full_attention", "sliding_attention"],
        )
        model_cls = transformers.Gemma3ForCausalLM
    else:
        config = transformers.LlamaConfig(**COMMON, **vocab)
        model_cls = transformers.LlamaForCausalLM
    torch.manual_seed(0)
    return wrap_model(f"tiny-{family}", model_cls(config), tokenizer, torch.device("cpu"), use_chat_template=False)


@pytest.fixture(scope="module", params=["llama", "qwen2", "mistral", "gemma3"])
def family_model(request):
    return _tiny(request.param)


def test_capture_is_exact_for_every_family(family_model, compare_with_eager):
    ids = torch.randint(100, 20000, (1, 200), generator=torch.Generator().manual_seed(3))
    analysis = compare_with_eager(family_model, ids, window=16)
    if family_model.name == "tiny-gemma3":
        assert analysis.layer_caps.tolist() == [63, 63, 200, 63]
    else:
        assert analysis.layer_caps.tolist() == [200] * 4


def test_compare_runs_and_shrinks_memory_for_every_family(family_model):
    prompt = passkey_prompt(n_sentences=12, seed=1).text
    result = compare(family_model, prompt, "full,zigzag,pyramid,uniform", budget=0.3, max_new_tokens=6, window=16)
    caps = result.analysis.layer_caps
    for row in result.results[1:]:
        assert sum(row.layer_budgets) == round(0.3 * caps.sum())  # a share of what full KV holds, per model
        assert all(b <= c for b, c in zip(row.layer_budgets, caps))
        # every layer has the same KV heads and head size, so bytes go as tokens held (full holds each layer's cap)
        assert row.kv_fraction == pytest.approx(sum(row.layer_budgets) / caps.sum(), rel=1e-9)
        assert row.kv_fraction == pytest.approx(0.3, abs=0.01)


@pytest.mark.slow
def test_gemma3_capture_is_exact_with_sliding_layers(compare_with_eager):
    from zigzag_viz.pipeline.models import load_model

    gemma = load_model("gemma3", "cpu")
    for sentences in (14, 55):
        ids = gemma.encode(passkey_prompt(n_sentences=sentences, seed=3).text)
        analysis = compare_with_eager(gemma, ids)
    assert ids.shape[1] > 900
    assert analysis.sliding_layers.sum() == 15 and analysis.layer_caps.max() == ids.shape[1]


@pytest.mark.slow
def test_gemma3_answers_and_keeps_sliding_layers_within_their_window():
    from zigzag_viz.pipeline.models import load_model

    gemma = load_model("gemma3", "cpu")
    prompt = passkey_prompt(n_sentences=60, depth=0.4, seed=11)
    result = compare(gemma, prompt.text, "full,zigzag,uniform", budget=0.3, max_new_tokens=16, answer=prompt.answer)
    assert result.results[0].task_score == 1.0
    sliding = result.analysis.sliding_layers
    caps = result.analysis.layer_caps
    for row in result.results[1:]:
        assert np.all(np.asarray(row.layer_budgets)[sliding] <= 511)
        assert row.kv_fraction == pytest.approx(sum(row.layer_budgets) / caps.sum(), rel=1e-9)
        assert 0 < row.kv_fraction < 1


@pytest.mark.slow
def test_on_gemma3_a_kept_fraction_is_that_share_of_the_full_cache_for_every_token_method():
    from zigzag_viz.pipeline.models import load_model

    gemma = load_model("gemma3", "cpu")
    prompt = passkey_prompt(n_sentences=60, depth=0.5, seed=12)
    methods = "full,zigzag,pyramid,uniform,streaming,l2norm,adakv,uniform[select=hybrid]"
    result = compare(gemma, prompt.text, methods, budget=0.35, max_new_tokens=4)
    assert result.n_tokens > 1000 and result.analysis.sliding_layers.sum() == 15
    for row in result.results[1:]:
        assert row.kv_fraction == pytest.approx(0.35, abs=0.01), row.method
