"""Train a selector and a generator jointly with DRO, then compare selections before and after.

    python scripts/train_rl.py                                   # the embedded demo (configs/demo.yaml)
    accelerate launch scripts/train_rl.py --config configs/demo.yaml
    accelerate launch scripts/train_rl.py --config configs/<recipe>.yaml --max_steps 100   # flags override YAML
    python scripts/train_rl.py --config configs/<recipe>.yaml --resume_from_checkpoint true  # continue a run

Stages (dro_rl.recipe): data -> retrieval -> warm-up -> evaluate -> DRO -> evaluate -> report.json, curves.png and a
printed table. Each stage's output is kept in output_dir, so a resumed run skips the stages that finished.
"""

from __future__ import annotations

import sys

from accelerate import PartialState
from trl import ModelConfig

from dro_rl import DROConfig
from dro_rl.cli import COMMANDS, refusals_in_one_line
from dro_rl.parser import DROParser
from dro_rl.recipe import RecipeArguments, run_recipe, with_default_config

main = run_recipe


def make_parser(subparsers=None) -> DROParser:
    dataclass_types = (RecipeArguments, DROConfig, ModelConfig)
    if subparsers is not None:
        return subparsers.add_parser("dro", help="Train with DRO", dataclass_types=dataclass_types)
    return DROParser(dataclass_types)


if __name__ == "__main__":
    with refusals_in_one_line("train_rl.py", COMMANDS["train"].after_interrupt):
        main(*make_parser().parse_args_and_config(args=with_default_config(sys.argv[1:])))
    PartialState().destroy_process_group()  # a clean exit under accelerate launch / torchrun (no gloo/NCCL abort)
