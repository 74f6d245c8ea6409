"""The model card of a run (``README.md``): both models and their base, data, recipe, results, how to use it.

Built with huggingface_hub's ``ModelCard.from_template``, the machinery TRL's ``generate_model_card`` uses, from a
template of our own: TRL's template describes one fine-tuned causal LM and offers ``pipeline("text-generation")``,
which does not describe a selector/generator pair.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from typing import Any

from huggingface_hub import ModelCard, ModelCardData
from peft import PeftModel

from .files import read_json
from .models import BASE_IN_RUN
from .packaged_models import PACKAGED_MODELS
from .pipeline_config import PipelineConfig
from .report import format_table
from .selector import passage_text

TEMPLATE = os.path.join(os.path.dirname(__file__), "templates", "model_card.md")
EXAMPLE_WORDS = 40  # each example passage in the quick start is cut to this many words

DRO_CITATION = """@misc{shi2025dro,
  title         = {{Direct Retrieval-augmented Optimization: Synergizing Knowledge Selection and Language Models}},
  author        = {Zhengliang Shi and Lingyong Yan and Weiwei Sun and Yue Feng and Pengjie Ren and Xinyu Ma and
                   Shuaiqiang Wang and Dawei Yin and Maarten de Rijke and Zhaochun Ren},
  year          = {2025},
  eprint        = {2505.03075},
  archivePrefix = {arXiv},
  primaryClass  = {cs.IR},
  url           = {https://arxiv.org/abs/2505.03075}
}"""


@dataclass
class ModelSummary:
    """One row of the card's model table."""

    role: str
    kind: str
    base: str
    hub_base: str | None  # the base's Hub id, for the card's metadata (None: local, or no pretrained base)


def summarize(model, role: str, adapter_name: str, saved_base_dir: str) -> ModelSummary:
    """What is saved for ``role`` and what it was trained from.

    ``saved_base_dir``: where the save put a base no name can rebuild (``dro_rl.run_models.name_adapter_base``).
    """
    if isinstance(model, PeftModel):
        lora = model.peft_config[adapter_name]
        size = sum(p.numel() for n, p in model.named_parameters() if f".{adapter_name}." in n)
        kind = f"LoRA adapter (r={lora.r}, alpha={lora.lora_alpha}; {size:,} parameters)"
        name = model.get_base_model().name_or_path
        arch = model.get_base_model().config.model_type
        in_run = getattr(model.get_base_model(), BASE_IN_RUN, None)
        if in_run:
            return ModelSummary(role, kind, f"`{in_run}/` in the run folder: `{name}` after this run's warm-up",
                                None if not name or os.path.isdir(name) else hub_name(name))
        if not name or name.startswith("tiny:"):
            return ModelSummary(role, kind, f"`{saved_base_dir}/` (a {arch} built from a config, saved with the run)",
                                None)
    else:
        kind = f"full model ({model.config.model_type}, {model.num_parameters():,} parameters)"
        name, arch = model.name_or_path, model.config.model_type
        if not name:
            return ModelSummary(role, kind, f"none: a {arch} built from a config and trained from random weights",
                                None)
    if os.path.isdir(name):
        return ModelSummary(role, kind, f"`{name}` (local folder)", None)
    if name in PACKAGED_MODELS:
        spec = PACKAGED_MODELS[name]
        return ModelSummary(role, kind, f"`{name}`: [{spec.hub_id}](https://huggingface.co/{spec.hub_id}) as the "
                            f"4-bit GGUF of `{spec.requirement}`, de-quantised", spec.hub_id)
    return ModelSummary(role, kind, f"[{name}](https://huggingface.co/{name})", name)


def hub_name(name: str) -> str:
    """The Hub id behind a model name: a packaged model's original, else the name itself."""
    return PACKAGED_MODELS[name].hub_id if name in PACKAGED_MODELS else name


def recipe_settings(args, global_step: int) -> dict[str, Any]:
    """The training settings that define a DRO run (``args`` is the run's DROConfig)."""
    return {
        "estimator": args.estimator,
        # what the reward estimators train on (dro and dro_baseline only log them)
        "reward_funcs": ", ".join(args.reward_funcs),
        "reward_weights": ", ".join(map(str, args.reward_weights)) if args.reward_weights else "1 each",
        "importance_logits": args.importance_logits,
        "num_generations (m, rankings per question)": args.num_generations,
        "generator_update": args.generator_update,
        "learning_rate (selector)": args.learning_rate,
        "generator_learning_rate": args.generator_learning_rate,
        "generator_loss_coef": args.generator_loss_coef,
        "per_device_train_batch_size (rankings)": args.per_device_train_batch_size,
        "gradient_accumulation_steps": args.gradient_accumulation_steps,
        "temperature": args.temperature,
        "sample_without_replacement": args.sample_without_replacement,
        "shuffle_candidates": args.shuffle_candidates,
        "entropy_coef": args.entropy_coef,
        "lr_scheduler_type": getattr(args.lr_scheduler_type, "value", args.lr_scheduler_type),
        "freeze_selector": args.freeze_selector,
        "share_base_model": args.share_base_model,
        "seed": args.seed,
        "steps trained": global_step,
    }


def describe_data(dataset_name: str | None, num_questions: int, skipped: int) -> str:
    """The card's training-data paragraph."""
    return (
        (f"`{dataset_name}`" if dataset_name else "An in-memory dataset") + f": {num_questions:,} training questions"
        + (f" ({skipped} malformed rows skipped)" if skipped else "")
        + ", each with its candidate passages in first-stage retrieval order. Gold passage labels, where present, "
        "were used only to log support recall, never to train the selector."
    )


def read_report(folder: str) -> dict | None:
    """The run's report.json when it is one the recipe wrote (a table of rows); a file of another shape or no JSON at
    all, e.g. one a user left there or edited, is not the card's to show (and must not stop the final save)."""
    path = os.path.join(folder, "report.json")
    if not os.path.exists(path):
        return None
    try:
        report = read_json(path)
    except ValueError:  # JSONDecodeError and UnicodeDecodeError
        return None
    return report if isinstance(report, dict) and isinstance(report.get("rows"), dict) else None


def _versions() -> dict[str, str]:
    def get(package: str) -> str:
        try:
            return version(package)
        except PackageNotFoundError:
            return "not installed"

    return {f"{key}_version": get(package) for key, package in (
        ("dro_rl", "dro-rl"), ("trl", "trl"), ("transformers", "transformers"), ("peft", "peft"), ("pytorch", "torch"),
    )}


def render(
    model_name: str, model_id: str, models: list[ModelSummary], shared_base: bool, pipeline: PipelineConfig,
    recipe: dict[str, Any], data: str, example: dict, report: dict | None, tags: list[str],
    dataset_name: str | None = None,
) -> ModelCard:
    """The card; ``example`` is a row (question, passages) shown in the quick start, ``report`` the run's report."""
    hub_bases = sorted({m.hub_base for m in models if m.hub_base})
    card_data = ModelCardData(
        base_model=hub_bases or None, datasets=dataset_name if dataset_name and "/" in dataset_name else None,
        library_name="transformers", model_name=model_name, tags=sorted({"dro", "rag", "trl", *tags}),
    )
    passages = [" ".join(passage_text(p).split()[:EXAMPLE_WORDS]) for p in example["passages"]]
    return ModelCard.from_template(
        card_data, template_path=TEMPLATE, model_name=model_name, model_id=model_id, models=models,
        shared_base=shared_base, pipeline=pipeline, pipeline_settings=pipeline.pipeline_dict(), recipe=recipe,
        data=data, example_question=json.dumps(example["question"], ensure_ascii=False),
        example_passages=[json.dumps(p, ensure_ascii=False) for p in passages],
        results=format_table(report) if report else None, num_eval=(report or {}).get("num_eval_questions"),
        dro_citation=DRO_CITATION, **_versions(),
    )
