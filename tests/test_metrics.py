from zigzag_viz.evaluation.metrics import first_divergence, kv_fraction, task_score, token_agreement


def test_identical_sequences():
    assert first_divergence([1, 2, 3], [1, 2, 3]) is None
    assert token_agreement([1, 2, 3], [1, 2, 3]) == 1.0


def test_divergence_index_and_agreement():
    assert first_divergence([1, 2, 3, 4], [1, 2, 9, 4]) == 2
    assert token_agreement([1, 2, 3, 4], [1, 2, 9, 4]) == 0.75


def test_a_shorter_answer_diverges_where_it_stops():
    assert first_divergence([1, 2, 3], [1, 2]) == 2
    assert token_agreement([1, 2, 3], [1, 2]) == 2 / 3


def test_kv_fraction_and_task_score():
    assert kv_fraction(25, 100) == 0.25
    assert task_score("The pass key is 12345.", "12345") == 1.0
    assert task_score("The pass key is 1234.", "12345") == 0.0
    assert task_score("anything", None) is None
