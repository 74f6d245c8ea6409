"""Reward functions for the selector, with TRL's calling convention (METHOD.md §4).

Every reward is a plain callable ``reward(completions, **kwargs) -> list[float | None]``: one value per sampled
ranking, ``None`` where it does not apply. Besides the dataset's columns (``answers``, ``gold``, ...), the DRO trainer
passes what the E-step computed for each sample:

- ``answer_logprob``: log p(y | x, d_z), summed over the answer tokens (EOS included);
- ``answer_num_tokens``: the number of answer tokens;
- ``picks``: the 0-based indices of the selected passages, in order.

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


REWARDS: dict[str, RewardFunc] = {
    "likelihood": likelihood,
    "log_likelihood": log_likelihood,
    "mean_log_likelihood": mean_log_likelihood,
    "support_recall": support_recall,
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
