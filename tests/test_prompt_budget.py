"""Real passages must all fit: per-passage truncation keeps every candidate inside the configured prompt length."""

import pytest
from test_data import SHARED, needs_shared

from dro_rl.data import load
from dro_rl.generator import GeneratorPrompt
from dro_rl.models import load_tokenizer
from dro_rl.retrieval import load_corpus
from dro_rl.selector import SelectorPrompt, truncate_to_tokens


@pytest.fixture(scope="module")
def minilm_tok():
    return load_tokenizer("minilm")


@needs_shared
def test_twenty_wikipedia_passages_fit_the_selector_prompt(minilm_tok):
    passages = load_corpus(str(SHARED / "flashrag_toy" / "sample_data.jsonl"))[:20]
    prompt = SelectorPrompt(5, max_passage_tokens=128, use_chat_template=False, max_prompt_length=1024)
    ids = prompt(minilm_tok, "who got the first nobel prize in physics?", passages)
    text = minilm_tok.decode(ids)
    assert len(ids) <= 1024
    assert all(f"[ {i + 1} ]" in text for i in range(20))  # WordPiece decodes "[3]" as "[ 3 ]"
    # and without the cap the same passages would not have fit
    assert len(SelectorPrompt(5, 128, use_chat_template=False)(minilm_tok, "q?", passages)) > 1024


@needs_shared
def test_hotpotqa_prompts_fit_with_every_candidate(minilm_tok):
    rows, _ = load(str(SHARED / "hotpotqa_dev300" / "hotpotqa_distractor_dev300.jsonl"), "hotpotqa", limit=30)
    selector = SelectorPrompt(5, 200, use_chat_template=False, max_prompt_length=512)
    generator = GeneratorPrompt(200, use_chat_template=False, max_prompt_length=256)
    for row in rows:
        ids = selector(minilm_tok, row["question"], row["passages"])
        assert len(ids) <= 512
        text = minilm_tok.decode(ids)
        assert all(f"[ {i + 1} ]" in text for i in range(len(row["passages"])))
        assert len(generator(minilm_tok, row["question"], row["passages"][:5])) <= 256


def test_too_small_a_cap_is_an_error_not_a_dropped_passage(minilm_tok):
    passages = [{"title": "", "text": "words " * 50}] * 20
    with pytest.raises(ValueError, match="no room for 20 passages"):
        SelectorPrompt(5, 64, use_chat_template=False, max_prompt_length=60)(minilm_tok, "q?", passages)


def test_the_budget_is_the_largest_that_fits(bpe_tok):
    """Under a cap, each passage gets the largest budget whose prompt fits (found here by trying every budget)."""
    passages = [{"title": "", "text": f"passage {i} about things " * 20} for i in range(5)]

    def prompt(budget, cap=None):
        return SelectorPrompt(3, budget, use_chat_template=False, max_prompt_length=cap)(bpe_tok, "q?", passages)

    overhead, full = len(prompt(0)), len(prompt(40))
    for cap in [*range(overhead + 5, full, (full - overhead) // 9), len(prompt(39)), full, full + 50]:
        fits = [b for b in range(1, 41) if len(prompt(b)) <= cap]  # never more than the configured 40
        assert prompt(40, cap) == prompt(max(fits)), cap
    with pytest.raises(ValueError, match="no room for 5 passages"):  # only an empty budget would fit
        prompt(40, overhead + 4)


def test_truncation_keeps_text_that_fits_and_cuts_by_tokens(minilm_tok):
    assert truncate_to_tokens(minilm_tok, "Paris Rome", 2) == "Paris Rome"  # fits: unchanged, not re-decoded
    assert truncate_to_tokens(minilm_tok, "Paris Rome Oslo", 2) == "paris rome"  # no [CLS] counted or decoded
    assert truncate_to_tokens(minilm_tok, "Paris Rome", 1) == "paris"
    assert truncate_to_tokens(minilm_tok, "Paris Rome", 0) == ""
