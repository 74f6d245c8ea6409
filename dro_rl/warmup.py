"""Warm-up SFT before DRO (METHOD.md §6), on TRL's SFTTrainer, in exactly the prompts DRO uses.

- Selector: imitate a target ranking written in the canonical id tokens. The demo's target is the first-stage
  retriever's order, never the gold labels.
- Generator: question + passages (the gold ones where labelled, filled up to K with retrieved ones, order shuffled)
  -> answer, as the paper does.

Rows are handed to SFTTrainer already tokenised (``input_ids`` + ``completion_mask``), so the tokens it trains on are
the very ones the DRO trainer samples and scores.
"""

from __future__ import annotations

import random
from typing import Sequence

from datasets import Dataset
from trl import SFTConfig, SFTTrainer

from .generator import GeneratorPrompt
from .selector import IdGrammar, SelectorPrompt


def selector_sft_rows(
    tokenizer, grammar: IdGrammar, prompt: SelectorPrompt, rows: Sequence[dict], rankings: Sequence[Sequence[int]]
) -> list[dict]:
    """Tokenised (prompt, target ranking) pairs for the selector."""
    out = []
    for row, ranking in zip(rows, rankings):
        ids = prompt(tokenizer, row["question"], row["passages"])
        target = grammar.encode_ranking(list(ranking)[: min(prompt.k, len(row["passages"]))])
        out.append({"input_ids": ids + target, "completion_mask": [0] * len(ids) + [1] * len(target)})
    return out


def generator_sft_rows(tokenizer, prompt: GeneratorPrompt, rows: Sequence[dict], k: int, seed: int = 0) -> list[dict]:
    """Tokenised (question + gold-first passages, answer) pairs for the generator."""
    rng = random.Random(seed)
    out = []
    for row in rows:
        gold = [i for i, g in enumerate(row.get("gold") or []) if g]
        chosen = (gold + [i for i in range(len(row["passages"])) if i not in gold])[: max(k, len(gold))]
        rng.shuffle(chosen)
        ids = prompt(tokenizer, row["question"], [row["passages"][i] for i in chosen])
        target = prompt.target(tokenizer, row["answers"][0])
        out.append({"input_ids": ids + target, "completion_mask": [0] * len(ids) + [1] * len(target)})
    return out


def run_sft(model, tokenizer, rows: list[dict], args: SFTConfig) -> SFTTrainer:
    """Completion-only SFT on pre-tokenised rows; returns the trainer (its log_history holds the curve)."""
    trainer = SFTTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows), processing_class=tokenizer)
    trainer.train()
    return trainer
