"""Evaluation: answer metrics (METHOD.md §5.6) and the retrieve -> select -> generate pipeline, greedily decoded."""

from __future__ import annotations

import random
import re
import string
from collections import Counter
from typing import Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from .generator import GeneratorPrompt, generate_answers
from .selector import IdGrammar, SelectorPrompt, sample_rankings

# ---------------------------------------------------------------------------------------------------------------
# Answer metrics: SQuAD/KILT normalisation, max over gold answers, HotpotQA's yes/no rule for F1
# ---------------------------------------------------------------------------------------------------------------


def normalize_answer(text: str) -> str:
    """Lower-case, delete punctuation, drop articles (a, an, the), collapse whitespace."""
    text = text.lower()
    text = "".join(ch for ch in text if ch not in set(string.punctuation))
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def exact_match(prediction: str, golds: Sequence[str]) -> float:
    """1.0 when the normalised prediction equals any normalised gold answer."""
    return float(any(normalize_answer(prediction) == normalize_answer(g) for g in golds))


def _f1(prediction: str, gold: str) -> float:
    pred, ref = normalize_answer(prediction), normalize_answer(gold)
    if pred in ("yes", "no", "noanswer") or ref in ("yes", "no", "noanswer"):
        if pred != ref:  # HotpotQA: a yes/no answer earns F1 only when it matches exactly
            return 0.0
    p, r = pred.split(), ref.split()
    common = sum((Counter(p) & Counter(r)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(p), common / len(r)
    return 2 * precision * recall / (precision + recall)


def f1_score(prediction: str, golds: Sequence[str]) -> float:
    """Token F1 against the best-matching gold answer."""
    return max((_f1(prediction, g) for g in golds), default=0.0)


def sub_exact_match(prediction: str, golds: Sequence[str]) -> float:
    """1.0 when a normalised gold answer occurs inside the normalised prediction."""
    pred = f" {normalize_answer(prediction)} "
    return float(any(f" {normalize_answer(g)} " in pred for g in golds if normalize_answer(g)))


def answer_recall(passages: Sequence[dict], golds: Sequence[str]) -> float:
    """1.0 when a gold answer string occurs in the selected passages (the paper's selector recall)."""
    text = f" {normalize_answer(' '.join(p.get('title', '') + ' ' + p.get('text', '') for p in passages))} "
    return float(any(f" {normalize_answer(g)} " in text for g in golds if normalize_answer(g)))


def support_recall(picks: Sequence[int], gold: Sequence[bool]) -> float | None:
    """Fraction of the gold passages among ``picks``; None when the row has no gold labels."""
    positives = [i for i, g in enumerate(gold or []) if g]
    if not positives:
        return None
    return sum(i in picks for i in positives) / len(positives)


# ---------------------------------------------------------------------------------------------------------------
# The pipeline
# ---------------------------------------------------------------------------------------------------------------


def select_greedy(
    selector, tokenizer, grammar: IdGrammar, prompt: SelectorPrompt, rows: Sequence[dict], batch_size: int = 32,
    progress: bool = False,
) -> list[list[int]]:
    """The selector's greedy constrained ranking of each row's candidates (always K valid ids)."""
    picks: list[list[int]] = []
    was_training = selector.training
    selector.eval()
    for s in tqdm(range(0, len(rows), batch_size), desc="select", disable=not progress):
        batch = rows[s : s + batch_size]
        prompts = [prompt(tokenizer, r["question"], r["passages"]) for r in batch]
        out = sample_rankings(
            selector, grammar, prompts, [len(r["passages"]) for r in batch], prompt.k, 1, greedy=True,
            pad_token_id=tokenizer.pad_token_id,
        )
        picks += out.picks
    selector.train(was_training)
    return picks


def baseline_picks(rows: Sequence[dict], k: int, kind: str, seed: int = 0) -> list[list[int]]:
    """Picks of the reference strategies: ``retrieval`` (top-K in retrieval order), ``random``, ``oracle`` (gold
    passages first, then retrieval order)."""
    rng = random.Random(seed)
    out = []
    for r in rows:
        n = len(r["passages"])
        if kind == "retrieval":
            out.append(list(range(min(k, n))))
        elif kind == "random":
            out.append(rng.sample(range(n), min(k, n)))
        elif kind == "oracle":
            gold = [i for i, g in enumerate(r.get("gold") or []) if g]
            out.append((gold + [i for i in range(n) if i not in gold])[: min(k, n)])
        else:
            raise ValueError(f"unknown baseline {kind!r}")
    return out


def score_picks(
    rows: Sequence[dict], picks: Sequence[Sequence[int]], generator=None, generator_tokenizer=None,
    prompt: GeneratorPrompt | None = None, max_new_tokens: int = 16, batch_size: int = 64,
) -> dict:
    """Support and answer recall@K of the picks and, with a generator, EM / F1 / sub-EM of its greedy answers.

    Each metric is the mean of ``per_question[metric]``, one value per row (None: support recall of a row without
    gold labels, left out of the mean), kept so that intervals and paired comparisons can be drawn over questions
    (``bootstrap_interval``).
    """
    per_question: dict[str, list[float | None]] = {
        "support_recall_at_k": [support_recall(p, r.get("gold")) for p, r in zip(picks, rows)],
        "answer_recall_at_k": [answer_recall([r["passages"][i] for i in p], r["answers"]) for p, r in zip(picks, rows)],
    }
    answers = None
    if generator is not None:
        prompt = prompt or GeneratorPrompt()
        prompts = [prompt(generator_tokenizer, r["question"], [r["passages"][i] for i in p]) for r, p in zip(rows, picks)]
        was_training = generator.training
        generator.eval()
        with torch.no_grad():
            answers = generate_answers(generator, generator_tokenizer, prompts, max_new_tokens, batch_size)
        generator.train(was_training)
        for name, metric in (("answer_em", exact_match), ("answer_f1", f1_score), ("answer_sub_em", sub_exact_match)):
            per_question[name] = [metric(a, r["answers"]) for a, r in zip(answers, rows)]
    result: dict = {name: _mean(v) for name, v in per_question.items()}
    result.update(n=len(rows), per_question=per_question)
    if answers is not None:
        result["predictions"] = answers
    return result


def bootstrap_interval(
    values: Sequence[float], level: float = 0.95, resamples: int = 2000, seed: int = 0
) -> tuple[float, float] | None:
    """Percentile-bootstrap interval of the mean of per-question ``values``: questions resampled with replacement.

    None entries (rows the metric does not apply to) are left out; None when nothing is left. For a paired
    comparison of two systems on the same questions, pass the per-question differences.
    """
    x = np.asarray([v for v in values if v is not None], dtype=np.float64)
    if not len(x):
        return None
    means = x[np.random.default_rng(seed).integers(0, len(x), (resamples, len(x)))].mean(1)
    low, high = np.quantile(means, [(1 - level) / 2, (1 + level) / 2])
    return float(low), float(high)


def _mean(values: Sequence[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return sum(present) / len(present) if present else None
