"""Two-process DRO run for tests/test_distributed.py (launched with torch.distributed.run, gloo on CPU)."""

import json
import os
import sys

import torch
from peft import LoraConfig
from tiny_run import digest, tiny_config, tiny_task

from dro_rl import DROTrainer
from dro_rl.models import GENERATOR, SELECTOR, shared_base_model


def main(out_dir: str, mode: str) -> None:
    """mode `separate`: two full models; `shared`: one base with two LoRA adapters, gradient checkpointing on."""
    torch.set_num_threads(1)
    data, tok, selector, generator = tiny_task()
    if mode == "shared":
        lora = LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False, task_type="CAUSAL_LM")
        selector = generator = shared_base_model(selector, lora, lora)
        models = dict(model=selector)
    else:
        models = dict(model=selector, generator=generator)
    initial = state(selector, generator, mode)
    args = tiny_config(os.path.join(out_dir, "run"), max_steps=3, share_base_model=mode == "shared",
                       gradient_checkpointing=mode == "shared")
    trainer = DROTrainer(**models, args=args, train_dataset=data, processing_class=tok, generator_processing_class=tok)
    trainer.train()
    result = {
        "world_size": trainer.accelerator.num_processes,
        "initial": initial,
        "final": state(trainer.accelerator.unwrap_model(trainer.model),
                       trainer.accelerator.unwrap_model(trainer.generator), mode),
        "logs": [h for h in trainer.state.log_history if "selector/loss" in h],
    }
    with open(os.path.join(out_dir, f"rank{trainer.accelerator.process_index}.json"), "w") as f:
        json.dump(result, f)


def state(selector, generator, mode: str) -> tuple[str, str]:
    """Digests of the selector's and the generator's weights (with a shared base: of each adapter)."""
    if mode == "shared":
        return digest(selector, f".{SELECTOR}."), digest(selector, f".{GENERATOR}.")
    return digest(selector), digest(generator)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
