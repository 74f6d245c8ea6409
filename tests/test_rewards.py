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
