"""One tiny DRO setup shared by the in-process trainer tests and the subprocess scripts (distributed, SIGKILL)."""

import hashlib

from datasets import Dataset

from dro_rl import DROConfig
from dro_rl.demo import WorldConfig, demo_tokenizer, make_split, tiny_llama

COLUMNS = ("question", "answers", "passages", "gold")


def tiny_config(output_dir: str, **overrides) -> DROConfig:
    """A few steps of DRO on CPU with a learning rate large enough to move every parameter."""
    values = dict(
        output_dir=output_dir, max_steps=2, per_device_train_batch_size=8, num_generations=4, num_docs_selected=2,
        learning_rate=1e-2, generator_learning_rate=1e-2, max_passage_tokens=8, generator_max_passage_tokens=8,
        use_chat_template=False, repeat_ids=True, use_cpu=True, bf16=False, gradient_checkpointing=False,
        report_to="none", logging_steps=1, save_strategy="no", seed=0, disable_tqdm=True,
        lr_scheduler_type="constant", max_grad_norm=1.0,
    )
    values.update(overrides)
    return DROConfig(**values)


def as_dataset(rows) -> Dataset:
    return Dataset.from_list([{k: r[k] for k in COLUMNS} for r in rows])


def tiny_task(num_rows: int = 32):
    """(dataset, tokenizer, selector, generator) for the subprocess scripts."""
    rows = make_split(WorldConfig(num_people=30, num_candidates=4, seed=3), num_rows, 1)
    tok = demo_tokenizer(rows, 4, 2)
    selector = tiny_llama(len(tok), 32, 2, 4, 0, tok.pad_token_id, tok.eos_token_id)
    generator = tiny_llama(len(tok), 32, 2, 4, 1, tok.pad_token_id, tok.eos_token_id)
    return as_dataset(rows), tok, selector, generator


def digest(model, name_contains: str = "") -> str:
    """SHA-256 over every named parameter (whose name contains ``name_contains``): equal digests, identical weights."""
    h = hashlib.sha256()
    for name, p in sorted(model.named_parameters()):
        if name_contains not in name:
            continue
        h.update(name.encode() + p.detach().cpu().numpy().tobytes())
    return h.hexdigest()
