"""A small DRO run for tests/test_interrupt.py: `run OUT STEPS [kill_at] [resume]` (a real process, real SIGKILL)."""

import hashlib
import json
import os
import signal
import sys

import torch
from datasets import Dataset
from transformers import TrainerCallback

from dro_rl import DROConfig, DROTrainer
from dro_rl.demo import WorldConfig, demo_tokenizer, make_split, tiny_llama


class KillAt(TrainerCallback):
    def __init__(self, step: int):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            os.kill(os.getpid(), signal.SIGKILL)  # no cleanup, no flush: as if the machine had died


def digest(model) -> str:
    h = hashlib.sha256()
    for name, p in sorted(model.named_parameters()):
        h.update(name.encode() + p.detach().numpy().tobytes())
    return h.hexdigest()


def main(out: str, steps: int, kill_at: int = 0, resume: bool = False) -> None:
    torch.set_num_threads(1)
    rows = make_split(WorldConfig(num_people=30, num_candidates=4, seed=3), 32, 1)
    tok = demo_tokenizer(rows, 4, 2)
    args = DROConfig(
        output_dir=out, max_steps=steps, per_device_train_batch_size=8, num_generations=4, num_docs_selected=2,
        learning_rate=1e-2, generator_learning_rate=1e-2, max_passage_tokens=8, generator_max_passage_tokens=8,
        use_chat_template=False, repeat_ids=True, use_cpu=True, bf16=False, gradient_checkpointing=False,
        report_to="none", logging_steps=1, save_strategy="steps", save_steps=2, seed=0, disable_tqdm=True,
        lr_scheduler_type="linear",
    )
    data = Dataset.from_list([{k: r[k] for k in ("question", "answers", "passages", "gold")} for r in rows])
    trainer = DROTrainer(
        model=tiny_llama(len(tok), 32, 2, 4, 0, tok.pad_token_id, tok.eos_token_id),
        generator=tiny_llama(len(tok), 32, 2, 4, 1, tok.pad_token_id, tok.eos_token_id),
        args=args, train_dataset=data, processing_class=tok, generator_processing_class=tok,
        callbacks=[KillAt(kill_at)] if kill_at else None,
    )
    trainer.train(resume_from_checkpoint=True if resume else None)
    logs = [{k: v for k, v in h.items() if k != "step_time"} for h in trainer.state.log_history if "selector/loss" in h]
    with open(os.path.join(out, "result.json"), "w") as f:
        json.dump({"selector": digest(trainer.model), "generator": digest(trainer.generator), "logs": logs}, f)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]) if len(sys.argv) > 3 else 0,
         len(sys.argv) > 4 and sys.argv[4] == "resume")
