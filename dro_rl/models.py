"""Loading the selector and generator: Hub names or local paths, or ``tiny:<tokenizer>`` models built offline.

``tiny:minilm`` builds a randomly initialised 2-layer Llama over the WordPiece tokenizer shipped with the
embedded all-MiniLM-L6-v2 (30k tokens, handles real English text), so every stage can run on real data without the
Hub; ``tiny:<path>`` does the same with any local tokenizer.
"""

from __future__ import annotations

import os

from transformers import AutoTokenizer

from .demo import tiny_llama
from .retrieval import DEFAULT_DENSE_MODEL, dense_model_path


def load_tokenizer(name_or_path: str, trust_remote_code: bool = False):
    """A left-padding tokenizer with pad and EOS tokens (EOS ends every ranking and every answer)."""
    minilm = name_or_path == "minilm"
    if minilm:
        name_or_path = dense_model_path(DEFAULT_DENSE_MODEL)
    tok = AutoTokenizer.from_pretrained(name_or_path, padding_side="left", trust_remote_code=trust_remote_code)
    if minilm:  # its 512-token limit belongs to the encoder, not to the tiny models built over its vocabulary
        tok.model_max_length = 1_000_000
    if tok.eos_token is None:
        tok.eos_token = tok.sep_token or tok.pad_token  # BERT-style vocabularies have [SEP] but no EOS
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def load_model(
    name_or_path: str, seed: int = 0, hidden_size: int = 64, num_layers: int = 2, **init_kwargs
):
    """(model, tokenizer) for a Hub name, a local folder, or ``tiny:<tokenizer>``."""
    if name_or_path.startswith("tiny:"):
        tok = load_tokenizer(name_or_path[len("tiny:") :])
        model = tiny_llama(len(tok), hidden_size, num_layers, 4, seed, tok.pad_token_id, tok.eos_token_id)
        return model, tok
    looks_local = name_or_path.startswith((".", "/", "~")) or name_or_path.count("/") >= 2  # Hub ids are org/name
    if looks_local and not os.path.isdir(os.path.expanduser(name_or_path)):
        raise FileNotFoundError(f"model path does not exist: {name_or_path}")
    from trl.trainer.utils import create_model_from_path

    tok = load_tokenizer(name_or_path, init_kwargs.get("trust_remote_code", False))
    return create_model_from_path(name_or_path, **init_kwargs), tok
