"""Why an allocation helps or hurts: the answer's share kept per layer, from kept-token maps, and the Uncertainty
page's explanation on the tiny model (AppTest)."""

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from streamlit.testing.v1 import AppTest

from zigzag_viz.evaluation import retention
from zigzag_viz.evaluation.runner import compare
from zigzag_viz.evaluation.tasks import FAMILIES

ROOT = Path(__file__).resolve().parents[1]


def test_explanation_prompts_cycle_families_and_depths_and_hold_their_key():
    prompts = retention.explanation_prompts(6, length=300)
    assert [p.family for p in prompts] == [FAMILIES[i % len(FAMILIES)] for i in range(6)]
    assert [p.depth for p in prompts] == [0.2, 0.5, 0.8] * 2
    assert all(p.answers[0] in p.context for p in prompts)
    assert all(250 <= retention.approximate_tokens(p.text) <= 360 for p in prompts)
    assert retention.explanation_prompts(6, length=300) == prompts  # seeded


def test_answer_retention_reads_the_kept_maps_at_the_answer(tiny):
    prompt = retention.explanation_prompts(1, length=300)[0]
    comparison = compare(tiny, prompt.text, "full,zigzag,uniform", budget=0.3, max_new_tokens=3, window=8,
                         answer=prompt.answers[0])
    table = retention.answer_retention(comparison)
    positions = comparison.answer_positions
    assert positions and len(table) == 3 * tiny.num_layers
    for result in comparison.results:
        rows = table[table["method"] == result.method].sort_values("layer")
        np.testing.assert_allclose(rows["answer_kept"], result.kept_map[:, positions].mean(axis=1))
        assert list(rows["budget"]) == result.layer_budgets
    assert (table[table["method"] == "full"]["answer_kept"] == 1.0).all()


def test_mean_retention_and_the_verdict_name_the_layers_that_differ():
    first = pd.DataFrame({"method": ["zigzag"] * 3 + ["uniform"] * 3, "layer": [0, 1, 2] * 2,
                          "answer_kept": [1.0, 0.0, 0.5, 0.2, 0.6, 0.5], "budget": [30, 5, 10, 10, 10, 10]})
    second = first.assign(answer_kept=[0.8, 0.2, 0.5, 0.2, 0.8, 0.5])
    table = retention.mean_retention([first, second])
    zigzag = table[table["method"] == "zigzag"].set_index("layer")
    assert list(zigzag["answer_kept"]) == [0.9, 0.1, 0.5] and list(zigzag["prompts"]) == [2, 2, 2]
    verdict = retention.retention_verdict(table)
    assert "Over 2 prompt(s)" in verdict
    assert "loses the answer in layer(s) 1 (budget ×0.50)" in verdict and "keeps more of it in layer(s) 0 (×3.00)" in verdict
    assert "Run zigzag and uniform" in retention.retention_verdict(retention.mean_retention([]))


@pytest.mark.slow
def test_the_uncertainty_page_explains_the_allocation_on_generated_prompts():
    at = AppTest.from_file(str(ROOT / "pages" / "2_Uncertainty.py"), default_timeout=300)
    at.run()
    at.selectbox(key="model").set_value("tiny").run()
    next(b for b in at.button if b.label == "Analyze").click().run()
    at.number_input(key="explain_count").set_value(2)
    at.button(key="explain").click().run()
    assert not at.exception and not at.error, [e.value for e in at.error]
    assert any("Over 2 prompt(s), zigzag keeps" in m.value for m in at.markdown)
    titles = [chart.proto.spec for chart in at.get("plotly_chart")]
    assert any("the pass key per layer" in spec for spec in titles)
    shown = at.session_state["explanation"][3]
    assert set(shown["method"]) == {"zigzag", "uniform"} and set(shown["prompts"]) == {2}
