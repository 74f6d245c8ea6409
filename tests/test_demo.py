from dro_rl.demo import WorldConfig, make_split
from dro_rl.generator import GeneratorPrompt
from dro_rl.selector import SelectorPrompt


def test_same_seed_same_task_other_seed_other_task():
    cfg = WorldConfig(seed=5)
    assert make_split(cfg, 20, 1) == make_split(cfg, 20, 1)
    assert make_split(cfg, 20, 1) != make_split(WorldConfig(seed=6), 20, 1)
    assert make_split(cfg, 20, 1) != make_split(cfg, 20, 2)


def test_candidates_hold_the_gold_passages_and_are_distinct():
    for n in (4, 8, 12):
        for row in make_split(WorldConfig(num_candidates=n, seed=1), 50, 1):
            texts = [p["text"] for p in row["passages"]]
            assert len(texts) == n and len(set(texts)) == n
            assert sum(row["gold"]) == row["metadata"]["hops"]


def test_answers_cannot_be_read_off_the_question():
    for row in make_split(WorldConfig(seed=2), 200, 1):
        assert row["answers"][0] not in row["question"].split()


def test_two_hop_answer_passage_shares_no_word_with_the_question():
    rows = [r for r in make_split(WorldConfig(seed=2), 200, 1) if r["metadata"]["hops"] == 2]
    assert rows
    for row in rows:
        answer_passage = next(p["text"] for p, g in zip(row["passages"], row["gold"]) if g and " lives in " in p["text"])
        assert not set(answer_passage.split()) & set(row["question"].split())


def test_demo_tokenizer_covers_every_prompt(demo_rows, word_tok):
    unk = word_tok.unk_token_id
    for row in demo_rows:
        sel = SelectorPrompt(3, 32, use_chat_template=False, repeat_ids=True)(word_tok, row["question"], row["passages"])
        gen = GeneratorPrompt(32, use_chat_template=False)(word_tok, row["question"], row["passages"][:2])
        assert unk not in sel and unk not in gen
