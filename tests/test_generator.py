import copy

import torch
from conftest import make_model

from dro_rl.generator import GeneratorPrompt, batch_answer_logprobs, generate_answers


def manual_answer_logprob(model, prompt, target):
    """One unpadded sequence at a time, full logits: the reference for the batched path."""
    ids = torch.tensor([prompt + target])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0]
    logp = torch.log_softmax(logits.float(), -1)
    return sum(logp[len(prompt) - 1 + t, tok].item() for t, tok in enumerate(target))


def test_batched_answer_loglik_matches_a_manual_loop(word_tok, demo_rows):
    model = make_model(word_tok, seed=5)
    prompt = GeneratorPrompt(max_passage_tokens=16, use_chat_template=False)
    prompts, targets = [], []
    for i, row in enumerate(demo_rows[:6]):
        prompts.append(prompt(word_tok, row["question"], row["passages"][: 1 + i % 3]))  # ragged lengths
        targets.append(prompt.target(word_tok, row["answers"][0] + " extra" * (i % 2)))
    batched = batch_answer_logprobs(model, prompts, targets, word_tok.pad_token_id, batch_size=4)
    manual = torch.tensor([manual_answer_logprob(model, p, t) for p, t in zip(prompts, targets)])
    torch.testing.assert_close(batched, manual, atol=1e-4, rtol=1e-5)


def test_answer_target_ends_with_eos(word_tok, demo_rows):
    answer = demo_rows[0]["answers"][0]
    ids = GeneratorPrompt(use_chat_template=False).target(word_tok, answer)
    assert ids[-1] == word_tok.eos_token_id and word_tok.decode(ids[:-1]).strip() == answer


def test_greedy_answers_are_deterministic_and_bounded(word_tok, demo_rows):
    model = make_model(word_tok, seed=6)
    prompt = GeneratorPrompt(use_chat_template=False)
    prompts = [prompt(word_tok, r["question"], r["passages"]) for r in demo_rows[:4]]
    first = generate_answers(model, word_tok, prompts, max_new_tokens=5)
    assert first == generate_answers(model, word_tok, prompts, max_new_tokens=5)
    assert all(len(a.split()) <= 5 for a in first)


def test_prompt_text_numbers_passages_from_one(bpe_tok):
    passages = [{"title": "", "text": "first"}, {"title": "T", "text": "second"}]
    ids = GeneratorPrompt(use_chat_template=False)(bpe_tok, "which one?", passages)
    assert bpe_tok.decode(ids) == "Passage 1: first\nPassage 2: T: second\nQuestion: which one?\nAnswer:"


def test_answer_target_follows_the_prompt_format(bpe_tok):
    """A chat prompt ends its turn, so the answer starts bare; a plain prompt ends with "Answer:", so it starts with
    a space. No special tokens either way (a BERT-style tokenizer would add [CLS]/[SEP])."""
    chat = copy.deepcopy(bpe_tok)
    chat.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    plain_ids = bpe_tok(" [3] answer", add_special_tokens=False)["input_ids"] + [bpe_tok.eos_token_id]
    bare_ids = bpe_tok("[3] answer", add_special_tokens=False)["input_ids"] + [bpe_tok.eos_token_id]
    assert plain_ids != bare_ids
    assert GeneratorPrompt(use_chat_template=True).target(chat, "[3] answer") == bare_ids
    assert GeneratorPrompt(use_chat_template=False).target(chat, "[3] answer") == plain_ids
    assert GeneratorPrompt(use_chat_template=True).target(bpe_tok, "[3] answer") == plain_ids  # no template to use


def test_answer_target_has_no_special_tokens_but_eos():
    from dro_rl.models import load_tokenizer

    tok = load_tokenizer("minilm")  # BERT-style: [CLS] ... [SEP] when special tokens are added
    ids = GeneratorPrompt(use_chat_template=False).target(tok, "paris")
    assert ids == tok(" paris", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]


def test_batched_greedy_answers_equal_one_at_a_time(word_tok, demo_rows):
    """Left padding changes nothing, and every prompt gets its answer (batches of 3 over 5 ragged prompts)."""
    model = make_model(word_tok, seed=6)
    prompt = GeneratorPrompt(max_passage_tokens=8, use_chat_template=False)
    prompts = [prompt(word_tok, r["question"], r["passages"][: 1 + i % 3]) for i, r in enumerate(demo_rows[:5])]
    batched = generate_answers(model, word_tok, prompts, max_new_tokens=4, batch_size=3)
    assert batched == [generate_answers(model, word_tok, [p], max_new_tokens=4)[0] for p in prompts]


def test_a_generator_that_stops_at_once_answers_the_empty_string(word_tok, demo_rows):
    model = make_model(word_tok, seed=6)
    with torch.no_grad():  # EOS always wins: the decoded answer must not show the EOS (or padding) text
        model.lm_head.weight.zero_()
        model.lm_head.weight[word_tok.eos_token_id] = 1.0
    prompt = GeneratorPrompt(use_chat_template=False)
    prompts = [prompt(word_tok, r["question"], r["passages"][: 1 + i]) for i, r in enumerate(demo_rows[:2])]
    assert generate_answers(model, word_tok, prompts, max_new_tokens=3) == ["", ""]
