"""Two-process DRO run for tests/test_distributed.py's resume test: `OUT STEPS` trains to STEPS (saving at every
4th step), or with `resume` continues OUT's newest checkpoint to STEPS. Twelve questions, four per step over the two
ranks: a pass is 3 steps, so a resume from checkpoint-4 starts inside the second pass and crosses into the third."""

import json
import os
import sys

import torch
from tiny_run import digest, tiny_config, tiny_task

from dro_rl import DROTrainer


def main(out: str, steps: int, resume: bool) -> None:
    torch.set_num_threads(1)
    data, tok, selector, generator = tiny_task(num_rows=12)
    args = tiny_config(out, max_steps=steps, save_strategy="steps", save_steps=4)
    trainer = DROTrainer(model=selector, generator=generator, args=args, train_dataset=data, processing_class=tok,
                         generator_processing_class=tok)
    trainer.train(resume_from_checkpoint=True if resume else None)
    logs = [{k: v for k, v in h.items() if k != "step_time"} for h in trainer.state.log_history if "selector/loss" in h]
    unwrap = trainer.accelerator.unwrap_model
    with open(os.path.join(out, f"rank{trainer.accelerator.process_index}.json"), "w") as f:
        json.dump({"selector": digest(unwrap(trainer.model)), "generator": digest(unwrap(trainer.generator)),
                   "logs": logs}, f)
    trainer.accelerator.end_training()  # gloo's threads stopped before the interpreter exits


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), len(sys.argv) > 3 and sys.argv[3] == "resume")
