import pytest

from dro_rl.evaluation import (
    baseline_picks,
    exact_match,
    f1_score,
    normalize_answer,
    support_recall,
)


@pytest.mark.parametrize(
    "raw, normal",
    [
        ("The  Eiffel Tower!", "eiffel tower"),
        ("an apple, a pear", "apple pear"),
        ("Café  Müller", "café müller"),  # unicode letters survive
        ("", ""),
    ],
)
def test_normalisation_is_squad_kilt(raw, normal):
    assert normalize_answer(raw) == normal


def test_exact_match_takes_the_best_gold():
    assert exact_match("the Beatles", ["Rolling Stones", "Beatles"]) == 1.0
    assert exact_match("Beatles band", ["Beatles"]) == 0.0


def test_f1_partial_overlap_and_max_over_golds():
    # "barack obama" vs "obama": precision 1/2, recall 1 -> F1 = 2/3
    assert f1_score("Barack Obama", ["Obama"]) == pytest.approx(2 / 3)
    assert f1_score("Barack Obama", ["Obama", "Barack Obama"]) == 1.0


def test_yes_no_answers_earn_f1_only_when_exact():
    assert f1_score("yes it is", ["yes"]) == 0.0
    assert f1_score("no", ["no"]) == 1.0


def test_support_recall_and_baselines():
    gold = [False, True, False, True]
    assert support_recall([1, 2], gold) == 0.5
    assert support_recall([1], []) is None
    rows = [{"passages": [{}] * 4, "gold": gold}]
    assert baseline_picks(rows, 2, "retrieval") == [[0, 1]]
    assert baseline_picks(rows, 3, "oracle") == [[1, 3, 0]]
    assert len(set(baseline_picks(rows, 3, "random")[0])) == 3
