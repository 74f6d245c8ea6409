"""The packed selector loss forward (one sequence per question: the prompt, then its completions under a block mask)
against the per-row reference: same log-probabilities and gradients, with and without gradient checkpointing, with
LoRA and with a shared base; and the trainer runs it by default, also under checkpointing."""

import pytest
import torch
from conftest import make_model
from peft import LoraConfig, get_peft_model
from test_selector import passages, sample
from tiny_run import as_dataset, tiny_config

from dro_rl import DROTrainer
from dro_rl import packed_attention
from dro_rl.models import GENERATOR, SELECTOR, enable_adapter_checkpointing, shared_base_model, use_adapter
from dro_rl.selector import (
    IdGrammar,
    SelectorPrompt,
    block_attention_mask,
    left_pad,
    pack_rows,
    ranking_logprobs_packed,
    selector_logprobs,
)

LORA = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "up_proj", "down_proj"], task_type="CAUSAL_LM",
            init_lora_weights=False)  # B random too, so every LoRA weight has a gradient at once


def scattered_rows(model, tok):
    """Rows as one micro-batch sees them after GRPO's shuffle and split: three questions of different prompt lengths,
    their rows interleaved, groups of unequal size (4, 3, 2), and completions of unequal length (a question with
    fewer candidates than K writes fewer ids)."""
    grammar = IdGrammar(tok, 12)
    prompt = SelectorPrompt(3, 16, use_chat_template=False)
    sizes = [12, 7, 2]
    prompts = [prompt(tok, q, passages(n)) for q, n in zip(("q one", "another, longer question", "third"), sizes)]
    out = sample(model, tok, grammar, prompts, sizes, 3, m=4)
    keep = torch.tensor([5, 0, 10, 1, 6, 2, 3, 9, 4])  # drops one row of question 1 and two of question 2
    p_ids, p_mask = left_pad([p for p in prompts for _ in range(4)], tok.pad_token_id)
    group = torch.arange(3).repeat_interleave(4)
    rows = [x[keep] for x in (p_ids, p_mask, group, out.completion_ids, out.completion_mask, out.allowed)]
    assert len(set(rows[4].sum(-1).tolist())) > 1  # completions of different lengths really occur
    return rows


def logprobs_and_grads(forward, model, rows, params, pad_token_id):
    logp = selector_logprobs(forward, model, *rows, 0.7, pad_token_id)
    return logp, torch.autograd.grad((logp * torch.linspace(-1, 2, len(logp))).sum(), params)


def assert_same(a, b):
    (logp_a, grads_a), (logp_b, grads_b) = a, b
    torch.testing.assert_close(logp_a, logp_b, atol=1e-5, rtol=1e-5)
    for x, y in zip(grads_a, grads_b):
        torch.testing.assert_close(x, y, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
@pytest.mark.parametrize("checkpointing", [False, True])
def test_packed_forward_equals_the_per_row_forward(bpe_tok, attention, checkpointing):
    model = make_model(bpe_tok, seed=8).train()
    model.config._attn_implementation = attention
    rows = scattered_rows(model, bpe_tok)
    params = [p for p in model.parameters()]
    reference = logprobs_and_grads("per_row", model, rows, params, bpe_tok.pad_token_id)
    if checkpointing:
        model.gradient_checkpointing_enable({"use_reentrant": False})
    packed = logprobs_and_grads("packed", model, rows, params, bpe_tok.pad_token_id)
    assert_same(packed, reference)
    if not checkpointing:
        assert_same(logprobs_and_grads("kv_cache", model, rows, params, bpe_tok.pad_token_id), reference)


def test_each_ranking_s_entropy_is_exact_and_the_same_from_every_forward(bpe_tok):
    """The entropy bonus's input: per row, the constrained distribution's entropy at each step, summed. Checked
    against each row run alone without padding (a step with one allowed id adds 0), and across the three loss
    forwards, values and gradients; asking for it leaves the log-probabilities as they were."""
    model = make_model(bpe_tok, seed=8)
    rows = scattered_rows(model, bpe_tok)
    p_ids, p_mask, _, c_ids, c_mask, allowed = rows
    expected = []
    for b in range(len(p_ids)):
        prompt, completion = p_ids[b][p_mask[b].bool()], c_ids[b][c_mask[b].bool()]
        with torch.no_grad():
            logits = model(input_ids=torch.cat([prompt, completion])[None]).logits[0, len(prompt) - 1 : -1]
        total = 0.0
        for t in range(len(completion)):
            ids = allowed[b, t][allowed[b, t] >= 0]
            p = torch.softmax(logits[t, ids].float() / 0.7, -1)
            total += float(-(p * p.log()).sum()) if len(ids) > 1 else 0.0
        expected.append(total)
    params = [p for p in model.parameters()]
    results = {}
    for forward in ("per_row", "packed", "kv_cache"):
        logp, entropy = selector_logprobs(forward, model, *rows, 0.7, bpe_tok.pad_token_id, entropy=True)
        torch.testing.assert_close(logp, selector_logprobs(forward, model, *rows, 0.7, bpe_tok.pad_token_id))
        results[forward] = entropy, torch.autograd.grad(entropy.sum(), params)
    torch.testing.assert_close(results["per_row"][0], torch.tensor(expected), atol=1e-4, rtol=1e-4)
    assert min(expected) > 0.1  # every ranking here has choices: the check is not all zeros
    for forward in ("packed", "kv_cache"):
        assert_same(results[forward], results["per_row"])


def test_packed_forward_equals_the_per_row_forward_with_lora_under_checkpointing(bpe_tok):
    torch.manual_seed(0)
    model = get_peft_model(make_model(bpe_tok, seed=8), LoraConfig(**LORA)).train()
    rows = scattered_rows(model, bpe_tok)
    params = [p for p in model.parameters() if p.requires_grad]
    reference = logprobs_and_grads("per_row", model, rows, params, bpe_tok.pad_token_id)
    model.gradient_checkpointing_enable({"use_reentrant": False})
    model.enable_input_require_grads()
    assert_same(logprobs_and_grads("packed", model, rows, params, bpe_tok.pad_token_id), reference)


def test_packed_forward_on_a_shared_base_with_adapter_checkpointing(bpe_tok):
    """The selector's packed loss and a generator loss on one base, backpropagated together through adapter-aware
    checkpointing, give the gradients of the per-row loss without checkpointing."""
    torch.manual_seed(0)
    model = shared_base_model(make_model(bpe_tok, seed=8), LoraConfig(**LORA), LoraConfig(**LORA)).train()
    model.enable_input_require_grads()
    with use_adapter(model, SELECTOR):
        rows = scattered_rows(model, bpe_tok)
    params = [p for p in model.parameters() if p.requires_grad]
    answer = torch.randint(3, len(bpe_tok), (4, 9), generator=torch.Generator().manual_seed(1))

    def both(forward):
        with use_adapter(model, SELECTOR):
            logp = selector_logprobs(forward, model, *rows, 0.7, bpe_tok.pad_token_id)
        with use_adapter(model, GENERATOR):
            gen = model(input_ids=answer).logits.logsumexp(-1).mean()
        return logp, torch.autograd.grad((logp * torch.linspace(-1, 2, len(logp))).sum() + gen, params)

    reference = both("per_row")
    enable_adapter_checkpointing(model, {"use_reentrant": False})
    assert_same(both("packed"), reference)


def test_block_mask_layout():
    """Two prompt tokens (one left pad), then two one-token-wide completion blocks: each block sees the prompt and
    itself, never the other block or padding; positions continue from the prompt's length in both blocks."""
    prompt_ids, prompt_mask = torch.tensor([[0, 7, 8]]), torch.tensor([[0, 1, 1]])
    completion_ids, completion_mask = torch.tensor([[4, 2], [5, 2]]), torch.ones(2, 2, dtype=torch.long)
    packed = pack_rows(prompt_ids.expand(2, -1), prompt_mask.expand(2, -1), torch.tensor([3, 3]), completion_ids,
                       completion_mask)
    assert packed.input_ids.tolist() == [[0, 7, 8, 4, 5]]
    assert packed.position_ids.tolist() == [[0, 0, 1, 2, 2]]
    assert packed.keep == 3 and packed.logit_index.tolist() == [[0, 1], [0, 2]]
    mask = block_attention_mask(packed.segment, packed.valid)[0, 0].int()
    assert mask.tolist() == [
        [1, 0, 0, 0, 0],  # padding sees only itself
        [0, 1, 0, 0, 0],
        [0, 1, 1, 0, 0],
        [0, 1, 1, 1, 0],  # first completion: prompt + itself
        [0, 1, 1, 0, 1],  # second completion: prompt + itself, not the first completion
    ]


def test_an_sdpa_model_runs_the_packed_prompts_causally_in_one_call_and_is_plain_sdpa_otherwise(bpe_tok, monkeypatch):
    model = make_model(bpe_tok, seed=8)
    rows = scattered_rows(model, bpe_tok)
    ids, mask = left_pad([[5, 6, 7, 8], [9, 10]], bpe_tok.pad_token_id)  # padding: the 2-D mask must still apply
    layers = len(model.model.layers)
    with torch.no_grad():
        before = model(input_ids=ids, attention_mask=mask).logits
        calls = []
        spy = packed_attention.sdpa_attention_forward
        monkeypatch.setattr(packed_attention, "sdpa_attention_forward",
                            lambda *a, **kw: calls.append((*a[1].shape[:3:2], kw.get("is_causal"))) or spy(*a, **kw))
        ranking_logprobs_packed(model, *rows, pad_token_id=bpe_tok.pad_token_id)
        assert model.config._attn_implementation == packed_attention.ATTENTION
        longest = max(rows[1][rows[2] == g][0].sum().item() for g in range(3))
        blocks = max((rows[2] == g).sum().item() for g in range(3)) * (rows[3].shape[1] - 1)
        # per layer, for the three questions at once: their prompts causal, then the blocks under the mask
        assert calls == [(3, longest, True), (3, blocks, False)] * layers
        calls.clear()
        prompts = [list(range(3, 3 + n)) for n in (9, 5)]
        sample(model, bpe_tok, IdGrammar(bpe_tok, 12), prompts, [3, 3], 2, m=2)  # the sampler's prefill, too
        assert [c for c in calls if c[2]] == [(2, 9, True)] * layers
        torch.testing.assert_close(model(input_ids=ids, attention_mask=mask).logits, before, rtol=0, atol=0)


def test_packed_forward_refuses_what_its_mask_cannot_express(bpe_tok):
    model = make_model(bpe_tok, seed=8)
    rows = scattered_rows(model, bpe_tok)
    model.config._attn_implementation = "flash_attention_2"
    with pytest.raises(ValueError, match="attn_implementation 'sdpa' or 'eager'"):
        ranking_logprobs_packed(model, *rows)
    model.config._attn_implementation = "sdpa"
    model.config.sliding_window = 16
    with pytest.raises(ValueError, match="sliding window"):
        ranking_logprobs_packed(model, *rows)
    with pytest.raises(ValueError, match="gradient checkpointing"):
        tiny_config("unused", selector_loss_forward="kv_cache", gradient_checkpointing=True)


def count_selector_tokens(trainer) -> list[int]:
    """Tokens through the selector's embeddings in each forward with grad (the loss; sampling runs without)."""
    counts = []
    trainer.model.get_input_embeddings().register_forward_hook(
        lambda module, args, out: counts.append(args[0].numel()) if torch.is_grad_enabled() else None
    )
    return counts


@pytest.mark.parametrize("checkpointing", [False, True])
def test_trainer_runs_the_packed_forward_by_default(tmp_path, demo_rows, word_tok, checkpointing):
    """The default loss forward embeds each question's prompt once, also under gradient checkpointing (where the
    KV-cache path could not run), and its first step's loss equals the per-row reference's."""
    data, losses, tokens = as_dataset(demo_rows), {}, {}
    for forward in ("per_row", None):
        overrides = {} if forward is None else {"selector_loss_forward": forward}
        args = tiny_config(str(tmp_path / str(forward)), max_steps=1, gradient_checkpointing=checkpointing,
                           **overrides)
        trainer = DROTrainer(model=make_model(word_tok), generator=make_model(word_tok, seed=100), args=args,
                             train_dataset=data, processing_class=word_tok, generator_processing_class=word_tok)
        counts = count_selector_tokens(trainer)
        trainer.train()
        losses[forward] = trainer.state.log_history[0]["selector/loss"]
        tokens[forward] = counts[0]  # the first forward with grad: the loss, before any recomputation
    assert args.selector_loss_forward == "packed"
    assert losses[None] == pytest.approx(losses["per_row"], abs=1e-6)
    # 8 rows = 2 questions x m = 4: the packed forward holds 2 prompts and 8 completions, the per-row one 8 prompts
    assert tokens[None] < 0.45 * tokens["per_row"]
