"""Two-process DRO run for tests/test_distributed.py (launched with torch.distributed.run, gloo on CPU).

Rank 1 alone gets a NaN selector loss at the second optimizer step: every rank must skip that update together (and
not hang in DDP's all-reduce). Each rank also records the rewards its advantages were computed from, which must be
the scores of its own rows, not another rank's slice of the gathered rewards.
"""

import json
import os
import sys

import torch
from peft import LoraConfig
from tiny_run import digest, tiny_config, tiny_task

from dro_rl import DROTrainer
from dro_rl import trainer as trainer_module
from dro_rl.models import GENERATOR, SELECTOR, shared_base_model

NAN_AT_STEP = 1  # global_step during the second optimizer step


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
    local_scores, used_rewards = record_rewards(trainer)
    nan_on_rank_one(trainer)
    trainer.train()
    result = {
        "world_size": trainer.accelerator.num_processes,
        "scored_in_loss": trainer.args.scores_in_loss,
        "initial": initial,
        "final": state(trainer.accelerator.unwrap_model(trainer.model),
                       trainer.accelerator.unwrap_model(trainer.generator), mode),
        "logs": [h for h in trainer.state.log_history if "selector/loss" in h],
        "rewards_are_local": len(used_rewards) == 3 and all(
            torch.allclose(r.reshape(-1), s, atol=1e-5) for r, s in zip(used_rewards, local_scores)
        ),
    }
    with open(os.path.join(out_dir, f"rank{trainer.accelerator.process_index}.json"), "w") as f:
        json.dump(result, f)
    # Without this, gloo's threads can still be running when the interpreter exits: "terminate called without an
    # active exception" and SIGABRT on a run that had succeeded.
    trainer.accelerator.end_training()


def record_rewards(trainer: DROTrainer) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """This rank's answer log-likelihoods (its rows' `log_likelihood` rewards, here from the generator loss's forward)
    and the rewards the advantages used."""
    local_scores, used_rewards = [], []
    weigh, advantages = trainer._weigh, trainer_module.E.advantages

    def scoring(batch, answer_logp, mode):
        local_scores.append(answer_logp.detach().clone())
        return weigh(batch, answer_logp, mode)

    def recording(estimator, weights, rewards, *args, **kwargs):
        used_rewards.append(rewards.detach().clone())
        return advantages(estimator, weights, rewards, *args, **kwargs)

    trainer._weigh, trainer_module.E.advantages = scoring, recording
    return local_scores, used_rewards


def nan_on_rank_one(trainer: DROTrainer) -> None:
    selector_loss = trainer_module.E.selector_loss

    def poisoned(adv, logp, m):
        loss = selector_loss(adv, logp, m)
        if trainer.accelerator.process_index == 1 and trainer.state.global_step == NAN_AT_STEP:
            return loss * float("nan")
        return loss

    trainer_module.E.selector_loss = poisoned


def state(selector, generator, mode: str) -> tuple[str, str]:
    """Digests of the selector's and the generator's weights (with a shared base: of each adapter)."""
    if mode == "shared":
        return digest(selector, f".{SELECTOR}."), digest(selector, f".{GENERATOR}.")
    return digest(selector), digest(generator)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
