import itertools
import math

import pytest
import torch

from dro_rl import estimators as E


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


def test_grpo_without_std_scaling_is_centred_reward():
    torch.testing.assert_close(
        E.advantages("grpo", WEIGHTS, REWARDS, scale_by_std=False), torch.tensor([[-2.0, -1.0, 0.0, 3.0]])
    )


def test_unknown_estimator_is_rejected():
    with pytest.raises(ValueError, match="unknown estimator"):
        E.advantages("ppo", WEIGHTS, REWARDS)


def test_dro_baseline_keeps_expected_gradient():
    """Exact expectation over every m-tuple of a 3-way categorical policy: subtracting 1/m changes nothing."""
    theta = torch.tensor([0.3, -0.2, 0.5], requires_grad=True)
    answer_logp = torch.tensor([-0.5, -2.0, -1.0])  # log p(y | z) for each outcome z
    m = 2
    grads = {}
    for estimator in ("dro", "dro_baseline"):
        total = torch.zeros(3)
        for tup in itertools.product(range(3), repeat=m):
            logp = torch.log_softmax(theta, 0)
            prob = torch.exp(sum(logp[z] for z in tup)).detach()
            w = E.importance_weights(answer_logp[list(tup)][None])
            adv = E.advantages(estimator, w, torch.zeros(1, m))
            loss = E.selector_loss(adv[0], logp[list(tup)], m)
            (g,) = torch.autograd.grad(loss, theta)
            total += prob * g
        grads[estimator] = total
    torch.testing.assert_close(grads["dro"], grads["dro_baseline"], atol=1e-6, rtol=1e-5)
    assert grads["dro"].abs().sum() > 1e-3  # the gradient itself is not trivially zero


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
