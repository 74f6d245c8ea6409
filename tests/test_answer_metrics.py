"""Answer metrics on the cases that used to score silently or wrongly: empty predictions and yes/no golds."""

import pytest
from conftest import make_model

from dro_rl.evaluation import answer_recall, exact_match, score_picks, sub_exact_match
from dro_rl.generator import GeneratorPrompt


@pytest.mark.parametrize(
    "prediction, gold, credit",
    [
        ("no", "no", 1.0),
        ("No.", "no", 1.0),
        ("No, they are not.", "no", 1.0),
        ("yes!", "yes", 1.0),
        ("no idea", "no", 0.0),          # a hedge, not an answer
        ("yes, no", "no", 0.0),          # both words
        ("yes, no", "yes", 0.0),
        ("I think no", "no", 0.0),       # does not open with the word
        ("nope", "no", 0.0),
        ("yes", "no", 0.0),
    ],
)
def test_sub_em_credits_a_yes_no_gold_only_when_the_prediction_commits_to_it(prediction, gold, credit):
    assert sub_exact_match(prediction, [gold]) == credit


def test_sub_em_for_other_golds_still_finds_the_answer_inside_the_prediction():
    assert sub_exact_match("the Beatles band", ["Beatles"]) == 1.0
    assert sub_exact_match("Beatlesque", ["Beatles"]) == 0.0


def test_answer_recall_is_undefined_for_yes_no_golds():
    passages = [{"title": "Alpha", "text": "No one knows. Yes, it was."}]
    assert answer_recall(passages, ["no"]) is None and answer_recall(passages, ["Yes"]) is None
    assert answer_recall(passages, ["yes", "Alpha"]) == 1.0  # the other golds are still searched


def test_an_empty_prediction_never_matches_a_gold_that_normalises_to_nothing():
    assert exact_match("", ["the", "Paris"]) == 0.0 and exact_match(".", ["a"]) == 0.0


def test_score_picks_counts_empty_answers_and_undefined_recall(word_tok, demo_rows):
    generator = make_model(word_tok, seed=5)
    generator.generation_config.suppress_tokens = [i for i in range(len(word_tok)) if i != word_tok.eos_token_id]
    rows = [dict(r) for r in demo_rows[:6]]
    rows[0] = {**rows[0], "answers": ["yes"]}
    picks = [[0, 1]] * len(rows)
    with pytest.warns(UserWarning, match="6 of 6 greedy answers are empty"):
        scores = score_picks(rows, picks, generator, word_tok, GeneratorPrompt(8, False), max_new_tokens=4)
    assert scores["predictions"] == [""] * 6 and scores["empty_predictions"] == 6
    assert scores["answer_em"] == 0.0 and scores["answer_sub_em"] == 0.0
    assert scores["answer_recall_undefined"] == 1
    expected = [answer_recall([r["passages"][i] for i in p], r["answers"]) for r, p in zip(rows[1:], picks[1:])]
    assert scores["answer_recall_at_k"] == pytest.approx(sum(expected) / 5)
