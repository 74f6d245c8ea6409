"""A small DRO run for tests/test_interrupt.py: `OUT STEPS [kill_at] [resume]` (a real process, a real SIGKILL).

Six questions, two per step: a pass over the data takes 3 steps, so a run of 7 crosses two pass boundaries."""

import json
import os
import signal
import sys

import torch
from tiny_run import digest, tiny_config, tiny_task
from transformers import TrainerCallback

from dro_rl import DROTrainer


class KillAt(TrainerCallback):
    def __init__(self, step: int):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            os.kill(os.getpid(), signal.SIGKILL)  # no cleanup, no flush: as if the machine had died


def main(out: str, steps: int, kill_at: int = 0, resume: bool = False) -> None:
    torch.set_num_threads(1)
    data, tok, selector, generator = tiny_task(num_rows=6)
    args = tiny_config(out, max_steps=steps, save_strategy="steps", save_steps=2, lr_scheduler_type="linear")
    trainer = DROTrainer(
        model=selector, generator=generator, args=args, train_dataset=data, processing_class=tok,
        generator_processing_class=tok, callbacks=[KillAt(kill_at)] if kill_at else None,
    )
    trainer.train(resume_from_checkpoint=True if resume else None)
    logs = [{k: v for k, v in h.items() if k != "step_time"} for h in trainer.state.log_history if "selector/loss" in h]
    with open(os.path.join(out, "result.json"), "w") as f:
        json.dump({"selector": digest(trainer.model), "generator": digest(trainer.generator), "logs": logs}, f)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]) if len(sys.argv) > 3 else 0,
         len(sys.argv) > 4 and sys.argv[4] == "resume")
