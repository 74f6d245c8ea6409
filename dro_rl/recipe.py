"""The training recipe, stage by stage: data -> retrieval -> warm-up -> evaluate -> DRO -> evaluate -> report.

``scripts/train_rl.py`` (and ``dro-rl train``) call :func:`run_recipe`. Each stage writes what it produced into the
run folder (``output_dir``) atomically, so that a resumed run (``resume_from_checkpoint``) reuses every finished stage
instead of redoing it, and continues DRO from its checkpoint. Every setting is checked before the first stage starts,
so a wrong value stops the run in seconds rather than after retrieval and warm-up.

The run folder::

    run_config.json                     every setting of the run (script, training, model); written first
    data/train.jsonl, data/eval.jsonl   the rows, candidates in first-stage retrieval order      (stage "data")
    warmup/generator/, warmup/selector/ the warmed-up models                                      (stage "warmup")
    eval_before.json                    picks and answers before DRO                             (stage "before")
    checkpoint-N/                       DRO checkpoints: selector/, generator/, dro_run.json
    selector/, generator/               the trained pair                                         (stage "dro")
    eval_after.json, report.json, curves.png                                                     (stages "after", "report")
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any, Literal

import datasets
import torch
import transformers
from accelerate import PartialState
from datasets import Dataset, DatasetInfo
from trl import ModelConfig, get_peft_config, get_quantization_config

from .config import FP16_ON_CPU, DROConfig, check_field_types
from .data import check_data_file, check_dataset, load, write_jsonl
from .demo import WorldConfig, demo_tokenizer, make_split, tiny_llama
from .evaluation import reward_picks
from .files import claim_folder, file_sha256, read_json, readable_as_umask_allows, write_json, write_lines
from .models import BASE_IN_RUN, check_model_name, load_model, load_tokenizer
from .pipeline import compare, load_ranked, make_retriever, parse_spec, retrieval_order
from .report import build_report, write_report
from .resume import claim_output_dir, resolve_checkpoint, run_artefacts, run_defining_settings
from .selector import IdGrammar, passage_text
from .trainer import CandidateOrderWarning, DROTrainer
from .warmup import generator_sft_rows, run_sft, selector_sft_rows, selector_targets, warmup_config

DEMO_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "demo.yaml"
RUN_CONFIG = "run_config.json"
SKIPPED = "skipped.json"  # in data/ (resume.RUN_DATA_FILES: the data stage's files)
STEP_KEY = "dro_step"  # in eval_after.json: the DRO step of the models it evaluated


@dataclass
class RecipeArguments:
    """Options of the recipe around DRO: data, the demo world, warm-up. Training options are DROConfig's."""

    dataset: str = field(
        default="demo",
        metadata={"help": "`demo` (the embedded synthetic world), or `[format:]path` of training rows (formats: "
                  "dro_rl.data.FORMATS)."},
    )
    eval_dataset: str | None = field(
        default=None, metadata={"help": "`[format:]path` of evaluation rows (the demo makes its own)."}
    )
    corpus: str | None = field(default=None, metadata={"help": "Corpus to retrieve from for question-only data."})
    max_train_questions: int | None = field(default=None, metadata={"help": "Use at most this many training rows."})
    max_eval_questions: int | None = field(default=None, metadata={"help": "Use at most this many evaluation rows."})
    generator_warmup_steps: int = field(
        default=0, metadata={"help": "Generator SFT steps on gold + retrieved passages before DRO (0: none)."}
    )
    selector_warmup_steps: int = field(
        default=0, metadata={"help": "Selector SFT steps before DRO (0: none); the target is selector_warmup_target."}
    )
    selector_warmup_target: Literal["retrieval", "gold_first", "best_reward"] = field(
        default="retrieval",
        metadata={"help": "Selector warm-up target: `retrieval` (imitate the first-stage ranking; no gold labels), "
                  "`gold_first` (labelled passages first: supervised) or `best_reward` (the K passages under which "
                  "the warmed-up generator gives a training question's gold answer the highest likelihood — the "
                  "pick DRO's reward prefers, chosen one position at a time: the E-step's mode under a uniform "
                  "prior)."},
    )
    warmup_learning_rate: float = field(default=2e-5, metadata={"help": "Learning rate of both warm-ups."})
    warmup_batch_size: int = field(default=16, metadata={"help": "Batch size of both warm-ups."})
    demo_num_train: int = field(default=2000, metadata={"help": "Demo: training questions."})
    demo_num_eval: int = field(default=300, metadata={"help": "Demo: evaluation questions."})
    demo_num_candidates: int = field(default=8, metadata={"help": "Demo: N, candidates per question."})
    demo_two_hop_fraction: float = field(default=0.5, metadata={"help": "Demo: share of two-hop questions."})
    demo_num_people: int = field(default=200, metadata={"help": "Demo: people in the world."})
    demo_own_home_distractor: bool = field(
        default=True, metadata={"help": "Demo: two-hop candidates include the asked person's own home city."}
    )
    demo_hidden_size: int = field(default=64, metadata={"help": "Width of the demo's models and of `tiny:` models."})
    demo_num_layers: int = field(default=2, metadata={"help": "Depth of the demo's models and of `tiny:` models."})

    def __post_init__(self):
        check_field_types(self)
        for name in ("max_train_questions", "max_eval_questions"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("generator_warmup_steps", "selector_warmup_steps"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.warmup_batch_size < 1:
            raise ValueError(f"warmup_batch_size must be >= 1, got {self.warmup_batch_size}")
        if not (math.isfinite(self.warmup_learning_rate) and self.warmup_learning_rate > 0):
            raise ValueError(f"warmup_learning_rate must be a finite number > 0, got {self.warmup_learning_rate}")
        # The demo world: below these it loops for ever drawing distractors, or fails inside the generator
        for name in ("demo_num_train", "demo_num_eval", "demo_num_layers"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.demo_num_candidates < 2:
            raise ValueError(f"demo_num_candidates must be >= 2 (a two-hop question has two gold passages), got "
                             f"{self.demo_num_candidates}")
        if self.demo_num_people < self.demo_num_candidates:
            raise ValueError(f"demo_num_people must be >= demo_num_candidates ({self.demo_num_candidates}): each "
                             f"question's distractors are other people's facts; got {self.demo_num_people}")
        if not 0 <= self.demo_two_hop_fraction <= 1:
            raise ValueError(f"demo_two_hop_fraction is a share, in [0, 1]; got {self.demo_two_hop_fraction}")
        if self.demo_hidden_size < 8 or self.demo_hidden_size % 8:
            raise ValueError(f"demo_hidden_size must be a positive multiple of 8 (4 attention heads of an even "
                             f"width for rotary positions), got {self.demo_hidden_size}")
        if self.dataset != "demo" and self.eval_dataset is None and self.max_eval_questions is not None:
            raise ValueError("max_eval_questions needs an eval_dataset")


def with_default_config(argv: list[str]) -> list[str]:
    """The demo's settings (configs/demo.yaml) apply when no --config is given and the dataset is the demo; a run on
    the user's own data without --config gets DROConfig's documented defaults, never the demo's."""
    if any(a == "--config" or a.startswith("--config=") for a in argv) or {"-h", "--help"} & set(argv):
        return argv  # --help shows the documented defaults, not the demo's
    dataset = next((argv[i + 1] for i, a in enumerate(argv[:-1]) if a == "--dataset"), None)
    dataset = next((a.split("=", 1)[1] for a in argv if a.startswith("--dataset=")), dataset)
    if dataset not in (None, "demo"):
        return argv
    if not DEMO_CONFIG.exists():
        raise FileNotFoundError(f"the demo recipe {DEMO_CONFIG} is missing (it ships with the repository)")
    return ["--config", str(DEMO_CONFIG), *argv]


# ---------------------------------------------------------------------------------------------------------------------
# 0. Before any work: every setting, the output folder, the models, and what a resume must match
# ---------------------------------------------------------------------------------------------------------------------


def run_config(args: RecipeArguments, dro: DROConfig, model_args: ModelConfig) -> dict[str, Any]:
    """What run_config.json holds: every setting, the subset a resume must match, what ``auto`` settings chose, and
    the SHA-256 of each data file the run reads."""
    return {
        "script": asdict(args),
        "model": asdict(model_args),
        "training": json.loads(dro.to_json_string()),
        "run_defining": run_defining_settings(dro),
        "resolved": {"generator_scoring": "in_loss" if dro.scores_in_loss else "separate"},
        "data_files": data_file_hashes(args),
    }


def data_file_hashes(args: RecipeArguments) -> dict[str, str]:
    """SHA-256 of the data files behind ``dataset``, ``eval_dataset`` and ``corpus``: a resumed run reuses its own
    copies in ``data/``, so a file edited in place since would otherwise go unnoticed."""
    specs = {"dataset": args.dataset, "eval_dataset": args.eval_dataset, "corpus": args.corpus}
    return {name: file_sha256(parse_spec(spec)[1]) for name, spec in specs.items() if spec and spec != "demo"}


def say(message: str) -> None:
    """Print on the main process only: under accelerate launch every process runs the recipe, and the others would
    repeat each line, or say they reuse the data and evaluation the main process has just written for this run."""
    if PartialState().is_main_process:
        print(message, flush=True)


def use_ddp_timeout(dro: DROConfig) -> None:
    """Bound every wait on another process by ``ddp_timeout``, as on a GPU: the other processes wait at a barrier while
    the main one runs a stage alone (retrieval, the "before" evaluation). transformers creates the process group with
    it when DROConfig sets up its device, but not with ``use_cpu`` (gloo's 30 minutes whatever ``ddp_timeout``)."""
    if torch.distributed.is_initialized():
        torch.distributed.distributed_c10d._set_pg_timeout(timedelta(seconds=dro.ddp_timeout))


def is_resuming(dro: DROConfig) -> bool:
    return dro.resume_from_checkpoint not in (None, "", "false", "False")


def prepare(args: RecipeArguments, dro: DROConfig, model_args: ModelConfig) -> str | None:
    """Check what can be checked without data; claim the run folder or find the checkpoint to resume.

    Returns the checkpoint to resume from (None: DRO starts from step 0).
    """
    resuming = is_resuming(dro)
    if dro.eval_strategy != "no" and args.dataset != "demo" and not args.eval_dataset:
        strategy = getattr(dro.eval_strategy, "value", dro.eval_strategy)
        raise ValueError(f"eval_strategy: {strategy} evaluates during training: give --eval_dataset")
    if dro.share_base_model and (args.generator_warmup_steps or args.selector_warmup_steps):
        raise ValueError("share_base_model trains two adapters on one base: warm up with scripts/warmup_sft.py first "
                         "and set generator_warmup_steps / selector_warmup_steps to 0")
    if model_args.model_name_or_path is None and dro.generator_model_name_or_path is not None:
        raise ValueError(f"generator_model_name_or_path={dro.generator_model_name_or_path!r} without "
                         "model_name_or_path: with no selector model named, the recipe builds both tiny demo models "
                         "and would not read it; name the selector too (it may be the same model)")
    if dro.share_base_model and dro.generator_model_name_or_path not in (None, model_args.model_name_or_path):
        raise ValueError(f"share_base_model: the generator is an adapter on {model_args.model_name_or_path}, not "
                         f"{dro.generator_model_name_or_path}")
    if dro.share_base_model and not model_args.use_peft:
        raise ValueError("share_base_model needs LoRA adapters: set use_peft: true (and lora_r, ...)")
    # TRL's ModelConfig, from the same YAML (`model_name_or_path: 123`): its string settings only, since its
    # `lora_target_modules: list[str]` is narrower than what PEFT takes ("all-linear")
    check_field_types(model_args, ("model_name_or_path", "model_revision", "dtype", "attn_implementation"))
    no_gpu = dro.use_cpu or not torch.cuda.is_available()
    if dro.fp16 and no_gpu:  # DROTrainer refuses it too, but only after the warm-up
        raise ValueError(FP16_ON_CPU)
    models = [model_args.model_name_or_path, dro.generator_model_name_or_path or model_args.model_name_or_path]
    built = any(name is None or name.startswith("tiny:") for name in models)  # from a config, in float32
    if model_args.load_in_4bit or model_args.load_in_8bit:
        bits = 4 if model_args.load_in_4bit else 8
        if no_gpu:
            raise ValueError(f"load_in_{bits}bit: quantised (QLoRA) training needs a CUDA GPU (bitsandbytes' CPU "
                             "layers stop passing gradients after their first evaluation); on a CPU drop it")
        if built:
            raise ValueError(f"load_in_{bits}bit quantises a pretrained checkpoint as it loads; the demo's and "
                             "`tiny:` models are built from a config in float32 and would not be quantised")
    if built and model_args.dtype not in (None, "auto", "float32"):  # was recorded in run_config.json, not applied
        raise ValueError(f"dtype={model_args.dtype}: the demo's and `tiny:` models are built from a config in float32 "
                         "and would not be cast; leave dtype unset (mixed precision is bf16: true or fp16: true)")
    if model_args.use_peft and model_args.lora_r < 1:  # else PEFT's error after retrieval and the warm-up
        raise ValueError(f"lora_r must be >= 1, got {model_args.lora_r}")
    if model_args.use_peft and not 0 <= model_args.lora_dropout < 1:
        raise ValueError(f"lora_dropout must be in [0, 1), got {model_args.lora_dropout}")
    for name, spec in (("dataset", args.dataset), ("eval_dataset", args.eval_dataset), ("corpus", args.corpus)):
        if spec and spec != "demo":
            try:
                check_data_file(parse_spec(spec)[1])
            except FileNotFoundError as err:  # which setting names it (a --config file's, or a flag's)
                raise FileNotFoundError(f"{name}: {err}") from None
    for name in (model_args.model_name_or_path, dro.generator_model_name_or_path):
        if name is not None:
            check_model_name(name, dro.trust_remote_code)
    if dro.retriever == "dense":
        check_model_name(dro.retriever_model, setting="retriever_model")
    claim_folder(dro.output_dir)  # writable now, not after retrieval and warm-up
    earlier = run_artefacts(dro.output_dir)
    if not PartialState().is_main_process:
        pass  # the main process, which ran this first, has claimed the folder: its run_config.json is there now
    elif not resuming and earlier == [RUN_CONFIG]:  # no stage finished: nothing of it to keep
        print(f"{dro.output_dir} holds only the {RUN_CONFIG} of a start that stopped before its data stage finished: "
              "starting over", flush=True)
    elif not resuming and sorted(earlier) == sorted([RUN_CONFIG, "data"]):
        # A start refused after its data stage (a row with fewer than K candidates, a prompt too long for
        # max_prompt_length): the corrected command starts over; data/ may hold rows of other settings, so it goes.
        shutil.rmtree(os.path.join(dro.output_dir, "data"))
        print(f"{dro.output_dir} holds only the {RUN_CONFIG} and data/ of a start that stopped before its warm-up: "
              "starting over (data/ is made again)", flush=True)
    else:
        claim_output_dir(dro.output_dir, resuming, dro.overwrite_output_dir, warn=print)

    config = run_config(args, dro, model_args)
    saved_path = os.path.join(dro.output_dir, RUN_CONFIG)
    if resuming and os.path.exists(saved_path):
        changed = _changed_settings(read_json(saved_path), config)
        if changed:
            raise ValueError(f"cannot resume the run in {dro.output_dir} with different settings:\n  " +
                             "\n  ".join(changed) + "\nresume with the run's settings, or start a new run elsewhere")
    checkpoint = None
    if resuming:
        checkpoint = resolve_checkpoint(True if dro.resume_from_checkpoint in ("true", "True") else
                                        dro.resume_from_checkpoint, dro.output_dir, say) if _has_checkpoint(dro) \
            else None
        if checkpoint is None and os.path.isdir(os.path.join(dro.output_dir, "selector")):
            raise ValueError(f"no complete checkpoint to resume from in {dro.output_dir}: its run finished without "
                             "saving checkpoints (save_strategy); to train it longer, start from its models")
        if checkpoint is None and not earlier:
            say(f"resume: {dro.output_dir} holds no run yet: starting a new one")
        elif checkpoint is None:
            say(f"resume: no checkpoint in {dro.output_dir} yet; finished stages are reused, DRO starts at step 0")
        else:
            say(f"resume: DRO continues from {checkpoint}; finished stages are reused")
    write_json(config, saved_path, default=str)
    return checkpoint


def _has_checkpoint(dro: DROConfig) -> bool:
    explicit = dro.resume_from_checkpoint not in ("true", "True")
    return explicit or any(n.startswith("checkpoint-") for n in os.listdir(dro.output_dir))


def _changed_settings(saved: dict, current: dict) -> list[str]:
    """Settings of the recipe that differ from the saved run's (execution settings may change on resume)."""
    changed = []
    for section in ("script", "model", "run_defining", "data_files"):
        if section not in saved:  # a run folder written before the section existed
            continue
        old, new = saved[section], current[section]
        for key in sorted(set(old) | set(new)):
            if old.get(key) == new.get(key):
                continue
            if section == "data_files" and old.get(key) and new.get(key):
                changed.append(f"{key}: the file changed since the run read it (sha256 {old[key][:12]}…, now "
                               f"{new[key][:12]}…); the run would go on with its copy in data/")
            else:
                changed.append(f"{key}: run {old.get(key)!r}, now {new.get(key)!r}")
    return changed


# ---------------------------------------------------------------------------------------------------------------------
# 1. Data, in first-stage retrieval order
# ---------------------------------------------------------------------------------------------------------------------


def data_stage(args: RecipeArguments, dro: DROConfig) -> tuple[list[dict], list[dict]]:
    """Training and evaluation rows in retrieval order, read back from ``data/`` when the stage already ran.

    ``data/skipped.json`` says, per split, how many rows were kept and which were skipped and why
    (``on_bad_row: skip``): the report and the model card carry the counts once the console is gone.
    """
    folder = os.path.join(dro.output_dir, "data")
    if os.path.exists(os.path.join(folder, "train.jsonl")):  # written last: the stage finished
        say(f"data: reusing {folder}")
        rows = {split: load(os.path.join(folder, f"{split}.jsonl"))[0] if
                os.path.exists(os.path.join(folder, f"{split}.jsonl")) else [] for split in ("train", "eval")}
        return rows["train"], rows["eval"]
    retriever = make_retriever(dro.retriever, dro.retriever_model, progress=False if dro.disable_tqdm else None)
    skipped: dict[str, list[str]] = {"train": [], "eval": []}
    if args.dataset == "demo":
        world = WorldConfig(
            num_people=args.demo_num_people, num_candidates=args.demo_num_candidates,
            two_hop_fraction=args.demo_two_hop_fraction, own_home_distractor=args.demo_own_home_distractor,
            seed=dro.seed,
        )
        train, evals = make_split(world, args.demo_num_train, 1), make_split(world, args.demo_num_eval, 2)
        say(f"retrieval: ranking the candidates of {len(train) + len(evals)} demo questions")
        train, evals = retrieval_order(train, retriever), retrieval_order(evals, retriever)
    else:
        def ranked(spec: str, limit: int | None, split: str) -> list[dict]:
            _, rows, stats = load_ranked(spec, retriever, args.corpus, dro.top_n, dro.output_dir,
                                         on_error=dro.on_bad_row, limit=limit,
                                         retriever_name=f"{dro.retriever}:{dro.retriever_model}")
            skipped[split] += stats.skipped
            return rows

        train = ranked(args.dataset, args.max_train_questions, "train")
        evals = ranked(args.eval_dataset, args.max_eval_questions, "eval") if args.eval_dataset else []

    def checked(rows: list[dict], name: str, split: str) -> list[dict]:
        """K candidates per row (and the trainer's other row checks) now, not after the warm-up and the "before"
        evaluation; ``on_bad_row: skip`` drops and counts the bad rows."""
        rows, stats = check_dataset(rows, dro.num_docs_selected, dro.on_bad_row, name=name)
        if stats.skipped:
            say(stats.summary())
        skipped[split] += stats.skipped
        return rows

    demo = args.dataset == "demo"
    train = checked(train, "demo training" if demo else parse_spec(args.dataset)[1], "train")
    if evals:
        evals = checked(evals, "demo evaluation" if demo else parse_spec(args.eval_dataset)[1], "eval")
    limits = {"train": None, "eval": None} if demo else {"train": args.max_train_questions,
                                                         "eval": args.max_eval_questions}
    write_json({split: {"kept": len(rows), "skipped": len(skipped[split]), "reasons": skipped[split],
                        "read_limit": limits[split]}
                for split, rows in (("train", train), ("eval", evals))}, os.path.join(folder, SKIPPED))
    eval_path = os.path.join(folder, "eval.jsonl")
    if evals:
        write_jsonl(evals, eval_path)  # each file atomically, train.jsonl last: it marks the stage as finished
    elif os.path.exists(eval_path):
        os.remove(eval_path)  # an interrupted earlier attempt's, not this run's
    write_jsonl(train, os.path.join(folder, "train.jsonl"))
    return load(os.path.join(folder, "train.jsonl"))[0], (load(os.path.join(folder, "eval.jsonl"))[0] if evals
                                                             else [])


# ---------------------------------------------------------------------------------------------------------------------
# 2. Models, and the warm-up SFT of either
# ---------------------------------------------------------------------------------------------------------------------


def build_models(args: RecipeArguments, dro: DROConfig, model_args: ModelConfig, rows: list[dict]):
    """(selector, tokenizer, generator, generator tokenizer): the demo's tiny models, or loaded by name; a model the
    warm-up stage already trained is read from ``warmup/``. With ``share_base_model`` the generator is None: the
    trainer puts both adapters on the selector's base."""
    if model_args.model_name_or_path is None:
        n = max(len(r["passages"]) for r in rows)
        tok = demo_tokenizer(rows, n, dro.num_docs_selected)
        if args.dataset != "demo":  # the demo's models on a user's data: say so, it is no model that reads
            say(f"models: no --model_name_or_path, so both are the demo's tiny random models ({args.demo_num_layers} "
                f"layers, {args.demo_hidden_size} wide) over a {len(tok)}-word tokenizer of this data: a smoke run. "
                "Name a model (e.g. --model_name_or_path smollm2-135m) to train a pretrained one")

        def demo_model(role: str, seed: int):
            warmed = _warmed_up(dro, role, "")
            return warmed or tiny_llama(len(tok), hidden=args.demo_hidden_size, layers=args.demo_num_layers,
                                        heads=4, seed=seed, pad_id=tok.pad_token_id, eos_id=tok.eos_token_id)

        generator = None if dro.share_base_model else demo_model("generator", dro.seed + 1)
        return demo_model("selector", dro.seed), tok, generator, tok
    init = dict(dro.model_init_kwargs or {}, dtype=model_args.dtype, revision=model_args.model_revision,
                trust_remote_code=dro.trust_remote_code)
    if model_args.attn_implementation is not None:
        init["attn_implementation"] = model_args.attn_implementation
    quantization = get_quantization_config(model_args)
    if quantization is not None:
        init["quantization_config"] = quantization
    size = dict(hidden_size=args.demo_hidden_size, num_layers=args.demo_num_layers)

    def named_model(role: str, name: str, seed: int):
        warmed = _warmed_up(dro, role, name, seed, **size, **init)
        return (warmed, load_tokenizer_of(dro, role)) if warmed is not None else load_model(name, seed, **size, **init)

    selector, tok = named_model("selector", model_args.model_name_or_path, dro.seed)
    if dro.share_base_model:
        return selector, tok, None, tok
    generator, gtok = named_model("generator", dro.generator_model_name_or_path or model_args.model_name_or_path,
                                  dro.seed + 1)
    return selector, tok, generator, gtok


def _warmed_up(dro: DROConfig, role: str, name: str, seed: int = 0, **init):
    """The model the warm-up stage saved for ``role``, if that stage already ran (else None).

    It keeps the name of the model it was warmed up from, which is what the run's record (dro_rl.resume) calls it,
    and its folder in the run (``BASE_IN_RUN``), which is what adapters trained on it name as their base.
    """
    saved = os.path.join(dro.output_dir, "warmup", role)
    if not os.path.isdir(saved):
        return None
    model = load_model(saved, seed, **init)[0]
    # A `tiny:` model is built from a config and carries no name (load_model): a resumed run must record the same.
    model.name_or_path = model.config.name_or_path = "" if name.startswith("tiny:") else name
    setattr(model, BASE_IN_RUN, os.path.join("warmup", role))
    return model


def load_tokenizer_of(dro: DROConfig, role: str):
    return load_tokenizer(os.path.join(dro.output_dir, "warmup", role), dro.trust_remote_code)


def warmup_stage(args: RecipeArguments, dro: DROConfig, selector, tok, generator, gtok, train_rows, grammar) -> None:
    """Generator SFT on gold + retrieved passages; optional selector SFT. Each warmed-up model is saved to warmup/."""
    def sft(role: str, model, tokenizer, make_rows: Callable[[], list[dict]], steps: int) -> None:
        saved = os.path.join(dro.output_dir, "warmup", role)
        if steps <= 0:
            return
        if os.path.isdir(saved):
            say(f"warm-up: reusing the {role} in {saved}")
            return
        say(f"warm-up: {role} SFT, {steps} step{'s' if steps != 1 else ''}")
        config = warmup_config(os.path.join(dro.output_dir, "warmup", f"{role}-trainer"), steps,
                               args.warmup_batch_size, args.warmup_learning_rate, dro)
        run_sft(model, tokenizer, make_rows(), config)
        state = PartialState()  # under accelerate launch every process trained; one writes, the others wait for it
        if state.is_main_process:
            tmp = saved + ".tmp"
            shutil.rmtree(tmp, ignore_errors=True)
            model.save_pretrained(tmp, safe_serialization=True)
            tokenizer.save_pretrained(tmp)
            readable_as_umask_allows(tmp)
            os.replace(tmp, saved)
            shutil.rmtree(os.path.join(dro.output_dir, "warmup", f"{role}-trainer"), ignore_errors=True)
        state.wait_for_everyone()
        setattr(model, BASE_IN_RUN, os.path.join("warmup", role))  # what the DRO adapters on it must name

    def selector_rows() -> list[dict]:
        picks = None
        if args.selector_warmup_target == "best_reward":  # read from the generator just warmed up
            say(f"warm-up: the selector's targets are the reward's best K = {dro.num_docs_selected} of each "
                "training question's passages, scored by the generator")
            picks = reward_picks(train_rows, dro.num_docs_selected, generator, gtok, dro.generator_prompt(),
                                 dro.per_device_eval_batch_size, progress=not dro.disable_tqdm)
            # What the selector is taught, beside it: ids as the selector writes them, in the rows' retrieval order.
            write_lines(({"id": r["id"], "question": r["question"], "target": " > ".join(f"[{i + 1}]" for i in p),
                          "passages": [passage_text(r["passages"][i]) for i in p]} for r, p in zip(train_rows, picks)),
                        os.path.join(dro.output_dir, "warmup", "selector_targets.jsonl"))
        presented, rankings = selector_targets(train_rows, args.selector_warmup_target, dro.seed, picks=picks)
        return selector_sft_rows(tok, grammar, dro.selector_prompt(), presented, rankings)

    if generator is not None:
        sft("generator", generator, gtok,
            lambda: generator_sft_rows(gtok, dro.generator_prompt(), train_rows, dro.num_docs_selected, dro.seed),
            args.generator_warmup_steps)
    sft("selector", selector, tok, selector_rows, args.selector_warmup_steps)


# ---------------------------------------------------------------------------------------------------------------------
# 3 and 5. Greedy evaluation of the pipeline: random, retrieval order, selector, oracle
# ---------------------------------------------------------------------------------------------------------------------


def evaluation_stage(name: str, dro: DROConfig, eval_rows, selector, tok, grammar, generator, gtok,
                     step: int | None = None) -> dict:
    """``compare()`` on the evaluation rows, saved as ``eval_<name>.json`` and read back when it exists — for the
    "after" evaluation only while it was made with the models of DRO step ``step`` (a resumed or longer run has new
    final models, so it is evaluated again)."""
    if not eval_rows:
        return {}
    path = os.path.join(dro.output_dir, f"eval_{name}.json")
    if os.path.exists(path):
        saved = read_json(path)
        if saved.get(STEP_KEY) == step:
            say(f"evaluation ({name} DRO): reusing {path}")
            return saved
        say(f"evaluation ({name} DRO): {path} was made with the models of step {saved.get(STEP_KEY)}, these are "
            f"step {step}: evaluating again")
    say(f"evaluation ({name} DRO): {len(eval_rows)} questions")
    results = compare(eval_rows, selector, tok, grammar, dro.selector_prompt(), generator, gtok,
                      dro.generator_prompt(), seed=dro.seed, max_new_tokens=dro.max_answer_tokens,
                      batch_size=dro.per_device_eval_batch_size, progress=not dro.disable_tqdm)
    if step is not None:
        results[STEP_KEY] = step
    if dro.process_index == 0:
        write_json(results, path, default=str)
    return results


# ---------------------------------------------------------------------------------------------------------------------
# 4. DRO
# ---------------------------------------------------------------------------------------------------------------------


def dro_stage(args: RecipeArguments, dro: DROConfig, model_args: ModelConfig, selector, tok, generator, gtok,
              train_rows, eval_rows, checkpoint: str | None) -> DROTrainer:
    """DRO from step 0 or from ``checkpoint``, then the final save (the run folder of dro_rl.run_folder)."""
    columns = ("question", "answers", "passages", "gold")
    as_dataset = lambda rows, name: Dataset.from_list(  # noqa: E731  (the name is what the model card cites)
        [{c: r[c] for c in columns} for r in rows], info=DatasetInfo(dataset_name=name))
    peft_config = get_peft_config(model_args)
    with warnings.catch_warnings():  # the data stage put every row in the retriever's order, as pipeline.json says
        warnings.simplefilter("ignore", CandidateOrderWarning)
        trainer = DROTrainer(
            model=selector, generator=generator, args=dro, train_dataset=as_dataset(train_rows, args.dataset),
            eval_dataset=as_dataset(eval_rows, args.eval_dataset) if eval_rows else None,
            processing_class=tok, generator_processing_class=gtok,
            peft_config=peft_config, generator_peft_config=peft_config,
        )
    trainer.train(resume_from_checkpoint=checkpoint)
    trainer.save_model()
    return trainer


# ---------------------------------------------------------------------------------------------------------------------
# 6. The report
# ---------------------------------------------------------------------------------------------------------------------


def run_recipe(args: RecipeArguments, dro: DROConfig, model_args: ModelConfig) -> dict:
    """data -> retrieval -> warm-up -> evaluate -> DRO -> evaluate -> report; finished stages are reused on resume."""
    start = time.time()
    # Under accelerate launch every process runs the recipe. The stages that write the run folder without a
    # collective run on the main process first; the others then find its files and reuse them, as a resume does.
    use_ddp_timeout(dro)
    if dro.disable_tqdm:  # also transformers' own bars (loading and writing weights) and datasets' (map)
        transformers.utils.logging.disable_progress_bar()
        datasets.disable_progress_bars()
    first = PartialState().main_process_first
    resumed = is_resuming(dro) and bool(run_artefacts(dro.output_dir))  # else a resume flag on a fresh folder
    with first():
        checkpoint = prepare(args, dro, model_args)
    torch.manual_seed(dro.seed)

    with first():
        train_rows, eval_rows = data_stage(args, dro)                                                 # 1, retrieval
    dro.check_enough_questions(len(train_rows))  # before the models load and the warm-up trains
    selector, tok, generator, gtok = build_models(args, dro, model_args, train_rows + eval_rows)
    grammar = IdGrammar(tok, max(len(r["passages"]) for r in train_rows + eval_rows))
    dro.check_prompts_fit(tok, gtok, train_rows + eval_rows)  # before the warm-up and the "before" evaluation
    warmup_stage(args, dro, selector, tok, generator, gtok, train_rows, grammar)                       # 2
    with first():
        before = evaluation_stage("before", dro, eval_rows, selector, tok, grammar, generator or selector, gtok)  # 3

    trainer = dro_stage(args, dro, model_args, selector, tok, generator, gtok, train_rows, eval_rows,  # 4
                        checkpoint)
    unwrap = trainer.accelerator.unwrap_model
    with first():
        after = evaluation_stage("after", dro, eval_rows, unwrap(trainer.model), tok, grammar,            # 5
                                 unwrap(trainer.generator), gtok, step=trainer.state.global_step)

    skipped = os.path.join(dro.output_dir, "data", SKIPPED)  # absent from a run folder written before it existed
    report = build_report(before, after, time.time() - start, read_json(os.path.join(dro.output_dir, RUN_CONFIG)),
                          read_json(skipped) if os.path.exists(skipped) else None, resumed=resumed)  # 6
    if trainer.accelerator.is_main_process:
        table = write_report(report, trainer.state.log_history, dro.output_dir)
        shown = table if eval_rows else ("no evaluation set (give --eval_dataset): the run was trained, not "
                                         "evaluated; curves.png shows the training metrics")
        print(f"\n{shown}\n\nwall time {report['wall_seconds']:.0f} s" +
              (" (this process, which resumed the run: the earlier processes' time is not in it)"
               if report["resumed"] else "") + f"; report.json, curves.png and the model card "
              f"README.md in {dro.output_dir}", flush=True)
    trainer.create_model_card()  # now with the report's figures
    if dro.push_to_hub:
        trainer.push_to_hub(commit_message="End of training")
    return report
