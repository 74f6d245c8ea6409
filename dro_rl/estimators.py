"""The DRO math, top to bottom, as pure tensor functions (README 'How DRO is implemented', docs/estimator.md).

Shapes: Q questions, m sampled rankings per question, B = Q·m rows (question-major: row q·m + j).

    E-step   w̃_i = softmax_i( log p(y | x, d_{z_i}) )                  importance_weights
             (sampled without replacement: + log ρ_i inside the softmax) priority_sample
             A_i  from w̃ or from rewards r_i, per estimator            advantages
    M-step   L_select   = − Σ_i A_i · log p(z_i | x, d; θ_s)            selector_loss
             L_generate = − Σ_i c_i · log p(y | x, d_{z_i}; θ_g)        generator_coefficients, generator_loss

Nothing here knows about the Trainer, accelerate or tokenizers; the trainer calls these functions by name.
"""

from __future__ import annotations

from typing import Literal

import torch

Estimator = Literal["dro", "dro_baseline", "reinforce", "rloo", "grpo"]
GeneratorUpdate = Literal["weighted", "uniform", "best", "none"]
ESTIMATORS: tuple[str, ...] = Estimator.__args__
WEIGHT_ESTIMATORS = ("dro", "dro_baseline")  # advantages from the importance weights (the others: from rewards)
GENERATOR_UPDATES: tuple[str, ...] = GeneratorUpdate.__args__


def priority_sample(
    logp: torch.Tensor, m: int, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """m distinct items per row, drawn without replacement from p, and their log importance ratios log ρ_i.
    [Q, N] log-probabilities (-inf for absent items) -> indices [Q, m], log ρ [Q, m]

    Adding Gumbel noise to log p and keeping the m largest keys samples m items without replacement (Gumbel-top-m,
    Kool et al., 2019). Given the (m+1)-th largest key κ, item i is in the sample with probability
    q_i = 1 − exp(−exp(log p_i − κ)), so Σ_{i∈S} ρ_i f(i) with ρ_i = p_i / q_i estimates E_p[f] without bias
    (priority sampling; Kool et al., 2020), and normalised by Σ_{i∈S} ρ_i consistently. When a row has m possible
    items or fewer, every one is drawn, κ = −∞, q_i = 1 and ρ_i = p_i: the estimate is the exact expectation; the
    slots left over repeat the first item with log ρ = −∞, so they weigh nothing.
    Why DRO wants it: sampled with replacement, a selector that becomes near-deterministic draws m equal rankings,
    whose weights are equal and whose gradient is zero — a state it cannot leave (docs/real_model.md). Distinct
    samples keep the other candidates in every E-step, weighted by how likely the policy makes them.
    """
    possible = torch.isfinite(logp).sum(-1, keepdim=True)  # [Q, 1]
    if bool((possible < 1).any()):
        raise ValueError("sampling without replacement needs at least one possible item per row")
    uniform = torch.rand(logp.shape, generator=generator, device=logp.device).clamp_min(torch.finfo(torch.float).tiny)
    keys = logp.float() - torch.log(-torch.log(uniform))  # log p + Gumbel(0, 1)
    keys = torch.nn.functional.pad(keys, (0, max(0, m + 1 - keys.shape[-1])), value=float("-inf"))
    top = keys.topk(m + 1, dim=-1)
    spare = torch.arange(m, device=logp.device) >= possible  # [Q, m]: slots past the row's possible items
    index = torch.where(spare, top.indices[:, :1], top.indices[:, :m])
    kappa = top.values[:, m:]  # −∞ when every possible item was drawn
    chosen = logp.float().gather(-1, index)
    log_q = torch.log(-torch.expm1(-torch.exp(chosen - kappa)))  # log q_i, stable for both signs of log p_i − κ
    return index, torch.where(spare, float("-inf"), chosen - log_q)


def proposal_weights(log_ratio: torch.Tensor | None, m: int) -> torch.Tensor | float:
    """ρ̃_i: the proposal's self-normalised weights of the m samples of each question, 1/m for samples drawn with
    replacement, softmax of the log ratios without (0 for spare repeats).  [Q, m] -> [Q, m]

    Σ_i ρ̃_i f(z_i) estimates the policy's expectation E_p[f], which is what a baseline or a logged mean must use."""
    return 1.0 / m if log_ratio is None else torch.softmax(log_ratio.float(), dim=-1)


def importance_weights(answer_logp: torch.Tensor, log_ratio: torch.Tensor | None = None) -> torch.Tensor:
    """Self-normalised E-step weights w̃ = softmax over the m samples of log p(y | x, d_z).  [Q, m] -> [Q, m]

    The selector's own probability cancels (docs/estimator.md), so the weight is the generator's likelihood, normalised
    per question in log space (never exponentiating raw sums). NaN and +inf scores (impossible for a log-probability)
    count as -inf; a question whose samples are all impossible gets the proposal's weights ρ̃ (uniform with
    replacement), so weights are always finite and sum to one, and dro_baseline's advantages w̃ − ρ̃ are zero there:
    no push without information.
    Samples drawn without replacement (``priority_sample``) carry their log ratios log ρ_i, which the weight then
    includes (w̃_i ∝ ρ_i · p(y | x, d_{z_i})): the proposal is no longer the policy, so its probability no longer cancels.
    """
    logits = answer_logp.float()
    if log_ratio is not None:
        logits = logits + log_ratio.float()
    logits = torch.where(torch.isnan(logits) | torch.isposinf(logits), float("-inf"), logits)
    dead = torch.isneginf(logits).all(-1, keepdim=True)  # no information: the proposal's own weights ρ̃
    logits = torch.where(dead, torch.zeros_like(logits) if log_ratio is None else log_ratio.float(), logits)
    return torch.softmax(logits, dim=-1)


def advantages(
    estimator: Estimator, weights: torch.Tensor, rewards: torch.Tensor, scale_by_std: bool = True, eps: float = 1e-4,
    log_ratio: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per-sample advantage A_i used in −Σ_i A_i log p(z_i) (docs/estimator.md).  [Q, m] -> [Q, m]

    ``dro`` and ``dro_baseline`` use the importance weights; the others use the rewards r_i. ``dro_baseline``
    subtracts the proposal's own self-normalised weights ρ̃ (1/m for samples drawn with replacement; softmax of
    ``log_ratio`` without), whose term Σ ρ̃_i ∇log p(z_i) estimates E_p[∇log p] = 0.
    """
    m = rewards.shape[-1]
    if log_ratio is not None and estimator not in WEIGHT_ESTIMATORS:
        raise ValueError(f"estimator {estimator!r} takes samples drawn with replacement; without replacement only "
                         "'dro' and 'dro_baseline' are corrected for it")
    if estimator == "dro":  # the paper, exactly
        return weights
    if estimator == "dro_baseline":  # same expected gradient (Σ w̃ = 1 and E[∇log p] = 0), lower variance
        return weights - proposal_weights(log_ratio, m)
    if estimator == "reinforce":  # no baseline
        return rewards
    if estimator == "rloo":  # leave-one-out baseline: r_i − mean_{j≠i} r_j
        if m < 2:
            return torch.zeros_like(rewards)
        return rewards - (rewards.sum(-1, keepdim=True) - rewards) / (m - 1)
    if estimator == "grpo":  # group-normalised: (r_i − mean_j r_j) / (std_j r_j + ε)
        centred = rewards - rewards.mean(-1, keepdim=True)
        if scale_by_std and m > 1:
            centred = centred / (rewards.std(-1, keepdim=True) + eps)
        return centred
    raise ValueError(f"unknown estimator {estimator!r}; choose one of {ESTIMATORS}")


def generator_coefficients(
    update: GeneratorUpdate, weights: torch.Tensor, log_ratio: torch.Tensor | None = None
) -> torch.Tensor:
    """c_i in L_generate = −Σ_i c_i log p(y | x, d_{z_i}) for each generator update option.  [Q, m] -> [Q, m]

    Samples drawn without replacement (``log_ratio``) take part in ``uniform`` unless they are spare repeats (−∞)."""
    if update == "weighted":  # the paper: w̃-weighted NLL
        return weights
    if update == "uniform":  # plain SFT on every sample
        if log_ratio is None:
            return torch.full_like(weights, 1.0 / weights.shape[-1])
        drawn = torch.isfinite(log_ratio).to(weights.dtype)
        return drawn / drawn.sum(-1, keepdim=True)
    if update == "best":  # only the highest-weight sample
        return torch.nn.functional.one_hot(weights.argmax(-1), weights.shape[-1]).to(weights.dtype)
    if update == "none":  # frozen generator
        return torch.zeros_like(weights)
    raise ValueError(f"unknown generator update {update!r}; choose one of {GENERATOR_UPDATES}")


def weighted_nll(coef: torch.Tensor, logp: torch.Tensor, m: int) -> torch.Tensor:
    """−(1/Q) Σ_q Σ_i c_qi · logp_qi over any subset of rows; Q = rows / m.  [B], [B] -> scalar

    Written per row so that a shuffled slice of the generation batch (gradient accumulation) contributes its share.
    The coefficients carry no gradient: the weights are held constant in the M-step.
    """
    return -(coef.detach() * logp).sum() * m / logp.shape[0]


def selector_loss(adv: torch.Tensor, ranking_logp: torch.Tensor, m: int) -> torch.Tensor:
    """L_select = −Σ_i A_i · log p(z_i | x, d; θ_s), averaged over questions (policy-gradient view, §2)."""
    return weighted_nll(adv, ranking_logp, m)


def generator_loss(coef: torch.Tensor, answer_logp: torch.Tensor, m: int) -> torch.Tensor:
    """L_generate = −Σ_i c_i · log p(y | x, d_{z_i}; θ_g), averaged over questions."""
    return weighted_nll(coef, answer_logp, m)


def effective_sample_size(weights: torch.Tensor) -> torch.Tensor:
    """1 / Σ_i w̃_i², per question: m when the weights are uniform, 1 when one sample takes all.  [Q, m] -> [Q]"""
    return 1.0 / (weights.float() ** 2).sum(-1)


def weight_entropy(weights: torch.Tensor) -> torch.Tensor:
    """Entropy of the weights per question, in nats.  [Q, m] -> [Q]"""
    w = weights.float()
    return -(w * torch.log(w.clamp_min(1e-30))).sum(-1)
