"""Reward functions for the selector, with TRL's calling convention (README 'Configuration').

Every reward is a plain callable ``reward(completions, **kwargs) -> list[float | None]``: one value per sampled
ranking, ``None`` where it does not apply. Besides the dataset's columns (``answers``, ``gold``, ...), the DRO trainer
passes what the E-step computed for each sample:

- ``answer_logprob``: log p(y | x, d_z), summed over the answer tokens (EOS included);
- ``answer_num_tokens``: the number of answer tokens;
- ``picks``: the 0-based indices of the selected passages, in order;
- ``generated_answer``: the generator's greedy answer for the sample — computed only when a reward declares
  ``needs_generated_answer = True`` (it costs one greedy decode per sample).

Names usable in YAML are the keys of ``REWARDS``; any other string is imported as a dotted path (``pkg.mod.func``).
"""

from __future__ import annotations

import importlib
import math
from typing import Callable

RewardFunc = Callable[..., list]


def likelihood(completions, answer_logprob, **kwargs) -> list[float]:
    """p(y | x, d_z), the paper's reward (its normalised form is the ``dro`` weights).

    >>> likelihood(["[1]"], answer_logprob=[math.log(0.25)])
    [0.25]
    """
    return [math.exp(lp) for lp in answer_logprob]


def log_likelihood(completions, answer_logprob, **kwargs) -> list[float]:
    """log p(y | x, d_z), summed over the answer tokens: the natural policy-gradient reward.

    >>> log_likelihood(["[1]", "[2]"], answer_logprob=[-1.5, -0.5])
    [-1.5, -0.5]
    """
    return [float(lp) for lp in answer_logprob]


def mean_log_likelihood(completions, answer_logprob, answer_num_tokens, **kwargs) -> list[float]:
    """(1/|y|) log p(y | x, d_z), what the released DRO scripts use (a tempered version of the paper's weights).

    >>> mean_log_likelihood(["[1]"], answer_logprob=[-3.0], answer_num_tokens=[2])
    [-1.5]
    """
    return [float(lp) / max(n, 1) for lp, n in zip(answer_logprob, answer_num_tokens)]


def support_recall(completions, picks, gold=None, **kwargs) -> list[float | None]:
    """Fraction of the gold supporting passages among the picks: an oracle diagnostic, ``None`` without labels.

    >>> support_recall(["[1] > [3]"], picks=[[0, 2]], gold=[[True, True, False]])
    [0.5]
    """
    if gold is None:
        return [None] * len(picks)
    out: list[float | None] = []
    for chosen, labels in zip(picks, gold):
        positives = [i for i, g in enumerate(labels or []) if g]
        out.append(sum(i in chosen for i in positives) / len(positives) if positives else None)
    return out


def answer_em(completions, generated_answer, answers, **kwargs) -> list[float]:
    """Exact match of the generator's greedy answer against any gold answer (SQuAD normalisation).

    >>> answer_em(["[1]", "[2]"], generated_answer=["The Beatles", "Queen"], answers=[["beatles"], ["Abba"]])
    [1.0, 0.0]
    """
    from dro_rl.evaluation import exact_match

    return [exact_match(a, golds) for a, golds in zip(generated_answer, answers)]


answer_em.needs_generated_answer = True


def answer_f1(completions, generated_answer, answers, **kwargs) -> list[float]:
    """Token F1 of the generator's greedy answer against the best-matching gold answer.

    >>> answer_f1(["[1]"], generated_answer=["Barack Obama"], answers=[["Obama"]])  # P = 1/2, R = 1
    [0.6666666666666666]
    """
    from dro_rl.evaluation import f1_score

    return [f1_score(a, golds) for a, golds in zip(generated_answer, answers)]


answer_f1.needs_generated_answer = True


class WeightedSum:
    """Σ_j weight_j · reward_j, skipping (None) a sample only where every part skips it.

    Picklable, with a fixed ``__name__`` for the metric key. Same result as several ``reward_funcs`` with
    ``reward_weights``, packed into one reward for code that takes a single function.

    >>> WeightedSum({"log_likelihood": 0.5, "mean_log_likelihood": 2.0})(
    ...     ["[1]"], answer_logprob=[-4.0], answer_num_tokens=[2])   # 0.5 * -4 + 2 * -2
    [-6.0]
    """

    def __init__(self, weights: dict[str, float]):
        self.weights = dict(weights)
        self.parts = {name: get_reward(name) for name in self.weights}
        self.needs_generated_answer = any(getattr(f, "needs_generated_answer", False) for f in self.parts.values())
        self.__name__ = "+".join(f"{w:g}*{name}" for name, w in self.weights.items())

    def __call__(self, completions, **kwargs) -> list[float | None]:
        values = [self.parts[name](completions, **kwargs) for name in self.weights]
        out: list[float | None] = []
        for per_sample in zip(*values):
            parts = [(w, v) for w, v in zip(self.weights.values(), per_sample) if v is not None]
            out.append(sum(w * v for w, v in parts) if parts else None)
        return out


REWARDS: dict[str, RewardFunc] = {
    "likelihood": likelihood,
    "log_likelihood": log_likelihood,
    "mean_log_likelihood": mean_log_likelihood,
    "support_recall": support_recall,
    "answer_em": answer_em,
    "answer_f1": answer_f1,
}


def get_reward(name: str) -> RewardFunc:
    """A reward by registered name or by dotted import path."""
    if name in REWARDS:
        return REWARDS[name]
    module, _, attr = name.rpartition(".")
    if not module:
        raise ValueError(f"unknown reward {name!r}: use one of {sorted(REWARDS)} or a dotted path pkg.module.func")
    try:
        return getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as err:
        raise ValueError(f"cannot import reward {name!r}: {err}") from err
