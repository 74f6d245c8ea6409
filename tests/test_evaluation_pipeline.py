"""The greedy evaluation pipeline and the metrics it reports, pinned down value by value (each test kills mutants
that tests/test_evaluation.py lets through; scripts/mutation_test.py)."""

import pytest
import torch
from conftest import make_model

from dro_rl import evaluation as evaluation_module
from dro_rl.evaluation import answer_recall, f1_score, reward_picks, score_picks, select_greedy, sub_exact_match
from dro_rl.generator import GeneratorPrompt, batch_answer_logprobs
from dro_rl.selector import IdGrammar, SelectorPrompt, sample_rankings


def test_f1_counts_shared_tokens_against_both_lengths():
    # "barack obama jr" vs "barack hussein obama": 2 shared tokens, precision 2/3, recall 2/3 -> F1 2/3
    assert f1_score("Barack Obama Jr", ["Barack Hussein Obama"]) == pytest.approx(2 / 3)
    # "paris france" vs "paris": precision 1/2, recall 1 -> 2/3; no shared token -> 0; no gold -> 0
    assert f1_score("Paris France", ["Paris"]) == pytest.approx(2 / 3)
    assert f1_score("Paris", ["London"]) == 0.0
    assert f1_score("Paris", []) == 0.0


def test_sub_exact_match_and_answer_recall_look_for_whole_words():
    assert sub_exact_match("It is in Paris, France.", ["paris"]) == 1.0
    assert sub_exact_match("Parisian food", ["Paris"]) == 0.0
    passages = [{"title": "France", "text": "Its capital is Paris."}, {"title": "Rome", "text": "Italy."}]
    assert answer_recall(passages, ["paris"]) == 1.0
    assert answer_recall(passages[1:], ["paris"]) == 0.0
    assert answer_recall(passages, ["", "Berlin"]) == 0.0  # an answer that normalises to nothing matches nothing


def test_greedy_selection_runs_in_eval_mode_and_restores_the_mode(word_tok, demo_rows, monkeypatch, capsys):
    model = make_model(word_tok, seed=4).train()
    seen = []
    original = evaluation_module.sample_rankings
    monkeypatch.setattr(evaluation_module, "sample_rankings",
                        lambda m, *a, **k: seen.append((m.training, k.get("greedy"))) or original(m, *a, **k))
    grammar, prompt = IdGrammar(word_tok, 4), SelectorPrompt(2, 16, use_chat_template=False)
    torch.manual_seed(0)
    picks = select_greedy(model, word_tok, grammar, prompt, demo_rows[:5], batch_size=2)
    torch.manual_seed(1)
    assert select_greedy(model, word_tok, grammar, prompt, demo_rows[:5], batch_size=2) == picks
    assert seen and all(mode == (False, True) for mode in seen) and model.training
    one = [sample_rankings(model.eval(), grammar, [prompt(word_tok, r["question"], r["passages"])], [4], 2, 1,
                           greedy=True, pad_token_id=word_tok.pad_token_id).picks[0] for r in demo_rows[:5]]
    assert picks == one
    assert capsys.readouterr().err == ""  # no progress bar unless asked


def test_scoring_runs_the_generator_in_eval_mode_and_restores_it(word_tok, demo_rows, monkeypatch):
    generator = make_model(word_tok, seed=5).train()
    modes = []
    original = evaluation_module.generate_answers
    monkeypatch.setattr(evaluation_module, "generate_answers",
                        lambda m, *a, **k: modes.append(m.training) or original(m, *a, **k))
    rows = [dict(r) for r in demo_rows[:3]]
    scores = score_picks(rows, [[0, 1]] * 3, generator, word_tok, GeneratorPrompt(8, False), 2)
    assert modes == [False] and generator.training and len(scores["predictions"]) == 3


def test_score_picks_averages_each_metric_over_the_rows(word_tok, monkeypatch):
    rows = [
        {"question": "q1", "answers": ["Paris"], "gold": [True, False, True],
         "passages": [{"title": "", "text": "paris is here"}, {"title": "", "text": "b"}, {"title": "", "text": "c"}]},
        {"question": "q2", "answers": ["Rome"], "gold": [],
         "passages": [{"title": "", "text": "a"}, {"title": "", "text": "rome"}, {"title": "", "text": "c"}]},
        {"question": "q3", "answers": ["Oslo"], "gold": [False, True, False],
         "passages": [{"title": "", "text": "a"}, {"title": "", "text": "b"}, {"title": "", "text": "c"}]},
    ]
    picks = [[0, 1], [1, 2], [0, 2]]
    prompt, prompts = GeneratorPrompt(8, use_chat_template=False), []
    monkeypatch.setattr(evaluation_module, "generate_answers",
                        lambda m, t, p, *a: prompts.extend(p) or ["paris", "the Rome city", "Bergen"])
    scores = score_picks(rows, picks, make_model(word_tok), word_tok, prompt, 4)
    assert prompts == [prompt(word_tok, r["question"], [r["passages"][i] for i in p]) for r, p in zip(rows, picks)]
    assert scores["support_recall_at_k"] == pytest.approx((1 / 2 + 0) / 2)  # rows with gold labels only
    assert scores["answer_recall_at_k"] == pytest.approx(2 / 3)  # "paris" and "rome" are in the picked passages
    assert scores["answer_em"] == pytest.approx(1 / 3)
    assert scores["answer_sub_em"] == pytest.approx(2 / 3)
    assert scores["answer_f1"] == pytest.approx((1 + 2 * (1 / 2) / (3 / 2) + 0) / 3)  # "rome city" vs "rome": 2/3
    assert score_picks([], [])["answer_recall_at_k"] is None  # no rows: no figure, not a 0.0 that reads as measured


def test_best_reward_picks_the_generator_s_likeliest_passages_one_position_at_a_time(word_tok, demo_rows):
    """Each pick against a brute-force scoring, one prompt at a time (no padding): a mix-up of rows and candidates
    in the batched scoring, a wrong argmax or a second position scored without the first would all show."""
    generator = make_model(word_tok, seed=6)
    prompt = GeneratorPrompt(8, False)
    rows = [dict(r) for r in demo_rows[:6]]
    rows[2]["passages"] = rows[2]["passages"][:3]  # rows of different N share the batches

    def score(row, chosen):
        return batch_answer_logprobs(generator, [prompt(word_tok, row["question"], [row["passages"][c] for c in chosen])],
                                     [prompt.target(word_tok, row["answers"][0])], word_tok.pad_token_id, 1).item()

    def best(row, before):
        options = [j for j in range(len(row["passages"])) if j not in before]
        return max(options, key=lambda j: score(row, before + [j]))

    one = reward_picks(rows, 1, generator, word_tok, prompt, batch_size=5)  # chunks cut across rows
    assert one == [[best(r, [])] for r in rows]
    assert any(p != [0] for p in one)  # the scores differ between passages: the check above is not vacuous
    two = reward_picks(rows, 2, generator, word_tok, prompt, batch_size=5)
    assert [p[0] for p in two] == [p[0] for p in one]
    assert [p[1] for p in two] == [best(r, p[:1]) for r, p in zip(rows, two)]
    assert [len(set(p)) for p in two] == [2] * len(rows)
    assert sorted(reward_picks(rows[2:3], 5, generator, word_tok, prompt)[0]) == [0, 1, 2]  # K > N: every passage
