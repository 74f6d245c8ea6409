"""Warm-up SFT before DRO (Shi et al. 2025, arXiv 2505.03075), on TRL's SFTTrainer, in exactly the prompts DRO uses.

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

import datasets
from accelerate import PartialState
from datasets import Dataset
from trl import SFTConfig, SFTTrainer

from .data import DataError, iter_records
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


def warmup_config(output_dir: str, steps: int, batch_size: int, learning_rate: float, dro, **overrides) -> SFTConfig:
    """The warm-up SFT settings used before DRO: a linear learning-rate ramp over the first 20 steps (fewer in a short
    warm-up: at most two thirds of its steps, so that it always reaches ``learning_rate``), then constant; no saving;
    the device, precision and seed of the DRO run ``dro`` (a DROConfig)."""
    values = dict(
        output_dir=output_dir, max_steps=steps, per_device_train_batch_size=batch_size, learning_rate=learning_rate,
        lr_scheduler_type="constant_with_warmup", warmup_steps=min(20, 2 * steps // 3),
        logging_steps=max(1, steps // 6),
        save_strategy="no", report_to="none", bf16=dro.bf16, fp16=dro.fp16, use_cpu=dro.use_cpu,
        disable_tqdm=dro.disable_tqdm,
        activation_checkpointing=dro.gradient_checkpointing, weight_decay=0.0, seed=dro.seed, max_length=None,
    )
    values.update(overrides)
    return SFTConfig(**values)


def run_sft(model, tokenizer, rows: list[dict], args: SFTConfig) -> SFTTrainer:
    """Completion-only SFT on pre-tokenised rows; returns the trainer (its log_history holds the curve)."""
    longest = max(len(r["input_ids"]) for r in rows)
    if args.max_length is not None and longest > args.max_length:
        raise ValueError(
            f"a warm-up example has {longest} tokens, more than max_length={args.max_length}: truncation would cut "
            "its target; lower the per-passage token budget or raise max_length"
        )
    args.completion_only_loss = True
    if not PartialState().is_main_process:  # every process maps the rows: one "Building labels" bar is enough
        datasets.disable_progress_bars()
    trainer = SFTTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows), processing_class=tokenizer)
    trainer.train()
    return trainer


def selector_targets(
    rows: Sequence[dict], target: str, seed: int = 0, shuffle: bool = True, teacher: dict | None = None,
    picks: Sequence[Sequence[int]] | None = None,
) -> tuple[list[dict], list[list[int]]]:
    """(rows as presented, target rankings) for selector SFT; rows must be in retrieval order.

    ``target``: ``retrieval`` (imitate the first-stage ranking), ``gold_first`` (labelled passages, then retrieval
    order), ``teacher`` (``teacher[row id]`` = passage ids, best first, e.g. distilled from a stronger ranker) or
    ``best_reward`` (``picks[i]`` = row i's passage positions, best first: the pick DRO's reward prefers,
    ``evaluation.reward_picks``); every target continues with the remaining passages in retrieval order.
    With ``shuffle`` the candidates are presented in a random order, so that imitating a ranking takes reading the
    passages instead of copying ``[1] > [2]``.
    """
    rng = random.Random(seed)
    presented, rankings = [], []
    for index, row in enumerate(rows):
        n = len(row["passages"])
        if target == "retrieval":
            order = list(range(n))
        elif target == "gold_first":
            gold = [i for i, g in enumerate(row.get("gold") or []) if g]
            order = gold + [i for i in range(n) if i not in gold]
        elif target == "best_reward":
            if picks is None or len(picks) != len(rows):
                raise ValueError("target best_reward needs one pick per row (evaluation.reward_picks)")
            order = list(picks[index])
            order += [i for i in range(n) if i not in order]
        elif target == "teacher":
            if teacher is None or row["id"] not in teacher:
                raise ValueError(f"no teacher ranking for question id {row['id']!r}")
            position = {p.get("id", str(i)): i for i, p in enumerate(row["passages"])}
            unknown = [pid for pid in teacher[row["id"]] if pid not in position]
            if unknown:  # a ranking of other ids (ints for strings, another corpus) would teach retrieval order
                raise ValueError(f"the teacher ranking of question {row['id']!r} names passages that are not among "
                                 f"its candidates: {unknown[:5]} (its candidates' ids: {list(position)[:10]})")
            order = [position[pid] for pid in teacher[row["id"]]]
            order += [i for i in range(n) if i not in order]
        else:
            raise ValueError(f"unknown selector target {target!r}: use retrieval, gold_first, best_reward or teacher "
                             "(a ranking file, scripts/warmup_sft.py)")
        perm = list(range(n))
        if shuffle:
            rng.shuffle(perm)
        where = {original: shown for shown, original in enumerate(perm)}
        presented.append({**row, "passages": [row["passages"][i] for i in perm]})
        rankings.append([where[i] for i in order])
    return presented, rankings


def read_teacher_rankings(path: str) -> dict[str, list[str]]:
    """``{question id: passage ids, best first}`` from a JSON Lines file of ``{"id": ..., "ranking": [...]}``.

    Ids are compared as strings (JSON writes a passage id 3 and "3" alike in a ranking). A malformed line, a repeated
    question or a ranking that names a passage twice is a DataError naming the file and line: any of them would
    otherwise teach a ranking nobody wrote.
    """
    rankings: dict[str, list[str]] = {}
    for where, record in iter_records(path):
        if isinstance(record, Exception):
            raise record
        if not isinstance(record, dict) or not isinstance(record.get("id"), (str, int)):
            raise DataError(f"{where}: each line must be an object with a question 'id' and its 'ranking'")
        ranking = record.get("ranking")
        if not isinstance(ranking, list) or not ranking or not all(isinstance(x, (str, int)) for x in ranking):
            raise DataError(f"{where}: field 'ranking' must be a non-empty list of passage ids, best first")
        qid, ids = str(record["id"]), [str(x) for x in ranking]
        if qid in rankings:
            raise DataError(f"{where}: question id {qid!r} has a ranking on an earlier line already")
        if len(set(ids)) != len(ids):
            raise DataError(f"{where}: field 'ranking' names a passage more than once: {ids}")
        rankings[qid] = ids
    if not rankings:
        raise DataError(f"{path}: no rankings in the file")
    return rankings
