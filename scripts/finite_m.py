"""How far the DRO selector gradient is from the true gradient at finite m, by exact enumeration (docs/estimator.md).

    python scripts/finite_m.py            # the table in docs/estimator.md, in ~1 s
    python scripts/finite_m.py --without_replacement true     # m = 2 of 3 drawn without replacement, sampled (~19 s)

The policy is a categorical over three rankings z with logits θ; log p(y | x, d_z) is fixed per ranking. The true
gradient of the marginal likelihood's loss is ∇θ −log Σ_z p(z | x; θ) p(y | x, d_z) = −E_{p(z | x, y)}[∇ log p(z | x)].
The DRO selector loss on m samples is −Σ_i A_i log p(z_i | x) with the shipped ``importance_weights``,
``advantages`` and ``selector_loss``; its expectation over all 3^m sample tuples is summed exactly, without sampling.
Self-normalised importance weighting is consistent (it converges to the true gradient as m grows), not unbiased.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

import torch

from dro_rl import estimators as E
from dro_rl.parser import DROParser

THETA = (0.3, -0.2, 0.5)  # the selector's logits over three rankings
ANSWER_LOGP = (-0.5, -2.0, -1.0)  # log p(y | x, d_z) of each ranking


@dataclass
class FiniteMArguments:
    ms: list[int] = field(default_factory=lambda: [1, 2, 4, 8], metadata={"help": "Samples per question to tabulate."})
    estimators: list[str] = field(default_factory=lambda: ["dro", "dro_baseline"],
                                  metadata={"help": "Weight-based estimators to compare (dro, dro_baseline)."})
    without_replacement: bool = field(
        default=False, metadata={"help": "The m < 3 rankings drawn without replacement (priority sampling): its "
                                 "expectation is estimated from --draws sampled tuples instead of enumerated."})
    draws: int = field(default=400_000, metadata={"help": "Sampled m-tuples per row with --without_replacement."})


def true_gradient(theta: torch.Tensor, answer_logp: torch.Tensor) -> torch.Tensor:
    """∇θ −log Σ_z softmax(θ)_z · p(y | z).  [3]"""
    theta = theta.detach().requires_grad_(True)
    loss = -torch.logsumexp(torch.log_softmax(theta, 0) + answer_logp, 0)
    return torch.autograd.grad(loss, theta)[0]


def expected_gradient(theta: torch.Tensor, answer_logp: torch.Tensor, m: int, estimator: str):
    """(E[g], E‖g − E g‖²) of the selector-loss gradient g over every m-tuple of samples, weighted by its probability.

    All 3^m tuples are scored as one batch of "questions": importance weights and advantages per tuple, and one
    ``selector_loss`` whose gradient is the expectation (each tuple's advantages scaled by T · p(tuple), because the
    loss averages over questions). The variance uses the closed form ∇θ log softmax(θ)_z = e_z − softmax(θ).
    """
    theta = theta.detach().requires_grad_(True)
    tuples = torch.tensor(list(itertools.product(range(len(answer_logp)), repeat=m)))  # [T, m]
    logp = torch.log_softmax(theta, 0)
    prob = logp[tuples].sum(-1).exp().detach()  # [T]
    weights = E.importance_weights(answer_logp[tuples])  # [T, m]
    adv = E.advantages(estimator, weights, torch.zeros_like(weights)).double()  # [T, m]
    loss = E.selector_loss((adv * prob[:, None] * len(tuples)).reshape(-1), logp[tuples].reshape(-1), m)
    mean = torch.autograd.grad(loss, theta)[0]
    onehot = torch.nn.functional.one_hot(tuples, len(answer_logp)).double()  # [T, m, 3]
    per_tuple = -(adv[..., None] * (onehot - logp.exp().detach())).sum(1)  # [T, 3]
    variance = (prob * ((per_tuple - mean) ** 2).sum(-1)).sum()
    return mean, variance.item()


def finite_m_rows(ms: list[int], estimators: list[str]) -> list[dict]:
    """One row per (estimator, m): size ‖E g‖ / ‖∇‖, cosine to the true gradient, and the variance of g."""
    theta = torch.tensor(THETA, dtype=torch.float64)
    answer_logp = torch.tensor(ANSWER_LOGP, dtype=torch.float64)
    true = true_gradient(theta, answer_logp)
    rows = []
    for estimator in estimators:
        for m in ms:
            mean, variance = expected_gradient(theta, answer_logp, m, estimator)
            norm = mean.norm().item()
            cosine = (mean @ true).item() / (norm * true.norm().item()) if norm > 1e-12 else 0.0
            rows.append({"estimator": estimator, "m": m, "size": norm / true.norm().item(), "cosine": cosine,
                         "variance": variance})
    return rows


def without_replacement_rows(ms: list[int], estimators: list[str], draws: int, seed: int = 0) -> list[dict]:
    """As :func:`finite_m_rows` for m distinct rankings drawn by the shipped ``priority_sample``, by Monte Carlo.

    ``dro_baseline`` subtracts Σ ρ̃_i ∇log p(z_i), self-normalised like the weights, so — unlike 1/m with
    replacement — its expectation is not exactly zero at finite m; ``baseline_bias`` is its size ‖E‖ / ‖∇‖."""
    theta = torch.tensor(THETA, dtype=torch.float64)
    answer_logp = torch.tensor(ANSWER_LOGP, dtype=torch.float64)
    true = true_gradient(theta, answer_logp)
    logp = torch.log_softmax(theta, 0)
    score = torch.eye(len(theta), dtype=torch.float64) - logp.exp()  # row z: ∇θ log softmax(θ)_z
    rows = []
    for m in ms:
        if not 1 < m < len(theta):
            raise ValueError(f"without replacement, m must be between 2 and {len(theta) - 1} for {len(theta)} rankings")
        index, log_ratio = E.priority_sample(logp.float().expand(draws, -1), m, torch.Generator().manual_seed(seed))
        log_ratio = log_ratio.double()
        weights = E.importance_weights(answer_logp[index], log_ratio).double()
        baseline = (E.proposal_weights(log_ratio, m)[..., None] * score[index]).sum(1)  # [draws, 3]
        for estimator in estimators:
            g = -(E.advantages(estimator, weights, torch.zeros_like(weights), log_ratio=log_ratio)[..., None]
                  * score[index]).sum(1)  # [draws, 3]
            mean = g.mean(0)
            rows.append({"estimator": estimator, "m": m, "size": (mean.norm() / true.norm()).item(),
                         "cosine": ((mean @ true) / (mean.norm() * true.norm())).item(),
                         "variance": ((g - mean) ** 2).sum(-1).mean().item(),
                         "baseline_bias": (baseline.mean(0).norm() / true.norm()).item()})
    return rows


def markdown_table(rows: list[dict]) -> str:
    lines = ["| estimator | m | ‖E g‖ / ‖∇‖ | cosine(E g, ∇) | E‖g − E g‖² |", "| --- | ---: | ---: | ---: | ---: |"]
    lines += [f"| `{r['estimator']}` | {r['m']} | {r['size']:.3f} | {r['cosine']:.3f} | {r['variance']:.3f} |"
              for r in rows]
    return "\n".join(lines)


def main(args: FiniteMArguments) -> list[dict]:
    if args.without_replacement:
        rows = without_replacement_rows([m for m in args.ms if 1 < m < len(THETA)], args.estimators, args.draws)
        print(markdown_table(rows), flush=True)
        print(f"sampled ({args.draws} tuples per row); ‖E Σ ρ̃ ∇log p‖ / ‖∇‖, what dro_baseline subtracts: " +
              ", ".join(f"m = {r['m']}: {r['baseline_bias']:.3f}" for r in rows[:: len(args.estimators)]), flush=True)
        return rows
    rows = finite_m_rows(args.ms, args.estimators)
    print(markdown_table(rows), flush=True)
    return rows


def make_parser() -> DROParser:
    return DROParser((FiniteMArguments,))


if __name__ == "__main__":
    main(*make_parser().parse_args_and_config())
