"""What a run records about itself, so that resuming continues *that* run and a new run never overwrites an old one.

Every checkpoint (and the final save) holds ``dro_run.json``: the settings that define the run (the pipeline, the
estimator, m, the optimiser's settings, the seed, ...), what the two models are, and a fingerprint of the training
rows. Resuming compares it with the run being started and refuses, naming each setting that changed: a checkpoint of
K = 2 resumed with K = 3 would otherwise train on silently, mixing two different runs.

Execution settings — how long to train, how often to log, save or evaluate, the device and precision — may change
on resume; they do not change what a step computes.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import fields
from typing import Any

import torch
from peft import PeftModel

from .files import safetensors_problem
from .pipeline_config import PipelineConfig
from .run_folder import COMPLETE_MARKER, changed_since_saved

RUN_FILE = "dro_run.json"

# Inherited TrainingArguments/GRPOConfig fields that change what a step computes (DROConfig's own fields and the
# pipeline's are all run-defining, except the few listed in EXECUTION_FIELDS).
RUN_DEFINING_INHERITED = (
    "learning_rate", "weight_decay", "adam_beta1", "adam_beta2", "adam_epsilon", "optim", "lr_scheduler_type",
    "warmup_steps", "max_grad_norm", "per_device_train_batch_size", "gradient_accumulation_steps",
    "steps_per_generation", "num_generations", "temperature", "scale_rewards", "reward_weights", "seed",
    "disable_dropout", "entropy_coef",
)
EXECUTION_FIELDS = ("generator_batch_size", "selector_loss_forward", "generator_scoring", "overwrite_output_dir")


def run_defining_settings(args) -> dict[str, Any]:
    """The DROConfig values that must be equal for a checkpoint to be resumed."""
    from .config import DROConfig  # config imports the trainer's dependencies; keep this module light

    own = {f.name for f in fields(DROConfig)} - {f.name for f in fields(DROConfig.__mro__[1])}
    names = sorted((own | {f.name for f in fields(PipelineConfig)} | set(RUN_DEFINING_INHERITED))
                   - set(EXECUTION_FIELDS))
    return {name: _jsonable(getattr(args, name, None)) for name in names}


def model_identity(model: torch.nn.Module) -> dict[str, Any]:
    """Name, architecture and LoRA adapters of a model: what must not change between a checkpoint and its resume."""
    config = getattr(model, "config", None)
    shape = {key: getattr(config, key, None) for key in ("model_type", "hidden_size", "num_hidden_layers",
                                                           "vocab_size")}
    identity: dict[str, Any] = {"name_or_path": str(getattr(model, "name_or_path", "") or ""), **shape}
    if isinstance(model, PeftModel):
        identity["adapters"] = {
            name: {"r": c.r, "lora_alpha": c.lora_alpha, "target_modules": sorted(c.target_modules or [])}
            for name, c in model.peft_config.items()
        }
    return _jsonable(identity)


def dataset_fingerprint(dataset) -> str | None:
    """SHA-256 over every row's question, answers and candidate texts, in order (None without a dataset)."""
    if dataset is None:
        return None
    digest = hashlib.sha256()
    for question, answers, passages in zip(dataset["question"], dataset["answers"], dataset["passages"]):
        digest.update(json.dumps([question, answers, [p.get("text") for p in passages]]).encode())
    return digest.hexdigest()


def run_record(args, selector, generator, train_dataset) -> dict[str, Any]:
    """The content of ``dro_run.json``."""
    return {
        "settings": run_defining_settings(args),
        # each process draws its own questions: the count sets a step's batch, and each saved its own RNG state
        "world_size": args.world_size,
        "selector": model_identity(selector),
        "generator": model_identity(generator),
        "train_dataset": dataset_fingerprint(train_dataset),
    }


def write_run_record(record: dict[str, Any], folder: str) -> None:
    with open(os.path.join(folder, RUN_FILE), "w") as f:
        json.dump(record, f, indent=2)


def check_same_run(checkpoint: str, record: dict[str, Any]) -> None:
    """Refuse to resume ``checkpoint`` with a run that differs from the one that wrote it."""
    path = os.path.join(checkpoint, RUN_FILE)
    if not os.path.exists(path):
        raise ValueError(f"{checkpoint} has no {RUN_FILE}: it was not written by this version of dro-rl, so it "
                         "cannot be checked against this run; start a new run or resume with the version that wrote it")
    with open(path) as f:
        saved = json.load(f)
    if "world_size" not in saved:  # written before the process count was recorded
        record = {key: value for key, value in record.items() if key != "world_size"}
    changed = [f"{key}: checkpoint {old!r}, now {new!r}" + (f" (launch it with --num_processes {old})"
                                                             if key == "world_size" else "")
               for key, old, new in _differences(saved, record) if key not in EXECUTION_FIELDS]
    if changed:
        raise ValueError(f"cannot resume {checkpoint} with different settings:\n  " + "\n  ".join(changed) +
                         "\nresume with the checkpoint's settings, or start a new run in another output_dir")


def _differences(old: Any, new: Any, prefix: str = "") -> list[tuple[str, Any, Any]]:
    if isinstance(old, dict) and isinstance(new, dict):
        out = []
        for key in sorted(set(old) | set(new)):
            name = key if prefix in ("", "settings") else f"{prefix}.{key}"
            out += _differences(old.get(key), new.get(key), name)
        return out
    return [] if old == new else [(prefix, old, new)]


def _jsonable(value: Any) -> Any:
    return json.loads(json.dumps(value, default=str))


# ---------------------------------------------------------------------------------------------------------------------
# Checkpoints that can be trusted, and output folders that hold another run
# ---------------------------------------------------------------------------------------------------------------------


def checkpoint_problems(checkpoint: str) -> list[str]:
    """Why a checkpoint cannot be resumed: no completion marker, or a weights file that is truncated or unreadable."""
    if not os.path.exists(os.path.join(checkpoint, COMPLETE_MARKER)):
        return [f"{checkpoint} has no {COMPLETE_MARKER} marker (its save was interrupted)"]
    changed = changed_since_saved(checkpoint)
    problems = [f"{checkpoint} was changed since its save: {changed}"] if changed else []
    for root, _, files in os.walk(checkpoint):
        for name in sorted(files):
            if name.endswith(".safetensors"):
                problem = safetensors_problem(os.path.join(root, name))
                if problem:
                    problems.append(problem)
    return problems


def checkpoints(output_dir: str) -> list[str]:
    """``checkpoint-N`` folders of ``output_dir``, newest first."""
    if not os.path.isdir(output_dir):
        return []
    steps = [int(name.split("-", 1)[1]) for name in os.listdir(output_dir)
             if name.startswith("checkpoint-") and name.split("-", 1)[1].isdigit()]
    return [os.path.join(output_dir, f"checkpoint-{s}") for s in sorted(steps, reverse=True)]


def last_complete_checkpoint(output_dir: str, warn=None) -> str | None:
    """The newest checkpoint that can be resumed; newer broken ones are reported through ``warn`` and passed over."""
    for path in checkpoints(output_dir):
        problems = checkpoint_problems(path)
        if not problems:
            return path
        if warn is not None and os.path.exists(os.path.join(path, COMPLETE_MARKER)):
            warn(f"passing over {path}: " + "; ".join(problems))
    return None


def resolve_checkpoint(resume_from_checkpoint: str | bool | None, output_dir: str, warn=None) -> str | None:
    """A checkpoint path for ``True``/"true" (the newest usable one) or a path (checked); None for no resume."""
    if resume_from_checkpoint in (None, False, "", "false", "False"):
        return None
    if resume_from_checkpoint in (True, "true", "True"):
        path = last_complete_checkpoint(output_dir, warn)
        if path is None:
            raise ValueError(f"no complete checkpoint to resume from in {output_dir}")
        return path
    path = str(resume_from_checkpoint)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"resume_from_checkpoint: {path} is not a folder")
    problems = checkpoint_problems(path)
    if problems:
        raise ValueError(f"cannot resume from {path}: " + "; ".join(problems))
    step = os.path.basename(os.path.normpath(path)).split("-", 1)[-1]
    newer = [c for c in checkpoints(output_dir) if int(c.rsplit("-", 1)[1]) > int(step)] if step.isdigit() else []
    if newer and warn is not None:  # the Trainer saves over them as training passes their steps again
        warn(f"resuming from {path}: the newer {', '.join(os.path.basename(c) for c in reversed(newer))} in "
             f"{output_dir} will be replaced when training reaches their steps again")
    return path


# What a DRO run writes into its output_dir: checkpoints, the final models, and what the recipe adds beside them.
RUN_DATA_FILES = ("train.jsonl", "eval.jsonl", "skipped.json")  # what the data stage writes into data/
RUN_ARTEFACTS = ("selector", "generator", RUN_FILE, "pipeline.json", "trainer_state.json", "report.json",
                 "curves.png", "run_config.json", "data", "warmup", "eval_before.json", "eval_after.json",
                 "README.md", "final_complete")


CARD_TITLE = ": a DRO-trained retrieval-augmented pipeline"  # the title of dro_rl/templates/model_card.md


def foreign_readme(output_dir: str) -> bool:
    """Whether ``output_dir`` holds a README.md that is not a model card a run wrote (a user's own notes)."""
    path = os.path.join(output_dir, "README.md")
    if not os.path.isfile(path):
        return False
    with open(path, encoding="utf-8", errors="replace") as f:
        return CARD_TITLE not in f.read(4096)


def run_artefacts(output_dir: str, names: tuple[str, ...] = RUN_ARTEFACTS) -> list[str]:
    """The entries of ``output_dir`` that an earlier run wrote (checkpoints first). A README.md counts only when it
    is a run's model card."""
    if not os.path.isdir(output_dir):
        return []
    written = ("selector", "generator", "trainer_state.json", RUN_FILE)  # a checkpoint-N folder a run wrote holds one
    found = [os.path.basename(p) for p in reversed(checkpoints(output_dir))
             if any(os.path.exists(os.path.join(p, n)) for n in written)]
    return found + [n for n in names if os.path.exists(os.path.join(output_dir, n))
                    and not (n == "README.md" and foreign_readme(output_dir))]


def claim_output_dir(output_dir: str, resuming: bool, overwrite: bool, names: tuple[str, ...] = RUN_ARTEFACTS,
                     warn=None) -> None:
    """Refuse to start a new run over an earlier one unless ``overwrite``; with it, remove the earlier run's files.

    Only files a run writes are removed (never anything else in the folder), so that ``resume_from_checkpoint=True``
    can never pick up a checkpoint of the earlier run. A README.md a run did not write is refused either way: the
    final save writes the model card there.
    """
    if foreign_readme(output_dir):
        raise ValueError(f"{os.path.join(output_dir, 'README.md')} was not written by a dro-rl run, and the run's "
                         "model card is saved as README.md: move the file, or choose another output_dir")
    if resuming:
        return
    found = run_artefacts(output_dir, names)
    if not found:
        return
    proof = ("run_config.json", RUN_FILE, COMPLETE_MARKER, "selector", "generator")  # only a run writes these
    if not any(name.startswith("checkpoint-") or name in proof for name in found):
        raise ValueError(f"output_dir {output_dir} holds {', '.join(found)}, names a run writes, but no run's "
                         "record (run_config.json, dro_run.json, models): they are not a run's to replace or "
                         "remove; move them, or choose another output_dir")
    if not overwrite:
        listed = ", ".join(found[:6]) + (", ..." if len(found) > 6 else "")
        raise ValueError(
            f"output_dir {output_dir} already holds a run ({listed}): resume it with resume_from_checkpoint "
            "(--resume_from_checkpoint true), start over with overwrite_output_dir (--overwrite_output_dir true), "
            "or choose another output_dir"
        )
    if warn is not None:
        warn(f"overwrite_output_dir: removing the earlier run's {', '.join(found)} from {output_dir}")
    for name in found:
        path = os.path.join(output_dir, name)
        if name == "data":  # the one folder a user may have put files in (beside the rows): only the run's rows go
            for split in RUN_DATA_FILES:
                if os.path.exists(os.path.join(path, split)):
                    os.remove(os.path.join(path, split))
            kept = os.listdir(path)
            if kept and warn is not None:
                warn(f"overwrite_output_dir: kept {', '.join(sorted(kept))} in {path} (not written by a run)")
            if not kept:
                os.rmdir(path)
        elif os.path.isdir(path):
            shutil.rmtree(path)
        else:
            os.remove(path)
