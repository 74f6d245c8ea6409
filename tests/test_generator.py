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
