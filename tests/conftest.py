"""Shared fixtures: tiny offline tokenizers and models, and a small demo task. Threads pinned for 2-core machines."""

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers  # noqa: E402
from transformers import PreTrainedTokenizerFast  # noqa: E402

from dro_rl.demo import WorldConfig, demo_tokenizer, make_split, tiny_llama  # noqa: E402

torch.set_num_threads(1)


@pytest.fixture(scope="session")
def demo_rows():
    """24 demo questions, N = 4 candidates, half two-hop."""
    return make_split(WorldConfig(num_people=30, num_candidates=4, seed=3), 24, 1)


@pytest.fixture(scope="session")
def word_tok(demo_rows):
    return demo_tokenizer(demo_rows, 12, 3)


@pytest.fixture(scope="session")
def bpe_tok():
    """Byte-level BPE with a tiny vocabulary, so ids such as ``[12]`` take several tokens."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    lines = [f"[{i}] > [{j}] passage about things {i} question answer" for i in range(1, 13) for j in range(1, 5)]
    tok.train_from_iterator(
        lines * 5,
        trainers.BpeTrainer(
            vocab_size=300, special_tokens=["<|endoftext|>", "<|im_end|>"],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        ),
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>", padding_side="left"
    )


def make_model(tok, seed=0, hidden=32, layers=2):
    return tiny_llama(len(tok), hidden, layers, 4, seed, tok.pad_token_id, tok.eos_token_id)


@pytest.fixture
def word_model(word_tok):
    return make_model(word_tok)
