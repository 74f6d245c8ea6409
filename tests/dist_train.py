"""Two-process DRO run for tests/test_distributed.py (launched with torch.distributed.run, gloo on CPU)."""

import hashlib
import json
import os
import sys

import torch
from datasets import Dataset

from dro_rl import DROConfig, DROTrainer
from dro_rl.demo import WorldConfig, demo_tokenizer, make_split, tiny_llama


def digest(model) -> str:
    h = hashlib.sha256()
    for name, p in sorted(model.named_parameters()):
        h.update(name.encode())
        h.update(p.detach().cpu().numpy().tobytes())
    return h.hexdigest()


def main(out_dir: str) -> None:
    torch.set_num_threads(1)
    rows = make_split(WorldConfig(num_people=30, num_candidates=4, seed=3), 32, 1)
    tok = demo_tokenizer(rows, 4, 2)
    selector = tiny_llama(len(tok), 32, 2, 4, 0, tok.pad_token_id, tok.eos_token_id)
    generator = tiny_llama(len(tok), 32, 2, 4, 1, tok.pad_token_id, tok.eos_token_id)
    initial = digest(selector), digest(generator)
    args = DROConfig(
        output_dir=os.path.join(out_dir, "run"), max_steps=3, per_device_train_batch_size=8, num_generations=4,
        num_docs_selected=2, learning_rate=1e-2, generator_learning_rate=1e-2, max_passage_tokens=8,
        generator_max_passage_tokens=8, use_chat_template=False, repeat_ids=True, use_cpu=True, bf16=False,
        gradient_checkpointing=False, report_to="none", logging_steps=1, save_strategy="no", seed=0,
        disable_tqdm=True,
    )
    data = Dataset.from_list([{k: r[k] for k in ("question", "answers", "passages", "gold")} for r in rows])
    trainer = DROTrainer(model=selector, generator=generator, args=args, train_dataset=data, processing_class=tok,
                         generator_processing_class=tok)
    trainer.train()
    unwrap = trainer.accelerator.unwrap_model
    result = {
        "world_size": trainer.accelerator.num_processes,
        "initial": initial,
        "final": (digest(unwrap(trainer.model)), digest(unwrap(trainer.generator))),
        "logs": [h for h in trainer.state.log_history if "selector/loss" in h],
    }
    with open(os.path.join(out_dir, f"rank{trainer.accelerator.process_index}.json"), "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    main(sys.argv[1])
