"""A run folder: what a DRO save holds, how it is written without ever mixing two saves, and how it is read.

Layout (the final save in ``output_dir`` and every ``checkpoint-N`` alike)::

    selector/  generator/      the two models: full weights or LoRA adapters, each with its tokenizer
    selector_base/ ...         only for LoRA on a base no name can rebuild (built from a config, or ``tiny:``)
    pipeline.json              the PipelineConfig the models were trained with (K, prompt budgets, retriever)
    trainer_state.json         the Trainer's state and log history
    README.md                  the model card (final save)
    checkpoint_complete        written last: a folder without it is an interrupted save and is never read; it
                               records the save's files, so a folder changed since is refused too

The final save is written into ``_saving/`` beside the previous save, then swapped in: the marker is removed first,
the new entries replace the old ones, and the marker is written last. A kill at any point leaves either the previous
complete save or a folder without the marker, which every reader refuses — never a new ``selector/`` beside an old
``generator/`` that looks complete.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import warnings
from collections.abc import Collection, Iterable, Sequence
from dataclasses import fields

import yaml
from transformers import HfArgumentParser

from .files import atomic_write, file_sha256
from .models import GENERATOR, SELECTOR
from .pipeline_config import PipelineConfig

COMPLETE_MARKER = "checkpoint_complete"
STAGING, REPLACED = "_saving", "_replaced"  # leading "_": Trainer.push_to_hub does not upload them
TRAINER_STATE = "trainer_state.json"
SHARED_BASE = "base"


def base_dir(role: str) -> str:
    """Where the base of ``role``'s own LoRA adapter is saved when no name can rebuild it (``SHARED_BASE``: the one
    base of both adapters; dro_rl.run_models.name_adapter_base)."""
    return f"{role}_base"


# A save that does not write one of these drops the previous save's, so no unused base lingers beside new models.
BASE_DIRS = (SHARED_BASE, base_dir(SELECTOR), base_dir(GENERATOR))
# Files a run writes after its final save (the end-of-run report and curves): they describe the models of the save
# they were written after, so a new save of other weights drops them rather than leave them beside the new models.
RUN_RESULTS = ("report.json", "curves.png")

# Settings that decide the exact token ids the models read: evaluating with other values than the run's measures
# a different pipeline (issue 14: EM 0.300 instead of 0.700 on the demo), so a flag that contradicts them is refused.
PROMPT_SETTINGS = (
    "num_docs_selected", "max_passage_tokens", "max_prompt_length", "generator_max_passage_tokens",
    "generator_max_prompt_length", "repeat_ids", "use_chat_template",
)
# Settings that choose the candidates or the answer length, not the prompt format: a legitimate experiment on a run
# (another first-stage retriever, a deeper corpus search, longer answers), so a contradicting flag is only warned.
EXPERIMENT_SETTINGS = ("retriever", "retriever_model", "top_n", "max_answer_tokens")


# What the marker records file by file: the models and the pipeline they read (the model card and the report are
# rewritten after a save); a checkpoint's marker adds its other files (saved_files(whole=True)).
SAVED_ENTRIES = (SELECTOR, GENERATOR, *BASE_DIRS, "pipeline.json")


HASHED_BELOW = 1 << 20  # settings, configs and tokenizers are hashed too (an edit may keep the size); weights not


def saved_files(folder: str, whole: bool = False) -> dict[str, dict]:
    """Size (and for files under 1 MiB the SHA-256) of every file of the save's ``SAVED_ENTRIES`` in ``folder``, by
    path relative to it. ``whole`` (a checkpoint, which resume reads entire): every other file too — the size of
    the optimizer, scheduler and RNG states, the presence of the JSON files the Trainer may rewrite."""
    record = {}
    if whole:
        for root, _, names in os.walk(folder):
            for name in names:
                path = os.path.join(root, name)
                if name != COMPLETE_MARKER:
                    record[os.path.relpath(path, folder)] = {} if name.endswith(".json") else {
                        "size": os.path.getsize(path)}
    for entry in SAVED_ENTRIES:
        top = os.path.join(folder, entry)
        paths = [top] if os.path.isfile(top) else [os.path.join(root, name) for root, _, names in os.walk(top)
                                                   for name in names]
        for path in paths:
            size = os.path.getsize(path)
            record[os.path.relpath(path, folder)] = {"size": size, **(
                {"sha256": file_sha256(path)} if size < HASHED_BELOW else {})}
    return dict(sorted(record.items()))


def mark_complete(folder: str, global_step: int, whole: bool = False) -> None:
    """Write the completion marker (atomically), the last file of any save: the step, and the size of each file of
    the models (``whole``: of the checkpoint), so that a reader can tell a folder changed since (a file deleted or
    cut) from a complete save."""
    files = saved_files(folder, whole)  # before the marker's own temporary file exists
    with atomic_write(os.path.join(folder, COMPLETE_MARKER)) as f:
        json.dump({"global_step": global_step, "files": files}, f, indent=1)


def is_complete(folder: str) -> bool:
    return os.path.exists(os.path.join(folder, COMPLETE_MARKER))


def changed_since_saved(folder: str) -> str | None:
    """What in ``folder`` differs from what its completion marker recorded, or None. A marker of an earlier dro-rl
    holds the step alone and records no files."""
    with open(os.path.join(folder, COMPLETE_MARKER), encoding="utf-8", errors="replace") as f:
        text = f.read()
    try:
        record = json.loads(text)
    except ValueError:
        return f"its {COMPLETE_MARKER} marker is not one a save writes ({text[:40]!r})"
    if isinstance(record, int):
        return None
    if not isinstance(record, dict) or not isinstance(record.get("files"), dict):
        return f"its {COMPLETE_MARKER} marker is not one a save writes ({text[:40]!r})"
    for name, saved in record["files"].items():
        path = os.path.join(folder, name)
        if not os.path.isfile(path):
            return f"{name} is missing"
        if "size" in saved and os.path.getsize(path) != saved["size"]:
            return f"{name} has {os.path.getsize(path)} bytes where the save wrote {saved['size']}"
        if "sha256" in saved and file_sha256(path) != saved["sha256"]:
            return f"{name} is not the file the save wrote (edited since?)"
    return None


def check_complete(folder: str) -> None:
    """Refuse a folder whose save did not finish (or that no DRO save wrote), naming what to do instead."""
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"run folder not found: {folder}")
    if not is_complete(folder):
        raise ValueError(
            f"{folder} has no '{COMPLETE_MARKER}' marker: its last save did not finish (the process was killed while "
            "saving) or it is not a dro-rl run/checkpoint folder. Its selector/ and generator/ may come from two "
            "different saves; use the newest complete checkpoint-N inside it, or save again."
        )
    missing = [role for role in (SELECTOR, GENERATOR) if not os.path.isdir(os.path.join(folder, role))]
    if missing:  # a complete save has both: something removed them since
        raise FileNotFoundError(f"run folder {folder} has no {' or '.join(f'{m}/' for m in missing)} although its save "
                                "finished: it was changed since; use a complete checkpoint-N inside it, or save again")
    changed = changed_since_saved(folder)
    if changed:  # read anyway, a deleted tokenizer file failed as "install sentencepiece", a config as "model_type"
        raise ValueError(f"run folder {folder} was changed since its save finished: {changed}; use a complete "
                         "checkpoint-N inside it, or save again")


def check_model_folder(path: str) -> None:
    """Refuse a model folder that sits in a run folder (beside ``pipeline.json``) whose save did not finish — or that
    such a save has not written yet (a kill mid-save can leave a run folder without its ``selector/``)."""
    parent = os.path.dirname(os.path.normpath(path))
    if os.path.exists(os.path.join(parent, "pipeline.json")):
        check_complete(parent)


def publish(staging: str, folder: str, global_step: int, stale: Sequence[str] = ()) -> None:
    """Move every entry of ``staging`` into ``folder`` as one save, replacing what was there.

    ``stale``: names in ``folder`` that describe the replaced save (e.g. its report) and go with it.
    """
    os.makedirs(folder, exist_ok=True)
    marker = os.path.join(folder, COMPLETE_MARKER)
    if os.path.exists(marker):
        os.remove(marker)  # from here until the new marker, readers refuse the folder
    replaced = os.path.join(folder, REPLACED)
    shutil.rmtree(replaced, ignore_errors=True)
    os.makedirs(replaced)
    written = sorted(os.listdir(staging))
    for name in written:
        target = os.path.join(folder, name)
        if os.path.lexists(target):
            os.replace(target, os.path.join(replaced, name))
        os.replace(os.path.join(staging, name), target)
    for name in [*stale, *(d for d in BASE_DIRS if d not in written)]:
        if os.path.lexists(os.path.join(folder, name)):
            os.replace(os.path.join(folder, name), os.path.join(replaced, name))
    mark_complete(folder, global_step)
    shutil.rmtree(replaced, ignore_errors=True)
    shutil.rmtree(staging, ignore_errors=True)


def stale_results(folder: str, since: float) -> list[str]:
    """The ``RUN_RESULTS`` in ``folder`` written before ``since`` (a timestamp): a previous run's, not this one's."""
    return [name for name in RUN_RESULTS
            if os.path.exists(os.path.join(folder, name)) and os.path.getmtime(os.path.join(folder, name)) < since]


# ---------------------------------------------------------------------------------------------------------------------
# Settings: read from the folder; a command-line flag that contradicts them is refused or warned about by name
# ---------------------------------------------------------------------------------------------------------------------


def given_settings(argv: Iterable[str], dataclass_types: Sequence[type] = ()) -> set[str]:
    """Names of the PipelineConfig fields that ``argv`` sets, on the command line or in its ``--config`` YAML.

    Parsed with the real field definitions — PipelineConfig's and those of the command's other ``dataclass_types``,
    so that an option resolves as the command resolves it (``--generator`` is the command's own flag, not an
    abbreviation of ``--generator_max_passage_tokens``; ``--no_use_chat_template`` and abbreviations count) — with
    every default suppressed: what remains was given.
    """
    argv = list(argv)
    parser = HfArgumentParser([*dataclass_types, PipelineConfig])
    for action in parser._actions:
        if action.dest != "help":
            action.default, action.required = argparse.SUPPRESS, False
    pipeline_fields = {f.name for f in fields(PipelineConfig)}
    given = set(vars(parser.parse_known_args(argv)[0])) & pipeline_fields
    if "--config" in argv and argv.index("--config") + 1 < len(argv):
        with open(argv[argv.index("--config") + 1]) as f:
            given |= set(yaml.safe_load(f) or {}) & pipeline_fields
    return given


def run_settings(folder: str, requested: PipelineConfig, given: Collection[str]) -> PipelineConfig:
    """The pipeline settings saved in ``folder``; ``given`` names the fields the user set in ``requested``.

    A given prompt setting (``PROMPT_SETTINGS``) that differs from the saved one is an error; a given retrieval or
    answer-length setting (``EXPERIMENT_SETTINGS``) is honoured, with a warning that it departs from the run.
    """
    saved = PipelineConfig.load_pipeline(folder)
    path = os.path.join(folder, "pipeline.json")
    differs = [name for name in given if getattr(requested, name) != getattr(saved, name)]
    refused = [name for name in PROMPT_SETTINGS if name in differs]
    if refused:
        raise ValueError(
            "; ".join(f"--{n} {getattr(requested, n)!r} contradicts {path} ({n}: {getattr(saved, n)!r})" for n in refused)
            + ". The models were trained with the saved values: drop these flags (evaluating other prompts than the "
            "run's measures a different pipeline)."
        )
    values = saved.pipeline_dict()
    departing = [n for n in EXPERIMENT_SETTINGS if n in differs]
    PipelineConfig(**{**values, **{n: getattr(requested, n) for n in departing}}).check_pipeline()  # before a warning
    for name in departing:
        warnings.warn(f"--{name} {getattr(requested, name)!r} departs from the run's {name}: "
                      f"{getattr(saved, name)!r} ({path}); results will not match the run's own report", stacklevel=2)
        values[name] = getattr(requested, name)
    return PipelineConfig.from_dict(values, path)
