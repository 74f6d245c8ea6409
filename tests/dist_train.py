"""Two-process DRO run for tests/test_distributed.py (launched with torch.distributed.run, gloo on CPU)."""

import json
import os
import sys

import torch
from tiny_run import digest, tiny_config, tiny_task

from dro_rl import DROTrainer


def main(out_dir: str) -> None:
    torch.set_num_threads(1)
    data, tok, selector, generator = tiny_task()
    initial = digest(selector), digest(generator)
    args = tiny_config(os.path.join(out_dir, "run"), max_steps=3)
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
