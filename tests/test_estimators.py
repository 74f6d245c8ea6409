import math
import sys
from pathlib import Path

import pytest
import torch

from dro_rl import estimators as E

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

from finite_m import finite_m_rows, markdown_table, without_replacement_rows  # noqa: E402


def test_weights_are_the_normalised_answer_likelihoods():
    logp = torch.log(torch.tensor([[0.2, 0.3, 0.5], [0.1, 0.1, 0.2]]))
    w = E.importance_weights(logp)
    # second row: 0.1 / 0.4 = 0.25, 0.25, 0.5
    torch.testing.assert_close(w, torch.tensor([[0.2, 0.3, 0.5], [0.25, 0.25, 0.5]]))


def test_weights_stay_finite_for_huge_negative_log_likelihoods():
    w = E.importance_weights(torch.tensor([[-1000.0, -1000.0 - math.log(3.0)]]))
    # exp(-1000) underflows, but in log space the ratio is exactly 3 : 1
    torch.testing.assert_close(w, torch.tensor([[0.75, 0.25]]))


def test_impossible_samples_get_zero_weight_and_all_impossible_rows_are_uniform():
    w = E.importance_weights(torch.tensor([[float("-inf"), 0.0], [float("nan"), float("-inf")]]))
    torch.testing.assert_close(w, torch.tensor([[0.0, 1.0], [0.5, 0.5]]))
    assert torch.isfinite(w).all()
    # drawn without replacement: the proposal's weights ρ̃ (0 for the spare repeat), so dro_baseline pushes nowhere —
    # uniform weights gave the spare row +0.25 and the likeliest pick −0.45 with no information behind them
    log_ratio = torch.tensor([[0.7, 0.2, 0.1, 0.0]]).log()
    dead = torch.full((1, 4), float("-inf"))
    w = E.importance_weights(dead, log_ratio)
    torch.testing.assert_close(w, torch.tensor([[0.7, 0.2, 0.1, 0.0]]))
    assert (E.advantages("dro_baseline", w, torch.zeros(1, 4), log_ratio=log_ratio) == 0).all()


def test_weights_sum_to_one_per_question():
    w = E.importance_weights(torch.randn(5, 7) * 30)
    torch.testing.assert_close(w.sum(-1), torch.ones(5))


REWARDS = torch.tensor([[1.0, 2.0, 3.0, 6.0]])
WEIGHTS = torch.tensor([[0.1, 0.2, 0.3, 0.4]])


@pytest.mark.parametrize(
    "estimator, expected",
    [
        ("dro", [0.1, 0.2, 0.3, 0.4]),
        ("dro_baseline", [-0.15, -0.05, 0.05, 0.15]),  # w - 1/4
        ("reinforce", [1.0, 2.0, 3.0, 6.0]),
        # r_i - mean of the other three: 1 - 11/3, 2 - 10/3, 3 - 9/3, 6 - 6/3
        ("rloo", [-8 / 3, -4 / 3, 0.0, 4.0]),
        # (r - 3) / (sample std 14/3 ** 0.5 + 1e-4)
        ("grpo", [x / (math.sqrt(14 / 3) + 1e-4) for x in (-2.0, -1.0, 0.0, 3.0)]),
    ],
)
def test_advantages_match_hand_computed_values(estimator, expected):
    torch.testing.assert_close(E.advantages(estimator, WEIGHTS, REWARDS), torch.tensor([expected]))


def test_advantages_are_per_question():
    """Two questions at once get each question's own advantages (a baseline over the whole batch would not)."""
    weights, rewards = torch.cat([WEIGHTS, WEIGHTS.flip(-1)]), torch.cat([REWARDS, 10 * REWARDS.flip(-1)])
    for estimator in E.ESTIMATORS:
        both = E.advantages(estimator, weights, rewards)
        for q in range(2):
            torch.testing.assert_close(both[q], E.advantages(estimator, weights[q : q + 1], rewards[q : q + 1])[0])


def test_advantages_with_two_and_with_one_sample():
    # m = 2: leave-one-out is the difference to the other sample; grpo's sample std of (1, 4) is 3 / √2
    two = torch.tensor([[1.0, 4.0]])
    torch.testing.assert_close(E.advantages("rloo", WEIGHTS[:, :2], two), torch.tensor([[-3.0, 3.0]]))
    torch.testing.assert_close(E.advantages("grpo", WEIGHTS[:, :2], two),
                               torch.tensor([[-1.5, 1.5]]) / (3 / math.sqrt(2) + 1e-4))
    # m = 1: nothing to compare with, so the baselined estimators give exactly zero (never a NaN std)
    for estimator in ("dro_baseline", "rloo", "grpo"):
        assert E.advantages(estimator, torch.ones(2, 1), torch.tensor([[5.0], [-2.0]])).tolist() == [[0.0], [0.0]]


def test_grpo_without_std_scaling_is_centred_reward():
    torch.testing.assert_close(
        E.advantages("grpo", WEIGHTS, REWARDS, scale_by_std=False), torch.tensor([[-2.0, -1.0, 0.0, 3.0]])
    )


def test_unknown_estimator_is_rejected():
    with pytest.raises(ValueError, match="unknown estimator"):
        E.advantages("ppo", WEIGHTS, REWARDS)


def test_dro_gradient_is_consistent_not_unbiased():
    """Exact expectation over every m-tuple of a 3-way policy (scripts/finite_m.py): zero at m = 1 (w̃ = 1), then
    pointing ever closer to, and growing towards, the true gradient of −log p(y | x). Catches a flipped loss sign,
    weights normalised over the wrong axis, and any estimator that is not the self-normalised one."""
    rows = finite_m_rows([1, 2, 4, 8], ["dro"])
    assert rows[0]["size"] < 1e-12
    sizes, cosines = [r["size"] for r in rows[1:]], [r["cosine"] for r in rows[1:]]
    assert sizes == sorted(sizes) and sizes[-1] < 1.0 and cosines == sorted(cosines)
    # the figures of docs/estimator.md and the review that found them (0.54×/0.969, 0.79×/0.993, 0.90×/0.998)
    assert sizes == pytest.approx([0.539, 0.785, 0.896], abs=1e-3)
    assert cosines == pytest.approx([0.969, 0.993, 0.998], abs=1e-3)


def test_dro_baseline_keeps_the_expected_gradient_and_lowers_its_variance():
    """Subtracting 1/m changes no expectation (Σ w̃ = 1, E[∇ log p] = 0) but removes noise; any other constant
    (w̃ + 1/m, w̃ − 5) would keep the expectation too, but not the lower variance."""
    dro, baseline = finite_m_rows([2, 4, 8], ["dro"]), finite_m_rows([2, 4, 8], ["dro_baseline"])
    for a, b in zip(dro, baseline):
        assert b["size"] == pytest.approx(a["size"], abs=1e-6) and b["cosine"] == pytest.approx(a["cosine"], abs=1e-6)
        assert b["variance"] < 0.2 * a["variance"]


def test_the_estimator_doc_shows_the_measured_table():
    table = markdown_table(finite_m_rows([1, 2, 4, 8], ["dro", "dro_baseline"]))
    assert table in (ROOT / "docs" / "estimator.md").read_text()


@pytest.mark.parametrize(
    "update, expected",
    [
        ("weighted", [[0.1, 0.2, 0.3, 0.4]]),
        ("uniform", [[0.25, 0.25, 0.25, 0.25]]),
        ("best", [[0.0, 0.0, 0.0, 1.0]]),
        ("none", [[0.0, 0.0, 0.0, 0.0]]),
    ],
)
def test_generator_coefficients(update, expected):
    torch.testing.assert_close(E.generator_coefficients(update, WEIGHTS), torch.tensor(expected))


def test_weighted_nll_averages_over_questions():
    coef = torch.tensor([0.5, 0.5, 1.0, 0.0])
    logp = torch.tensor([-1.0, -3.0, -2.0, -5.0])
    # two questions of m = 2: (0.5 + 1.5) and (2 + 0); mean over questions = 2.0
    assert E.weighted_nll(coef, logp, m=2).item() == pytest.approx(2.0)


def test_weights_carry_no_gradient_into_the_loss():
    logp = torch.tensor([-1.0, -2.0], requires_grad=True)
    coef = torch.tensor([0.3, 0.7], requires_grad=True)
    E.generator_loss(coef, logp, m=2).backward()
    assert coef.grad is None
    torch.testing.assert_close(logp.grad, torch.tensor([-0.3, -0.7]))


def test_effective_sample_size_and_entropy():
    w = torch.tensor([[0.25, 0.25, 0.25, 0.25], [1.0, 0.0, 0.0, 0.0]])
    torch.testing.assert_close(E.effective_sample_size(w), torch.tensor([4.0, 1.0]))
    torch.testing.assert_close(E.weight_entropy(w), torch.tensor([math.log(4), 0.0]))


def test_priority_sample_ratios_estimate_expectations_without_bias():
    """Σ_{i∈S} ρ_i f(i) over 200,000 Gumbel-top-m draws matches E_p[f] within 5 standard errors, for m = 2 and 3 of
    N = 5. Catches a wrong threshold (the m-th key instead of the (m+1)-th), q_i taken as p_i, or ρ = p."""
    logp = torch.log_softmax(torch.tensor([2.0, 0.5, 0.0, -1.0, -3.0]), -1)
    f = torch.tensor([1.0, -2.0, 3.0, 0.5, 10.0])
    exact = (logp.exp() * f).sum().item()
    gen = torch.Generator().manual_seed(0)
    for m in (2, 3):
        index, log_ratio = E.priority_sample(logp.expand(200_000, 5), m, gen)
        assert (index.sort(-1).values.diff(dim=-1) > 0).all()  # m distinct items in every draw
        estimates = (log_ratio.exp().double() * f[index]).sum(-1)
        se = estimates.std().item() / math.sqrt(len(estimates))
        assert abs(estimates.mean().item() - exact) < 5 * se
        naive = f[index].double().mean().item()  # the same draws, unweighted: far off, so the test can tell
        assert abs(naive - exact) > 20 * se


def test_priority_sample_of_every_item_is_exact():
    logp = torch.log_softmax(torch.randn(3, 4, generator=torch.Generator().manual_seed(1)), -1)
    index, log_ratio = E.priority_sample(logp, 4, torch.Generator().manual_seed(2))
    assert (index.sort(-1).values == torch.arange(4)).all()
    torch.testing.assert_close(log_ratio, logp.gather(-1, index))


def test_priority_sample_of_fewer_items_than_m_draws_each_once_and_spares_weigh_nothing():
    """A question with fewer candidates than m: each drawn once with ρ = p (exact), the spare slot repeats one with
    ρ = 0, so it takes no importance weight, no baseline share and no share of the uniform generator update."""
    logp = torch.tensor([[0.0, float("-inf"), 1.0]]).log_softmax(-1)
    index, log_ratio = E.priority_sample(logp, 3, torch.Generator().manual_seed(0))
    assert sorted(index[0, :2].tolist()) == [0, 2] and index[0, 2] == index[0, 0]
    torch.testing.assert_close(log_ratio[:, :2], logp.gather(-1, index[:, :2]))
    assert torch.isneginf(log_ratio[0, 2])
    answer = torch.tensor([[-1.0, -2.0, -0.5]])
    weights = E.importance_weights(answer, log_ratio)
    assert weights[0, 2] == 0 and weights.sum().item() == pytest.approx(1.0)
    assert E.advantages("dro_baseline", weights, answer, log_ratio=log_ratio)[0, 2] == 0
    assert E.generator_coefficients("uniform", weights, log_ratio).tolist() == [[0.5, 0.5, 0.0]]
    with pytest.raises(ValueError, match="at least one possible item"):
        E.priority_sample(torch.full((1, 3), float("-inf")), 2)


@pytest.mark.parametrize("estimator", ["dro", "dro_baseline"])
def test_without_replacement_at_m_equal_n_gives_the_exact_gradient(estimator):
    """K = 1, m = N: every pick sampled once, weights ∝ p(z) p(y | z) (the posterior), and −Σ A_i ∇log p(z_i) is
    exactly ∇[−log Σ_z p(z) p(y | z)]. The same draws weighted as if sampled with replacement are not."""
    theta = torch.tensor([1.5, -0.5, 0.3, 0.0], requires_grad=True)
    answer = torch.tensor([-4.0, -1.0, -6.0, -2.5])
    truth = torch.autograd.grad(-torch.logsumexp(theta.log_softmax(-1) + answer, -1), theta)[0]
    logp = theta.log_softmax(-1)
    index, log_ratio = E.priority_sample(logp.detach()[None], 4, torch.Generator().manual_seed(3))
    z = index[0]

    def gradient(ratio):
        weights = E.importance_weights(answer[z][None], ratio)
        adv = E.advantages(estimator, weights, torch.zeros(1, 4), log_ratio=ratio)
        return torch.autograd.grad(E.selector_loss(adv[0], logp[z], 4), theta, retain_graph=True)[0]

    torch.testing.assert_close(gradient(log_ratio), truth, atol=1e-6, rtol=1e-5)
    assert (gradient(None) - truth).abs().max() > 0.05


def test_only_the_dro_estimators_take_samples_drawn_without_replacement():
    with pytest.raises(ValueError, match="without replacement"):
        E.advantages("rloo", WEIGHTS, REWARDS, log_ratio=torch.zeros_like(WEIGHTS))


def test_without_replacement_the_baseline_keeps_the_direction_at_a_fraction_of_the_variance():
    """scripts/finite_m.py --without_replacement (docs/estimator.md), with fewer draws: dro_baseline's subtracted
    Σ ρ̃ ∇log p is not zero in expectation (self-normalised), yet its step points as close to the true gradient as
    dro's, with far less variance — the page's reason to keep ρ̃."""
    dro, baseline = without_replacement_rows([2], ["dro", "dro_baseline"], draws=40_000)
    assert baseline["baseline_bias"] > 0.01 and baseline["baseline_bias"] < 0.1
    assert dro["cosine"] > 0.95 and baseline["cosine"] > 0.95
    assert baseline["variance"] < dro["variance"] / 2
