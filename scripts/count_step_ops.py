"""Count the operations one DRO training step dispatches, phase by phase, at a recipe's settings.

    python scripts/count_step_ops.py --config configs/hotpotqa_smollm2.yaml        # ~2 min on a 2-core CPU
    python scripts/count_step_ops.py --config configs/hotpotqa_smollm2.yaml --output ops.json

Why count: a small model's step on a GPU is far below the GPU's FLOP limit, and eager PyTorch pays host time for
every operation it runs (Python, dispatch, kernel launch), so the number of operations bounds such a step. That
number depends on the model's depth, the step's structure (sampling steps, forwards, backward) and the precision
(autocast adds casts) — not on the model's width, the passages' length or the device. So it is counted here, on CPU,
with models of the recipe's architecture (depth, heads, vocabulary) but ``--head_dim``-wide heads (random weights),
on the recipe's own data, prompts, K, m and batch, through the real ``DROTrainer`` step (LoRA adapters too, with
``use_peft``), with passages cut to ``--passage_tokens`` to keep it fast. Every aten operation the step dispatches
counts once (a ``TorchDispatchMode``). The figures of docs/real_model.md come from the first command.
"""

from __future__ import annotations

import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from datasets import Dataset
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import AutoConfig, AutoModelForCausalLM, TrainerCallback
from trl import ModelConfig, get_peft_config

from dro_rl import DROConfig, DROTrainer
from dro_rl import trainer as trainer_module
from dro_rl.cli import refusals_in_one_line
from dro_rl.data import load
from dro_rl.files import write_json
from dro_rl.models import load_model, load_tokenizer
from dro_rl.packaged_models import resolve_packaged
from dro_rl.parser import DROParser
from dro_rl.pipeline import parse_spec
from dro_rl.recipe import RecipeArguments

# The phases: functions the step calls, by their names in dro_rl.trainer; the backward pass is counted apart.
PHASES = {"sample": "sample_rankings", "generator forward": "target_logprobs", "selector forward": "selector_logprobs"}


@dataclass
class CountArguments:
    steps: int = field(default=2, metadata={"help": "Steps to run; the last is reported (the first also sets up)."})
    head_dim: int = field(default=8, metadata={"help": "Width of each attention head of the counted models (hidden "
                                                        "size = heads x head_dim; the count does not depend on it)."})
    passage_tokens: int = field(default=8, metadata={"help": "Token budget of each passage in both prompts (the "
                                                              "count does not depend on it)."})
    output: str | None = field(default=None, metadata={"help": "Also write the counts to this JSON file."})


class OpCounter(TorchDispatchMode):
    """Counts every aten operation dispatched while active."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += 1
        return func(*args, **(kwargs or {}))


def narrow_model(name: str, recipe: RecipeArguments, head_dim: int, seed: int) -> torch.nn.Module:
    """``name``'s architecture — depth, heads, vocabulary, tied embeddings — with ``head_dim``-wide attention heads and
    random weights; a ``tiny:`` model as the recipe builds it."""
    if name.startswith("tiny:"):
        return load_model(name, seed, recipe.demo_hidden_size, recipe.demo_num_layers)[0]
    config = AutoConfig.from_pretrained(resolve_packaged(name))
    config.head_dim = head_dim
    config.hidden_size = config.num_attention_heads * head_dim
    config.intermediate_size = 2 * config.hidden_size
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")


def counting(counter: OpCounter, tally: Counter, label: str, fn: Callable) -> Callable:
    """``fn``, adding the operations each call dispatches to ``tally[label]``."""

    def wrapper(*args, **kwargs):
        before = counter.count
        try:
            return fn(*args, **kwargs)
        finally:
            tally[label] += counter.count - before

    return wrapper


def main(recipe: RecipeArguments, dro: DROConfig, model_args: ModelConfig, count: CountArguments) -> dict:
    if recipe.dataset == "demo":
        raise ValueError("give a recipe on a dataset file (the demo builds its own world): --config configs/<recipe>")
    name = model_args.model_name_or_path
    fmt, path, _ = parse_spec(recipe.dataset)
    questions_per_step = max(dro.per_device_train_batch_size // dro.num_generations, 1)
    rows, _ = load(path, fmt, limit=questions_per_step * count.steps)
    tok = load_tokenizer(name.removeprefix("tiny:"))  # a tiny: model's tokenizer is the one it names
    counter, tally, steps = OpCounter(), Counter(), []

    class PerStep(TrainerCallback):
        def on_step_begin(self, *_, **__):
            tally.clear()
            self.start, self.clock = counter.count, time.perf_counter()

        def on_step_end(self, *_, **__):
            steps.append({"total": counter.count - self.start, **tally,
                          "seconds on this CPU": round(time.perf_counter() - self.clock, 2)})

    originals = {function: getattr(trainer_module, function) for function in PHASES.values()}
    models = [narrow_model(name, recipe, count.head_dim, seed) for seed in (0, 1)]
    peft_config = get_peft_config(model_args)  # the recipe's LoRA adapters, when it has them (use_peft)
    trainer = DROTrainer(model=models[0], processing_class=tok, generator=models[1], generator_processing_class=tok,
                         args=dro, train_dataset=Dataset.from_list(rows), callbacks=[PerStep()],
                         peft_config=peft_config, generator_peft_config=peft_config)
    trainer.accelerator.backward = counting(counter, tally, "backward", trainer.accelerator.backward)
    try:
        for label, function in PHASES.items():
            setattr(trainer_module, function, counting(counter, tally, label, originals[function]))
        with counter:
            trainer.train()
    finally:
        for function, original in originals.items():
            setattr(trainer_module, function, original)
    last = steps[-1]
    last["other (weights, optimizer, logging)"] = last["total"] - sum(last.get(p, 0) for p in [*PHASES, "backward"])
    shape = {"model": name, "layers": models[0].config.num_hidden_layers, "hidden_size": models[0].config.hidden_size,
             "bf16": dro.bf16, "lora": model_args.use_peft,
             "questions_per_step": questions_per_step, "num_generations": dro.num_generations,
             "num_docs_selected": dro.num_docs_selected, "gradient_checkpointing": dro.gradient_checkpointing}
    print(f"aten operations in DRO step {len(steps)} ({shape})", flush=True)
    for key, value in last.items():
        print(f"  {key:38s} {value:>10,}", flush=True)
    result = {"shape": shape, "steps": steps}
    if count.output:
        write_json(result, count.output)
    return result


def make_parser() -> DROParser:
    return DROParser((RecipeArguments, DROConfig, ModelConfig, CountArguments))


def parse(argv: list[str], scratch: str) -> tuple:
    """The recipe's settings from ``argv`` (``--config`` and flags), run on CPU for ``--steps`` steps in ``scratch``
    with passages cut to ``--passage_tokens``, saving and evaluating nothing."""
    argv = [*argv, "--use_cpu", "true"]
    count = make_parser().parse_args_and_config(args=argv)[-1]
    tokens = str(count.passage_tokens)
    return make_parser().parse_args_and_config(args=[
        *argv, "--output_dir", scratch, "--max_steps", str(count.steps), "--save_strategy", "no", "--report_to", "none",
        "--eval_strategy", "no", "--logging_steps", "1", "--max_passage_tokens", tokens,
        "--generator_max_passage_tokens", tokens,
    ])


if __name__ == "__main__":
    with refusals_in_one_line("count_step_ops.py"), tempfile.TemporaryDirectory() as scratch:
        main(*parse(sys.argv[1:], scratch))
