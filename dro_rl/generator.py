"""The generator: reads the question and the K selected passages in selector order, and answers.

Its teacher-forced log-likelihood of the gold answer, log p(y | x, d_z), is both the E-step's importance weight and the
reward of the selector (docs/estimator.md), and its weighted negative is the generator's own loss.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from torch import nn

from .selector import (
    apply_template,
    fit_to_length,
    left_pad,
    passage_text,
    positions,
    right_pad,
    truncate_to_tokens,
)


@dataclass(frozen=True)
class GeneratorPrompt:
    """Question + the selected passages in the order the selector ranked them; the answer target ends with EOS.

    Passages are cut to ``max_passage_tokens`` each, fewer when ``max_prompt_length`` requires.
    """

    max_passage_tokens: int = 128
    use_chat_template: bool = True
    max_prompt_length: int | None = None

    def __call__(self, tokenizer, question: str, passages: Sequence[dict]) -> list[int]:
        def build(budget: int) -> list[int]:
            lines = [
                f"Passage {t + 1}: {truncate_to_tokens(tokenizer, passage_text(p), budget)}"
                for t, p in enumerate(passages)
            ]
            lines += [f"Question: {question}", "Answer:"]
            return apply_template(tokenizer, "\n".join(lines), self.use_chat_template)

        return fit_to_length(build, len(passages), self.max_passage_tokens, self.max_prompt_length, "generator")

    def target(self, tokenizer, answer: str) -> list[int]:
        """Answer ids then EOS, so the greedy answer knows where to stop."""
        chat = self.use_chat_template and tokenizer.chat_template is not None
        return tokenizer(answer if chat else " " + answer, add_special_tokens=False)["input_ids"] + [
            tokenizer.eos_token_id
        ]


def target_logprobs(
    model: nn.Module,
    prompt_ids: torch.Tensor,
    prompt_mask: torch.Tensor,
    target_ids: torch.Tensor,
    target_mask: torch.Tensor,
) -> torch.Tensor:
    """Per-token log p(target_t | prompt, target_<t), zero on padding.  [B, T]

    Prompts are left-padded and targets right-padded, so only the last T + 1 positions' logits are materialised.
    """
    ids = torch.cat([prompt_ids, target_ids], 1)
    mask = torch.cat([prompt_mask, target_mask], 1)
    t = target_ids.shape[1]
    logits = model(input_ids=ids, attention_mask=mask, position_ids=positions(mask), logits_to_keep=t + 1).logits
    logp = torch.log_softmax(logits[:, :-1].float(), -1).gather(-1, target_ids.unsqueeze(-1)).squeeze(-1)
    return logp * target_mask


def batch_answer_logprobs(
    model: nn.Module,
    prompts: Sequence[Sequence[int]],
    targets: Sequence[Sequence[int]],
    pad_token_id: int,
    batch_size: int = 64,
) -> torch.Tensor:
    """log p(y | x, d_z) summed over answer tokens, in chunks of ``batch_size``.  [B]  (no grad)"""
    device = next(model.parameters()).device
    out = []
    with torch.no_grad():
        for s in range(0, len(prompts), batch_size):
            p, pm = left_pad(prompts[s : s + batch_size], pad_token_id, device)
            y, ym = right_pad(targets[s : s + batch_size], pad_token_id, device)
            out.append(target_logprobs(model, p, pm, y, ym).sum(-1))
    return torch.cat(out)


@torch.no_grad()
def generate_answers(
    model: nn.Module,
    tokenizer,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int = 16,
    batch_size: int = 64,
) -> list[str]:
    """Greedy answers (evaluation decodes greedily, so results do not vary run to run)."""
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    answers: list[str] = []
    for s in range(0, len(prompts), batch_size):
        ids, mask = left_pad(prompts[s : s + batch_size], pad, device)
        out = model.generate(
            input_ids=ids,
            attention_mask=mask,
            do_sample=False,
            max_new_tokens=max_new_tokens,
            pad_token_id=pad,
            eos_token_id=tokenizer.eos_token_id,
        )
        answers += [a.strip() for a in tokenizer.batch_decode(out[:, ids.shape[1] :], skip_special_tokens=True)]
    return answers
