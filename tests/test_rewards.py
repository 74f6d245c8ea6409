import math
import pickle

import pytest

import rewards
from rewards import get_reward


def test_rewards_from_the_answer_loglik():
    kwargs = dict(answer_logprob=[math.log(0.5), -4.0], answer_num_tokens=[1, 4])
    assert rewards.likelihood(["", ""], **kwargs) == pytest.approx([0.5, math.exp(-4)])
    assert rewards.log_likelihood(["", ""], **kwargs) == [math.log(0.5), -4.0]
    assert rewards.mean_log_likelihood(["", ""], **kwargs) == [math.log(0.5), -1.0]  # -4 over 4 tokens


def test_support_recall_reward_skips_rows_without_labels():
    assert rewards.support_recall(["", ""], picks=[[0], [1]], gold=[[True, True], []]) == [0.5, None]


def test_rewards_by_name_and_by_dotted_path():
    assert get_reward("log_likelihood") is rewards.log_likelihood
    assert get_reward("rewards.mean_log_likelihood") is rewards.mean_log_likelihood
    with pytest.raises(ValueError, match="unknown reward"):
        get_reward("accuracy")
    with pytest.raises(ValueError, match="cannot import"):
        get_reward("rewards.nope")


def test_rewards_pickle():
    assert pickle.loads(pickle.dumps(rewards.likelihood)) is rewards.likelihood


def test_answer_rewards_declare_they_need_a_generated_answer():
    assert rewards.answer_em.needs_generated_answer and rewards.answer_f1.needs_generated_answer
    assert not getattr(rewards.log_likelihood, "needs_generated_answer", False)
    assert rewards.WeightedSum({"answer_f1": 1.0, "log_likelihood": 0.1}).needs_generated_answer


def test_weighted_sum_skips_only_when_every_part_skips():
    total = rewards.WeightedSum({"support_recall": 2.0, "log_likelihood": 1.0})
    assert total.__name__ == "2*support_recall+1*log_likelihood"
    out = total(["", ""], picks=[[0], [0]], gold=[[True, False], []], answer_logprob=[-1.0, -2.0])
    assert out == [2.0 * 1.0 - 1.0, -2.0]  # second row has no labels: only the likelihood part counts
    assert pickle.loads(pickle.dumps(total))(["", ""], picks=[[0], [0]], gold=[[True], []],
                                             answer_logprob=[0.0, 0.0]) == [2.0, 0.0]
