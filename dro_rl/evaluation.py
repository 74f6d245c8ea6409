"""Evaluation: answer metrics (EM, F1, sub-EM, recall) and the retrieve -> select -> generate pipeline, greedily."""

from __future__ import annotations

import random
import re
import string
import warnings
from collections import Counter
from typing import Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from .generator import GeneratorPrompt, batch_answer_logprobs, generate_answers
from .selector import IdGrammar, SelectorPrompt, sample_rankings

# ---------------------------------------------------------------------------------------------------------------
# Answer metrics: SQuAD/KILT normalisation, max over gold answers, HotpotQA's yes/no rule for F1
#
# A gold answer that normalises to nothing (NQ-open's "A+" loses its article) never matches: otherwise every empty
# prediction would score EM 1. Rows whose golds all normalise to nothing are refused when loading (dro_rl.data).
# ---------------------------------------------------------------------------------------------------------------

YES_NO = ("yes", "no")


def normalize_answer(text: str) -> str:
    """Lower-case, delete punctuation, drop articles (a, an, the), collapse whitespace."""
    text = text.lower()
    text = "".join(ch for ch in text if ch not in set(string.punctuation))
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def _normalised_golds(golds: Sequence[str]) -> list[str]:
    return [n for n in map(normalize_answer, golds) if n]


def exact_match(prediction: str, golds: Sequence[str]) -> float:
    """1.0 when the normalised prediction equals any normalised gold answer."""
    pred = normalize_answer(prediction)
    return float(any(pred == g for g in _normalised_golds(golds)))


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


def _commits_to(prediction: str, word: str) -> bool:
    """Whether a prediction answers a yes/no question with ``word``: its normalised form is that word, or it opens
    with the word followed by punctuation (``"No, it is not."``), and the other word occurs nowhere in it."""
    words = normalize_answer(prediction).split()
    other = "no" if word == "yes" else "yes"
    if other in words:
        return False
    opening = re.match(r"\s*(\w+)\s*[,.;:!]", prediction.lower())
    return words == [word] or (opening is not None and opening.group(1) == word)


def sub_exact_match(prediction: str, golds: Sequence[str]) -> float:
    """1.0 when a normalised gold answer occurs, as whole words, inside the normalised prediction.

    A yes/no gold is matched differently, since "no idea" contains "no" and "yes, no" contains both: the prediction
    must commit to the word (:func:`_commits_to`).
    """
    pred = f" {normalize_answer(prediction)} "
    return float(any(
        _commits_to(prediction, g) if g in YES_NO else f" {g} " in pred for g in _normalised_golds(golds)
    ))


def answer_recall(passages: Sequence[dict], golds: Sequence[str]) -> float | None:
    """1.0 when a gold answer string occurs in the selected passages (the paper's selector recall).

    None (undefined) when no gold can be searched for: "yes" and "no" occur in passages by chance and say nothing
    about whether they support the answer, so yes/no golds are left out, and a row with only those has no recall.
    """
    searchable = [g for g in _normalised_golds(golds) if g not in YES_NO]
    if not searchable:
        return None
    text = f" {normalize_answer(' '.join(p.get('title', '') + ' ' + p.get('text', '') for p in passages))} "
    return float(any(f" {g} " in text for g in searchable))


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


def reward_picks(
    rows: Sequence[dict], k: int, generator, generator_tokenizer, prompt: GeneratorPrompt, batch_size: int = 64,
    progress: bool = False,
) -> list[list[int]]:
    """The K passages under which the generator gives the gold answer the highest likelihood — DRO's reward — one
    position at a time: the best single passage, then the best second one read after it, and so on (N + (N - 1) +
    ... scorings per row, not all N! / (N - K)! orderings).

    The pick a selector trained on this reward is pushed towards, so its EM is the room a selector has above
    retrieval for this generator. It reads the gold answer (the first, as the trainer's reward does): a ceiling, not
    a system. With K = 1 it is exact.
    """
    picks: list[list[int]] = [[] for _ in rows]
    was_training = generator.training
    generator.eval()
    bar = tqdm(total=sum(len(r["passages"]) - t for r in rows for t in range(min(k, len(r["passages"])))),
               desc="best reward", unit="prompt", disable=not progress)
    for _ in range(k):
        prompts, targets, owners = [], [], []
        for i, r in enumerate(rows):
            if len(picks[i]) == len(r["passages"]):
                continue
            target = prompt.target(generator_tokenizer, r["answers"][0])
            for j in range(len(r["passages"])):
                if j not in picks[i]:
                    prompts.append(prompt(generator_tokenizer, r["question"],
                                          [r["passages"][c] for c in picks[i] + [j]]))
                    targets.append(target)
                    owners.append((i, j))
        if not owners:
            break
        scores: list[float] = []
        for start in range(0, len(prompts), batch_size):
            chunk = slice(start, start + batch_size)
            scores += batch_answer_logprobs(generator, prompts[chunk], targets[chunk], generator_tokenizer.pad_token_id,
                                            batch_size).tolist()
            bar.update(len(prompts[chunk]))
        best: dict[int, tuple[float, int]] = {}
        for (i, j), score in zip(owners, scores):
            if i not in best or score > best[i][0]:  # ties: the earlier passage in retrieval order
                best[i] = (score, j)
        for i, (_, j) in best.items():
            picks[i].append(j)
    bar.close()
    generator.train(was_training)
    return picks


def score_picks(
    rows: Sequence[dict], picks: Sequence[Sequence[int]], generator=None, generator_tokenizer=None,
    prompt: GeneratorPrompt | None = None, max_new_tokens: int = 16, batch_size: int = 64, progress: bool = False,
) -> dict:
    """Support and answer recall@K of the picks and, with a generator, EM / F1 / sub-EM of its greedy answers.

    Each metric is the mean of ``per_question[metric]``, one value per row; None marks a row the metric does not
    apply to (support recall without gold labels, answer recall of a yes/no question, recall of no picks: a
    closed-book row), left out of the mean and counted (``answer_recall_undefined``). The per-question values are kept so that intervals and paired comparisons
    can be drawn over questions (``bootstrap_interval``). ``empty_predictions`` counts answers that are empty after
    normalisation (a generator that stops at once): they score 0 on every metric, and a warning says how many.
    """
    per_question: dict[str, list[float | None]] = {  # no pick (closed-book): nothing read, recall does not apply
        "support_recall_at_k": [support_recall(p, r.get("gold")) if p else None for p, r in zip(picks, rows)],
        "answer_recall_at_k": [answer_recall([r["passages"][i] for i in p], r["answers"]) if p else None
                               for p, r in zip(picks, rows)],
    }
    answers = None
    if generator is not None:
        prompt = prompt or GeneratorPrompt()
        prompts = [prompt(generator_tokenizer, r["question"], [r["passages"][i] for i in p]) for r, p in zip(rows, picks)]
        was_training = generator.training
        generator.eval()
        answers: list[str] = []
        with torch.no_grad():
            for s in tqdm(range(0, len(prompts), batch_size), desc="answer", disable=not progress):
                answers += generate_answers(generator, generator_tokenizer, prompts[s : s + batch_size],
                                            max_new_tokens, batch_size)
        generator.train(was_training)
        for name, metric in (("answer_em", exact_match), ("answer_f1", f1_score), ("answer_sub_em", sub_exact_match)):
            per_question[name] = [metric(a, r["answers"]) for a, r in zip(answers, rows)]
    result: dict = {name: defined_mean(v) for name, v in per_question.items()}
    result.update(n=len(rows), per_question=per_question,
                  answer_recall_undefined=sum(v is None for v in per_question["answer_recall_at_k"]))
    if answers is not None:
        result["empty_predictions"] = sum(not normalize_answer(a) for a in answers)
        if result["empty_predictions"]:
            warnings.warn(f"{result['empty_predictions']} of {len(answers)} greedy answers are empty after "
                          "normalisation (the generator stopped at once, or wrote only punctuation and articles); "
                          "they score 0", stacklevel=2)
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


def defined_mean(values: Sequence[float | None]) -> float | None:
    """The mean over the values that apply (None marks a question the metric does not apply to); None if none do."""
    present = [v for v in values if v is not None]
    return sum(present) / len(present) if present else None
