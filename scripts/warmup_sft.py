"""Warm-up SFT before DRO, on TRL's SFTTrainer, in exactly the prompts DRO samples and scores.

    # generator: question + gold and retrieved passages -> answer (the paper mixes 2 gold + 3 retrieved)
    python scripts/warmup_sft.py --data outputs/retrieved/hotpot.jsonl --role generator \
        --model tiny:minilm --output_dir outputs/warmup/generator --max_steps 200
    # selector: a target ranking written with the canonical id tokens
    python scripts/warmup_sft.py --data outputs/retrieved/hotpot.jsonl --role selector --target retrieval \
        --model tiny:minilm --output_dir outputs/warmup/selector --max_steps 200

`--data` is canonical JSONL with candidates in retrieval order (scripts/retrieve.py writes it). `--target` is
`retrieval`, `gold_first` or `teacher` (`--teacher_rankings`: JSONL of {"id", "ranking": [passage ids]}). The model
and its tokenizer are saved to `output_dir`, ready for `scripts/train_rl.py --model_name_or_path`.
"""

from __future__ import annotations

import dro_rl  # noqa: F401  # first: it quiets bitsandbytes' CPU notice before peft or trl import bitsandbytes

import os
from dataclasses import dataclass, field
from typing import Literal

from trl import SFTConfig

from dro_rl.cli import refusals_in_one_line
from dro_rl.data import load
from dro_rl.models import load_model
from dro_rl.parser import DROParser
from dro_rl.pipeline_config import PipelineConfig
from dro_rl.recipe import say
from dro_rl.selector import IdGrammar
from dro_rl.warmup import (
    generator_sft_rows,
    run_sft,
    selector_sft_rows,
    read_teacher_rankings,
    selector_targets,
)


@dataclass
class WarmupArguments:
    data: str = field(metadata={"help": "Canonical JSONL, candidates in retrieval order."})
    role: Literal["selector", "generator"] = field(metadata={"help": "Which model to warm up."})
    model: str = field(default="tiny:minilm", metadata={"help": "Model name, path, or tiny:<tokenizer>."})
    target: Literal["retrieval", "gold_first", "teacher"] = field(
        default="retrieval", metadata={"help": "Selector target ranking."}
    )
    teacher_rankings: str | None = field(
        default=None,
        metadata={"help": "JSONL of {id, ranking} for `teacher`: per question id, passage ids best first — a "
                  "passage's `id`, or for a passage without one its 0-based position in the file's list."},
    )
    shuffle_candidates: bool = field(
        default=True, metadata={"help": "Present the selector's candidates shuffled (the target follows them)."}
    )
    limit: int | None = field(default=None, metadata={"help": "Use at most this many rows."})
    overwrite: bool = field(
        default=False, metadata={"help": "Save into an output_dir that is not empty (an earlier model is replaced)."}
    )

    def __post_init__(self):
        if (self.target == "teacher") != (self.teacher_rankings is not None):
            raise ValueError("--target teacher needs --teacher_rankings (a JSONL of {id, ranking}), and "
                             "--teacher_rankings is read only with --target teacher")
        if self.role == "generator" and self.teacher_rankings is not None:
            raise ValueError("--teacher_rankings is a selector target: the generator's warm-up reads gold passages")
        if ":" in self.data and not os.path.exists(self.data):  # "hotpotqa:path", as evaluate.py takes
            raise ValueError(f"--data {self.data}: warmup_sft.py reads canonical JSONL in retrieval order; convert "
                             f"first with scripts/retrieve.py --format {self.data.split(':', 1)[0]} (which ranks too)")


def main(args: WarmupArguments, sft_args: SFTConfig, pipeline: PipelineConfig):
    folder = sft_args.output_dir
    if not args.overwrite and os.path.isdir(folder) and os.listdir(folder):  # refused before training, not after
        raise FileExistsError(f"output_dir {folder} is not empty (an earlier warm-up?): pass --overwrite true to "
                              "save over it, or choose another output_dir")
    rows, stats = load(args.data, "canonical", limit=args.limit)
    say(stats.summary())  # on the main process only: each process runs this script
    if args.target == "gold_first" and args.role == "selector" and not any(any(r["gold"]) for r in rows):
        raise ValueError(f"--target gold_first: no row of {args.data} has gold passage labels, so the target would "
                         "be the retrieval order; use --target retrieval, or label the gold passages")
    if args.role == "selector":  # the targets (a teacher file's included) are checked before the model loads
        teacher = read_teacher_rankings(args.teacher_rankings) if args.teacher_rankings else None
        presented, rankings = selector_targets(rows, args.target, sft_args.seed, args.shuffle_candidates, teacher)
        if teacher is not None:  # a file covering more questions (train and dev, say) is fine, but said
            unused = len(set(teacher) - {str(r["id"]) for r in rows})
            say(f"teacher rankings: {len(teacher) - unused} used, {unused} for questions not in {args.data} "
                "(ignored)")
    model, tok = load_model(args.model, seed=sft_args.seed)
    if args.role == "generator":
        examples = generator_sft_rows(
            tok, pipeline.generator_prompt(), rows, pipeline.num_docs_selected, sft_args.seed,
        )
    else:
        grammar = IdGrammar(tok, max(len(r["passages"]) for r in rows))
        examples = selector_sft_rows(tok, grammar, pipeline.selector_prompt(), presented, rankings)
    trainer = run_sft(model, tok, examples, sft_args)
    trainer.save_model(sft_args.output_dir)
    pipeline.save_pipeline(sft_args.output_dir)  # the prompts it was warmed up on, for DRO and evaluation to match
    say(f"saved the warmed-up {args.role} to {sft_args.output_dir}")
    return trainer


def make_parser() -> DROParser:
    return DROParser((WarmupArguments, SFTConfig, PipelineConfig))


if __name__ == "__main__":
    with refusals_in_one_line("warmup_sft.py"):
        main(*make_parser().parse_args_and_config())
