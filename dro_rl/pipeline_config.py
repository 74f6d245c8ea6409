"""``PipelineConfig``: every setting that defines what the selector and the generator read, in one object.

K, the passage budgets and prompt caps, the id layout, the chat template, the first-stage retriever and the answer
length decide the exact token ids the two models see. Training, warm-up, evaluation and prediction all build their
prompts from this one object: ``DROConfig`` inherits it, the warm-up and evaluation scripts parse it, and every save
writes it as ``pipeline.json`` beside ``selector/`` and ``generator/`` so that a run folder is read back with the
settings it was trained with — never re-typed as flags.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field, fields
from typing import Any, Literal

from .files import write_json
from .generator import GeneratorPrompt
from .retrieval import DEFAULT_DENSE_MODEL
from .selector import SelectorPrompt

PIPELINE_FILE = "pipeline.json"
RETRIEVERS = ("dense", "bm25", "none")


@dataclass
class PipelineConfig:
    """The prompts, K and first-stage retriever of a retrieve -> select -> generate pipeline."""

    num_docs_selected: int = field(default=5, metadata={"help": "K, the passages the selector picks (paper: 5)."})
    max_passage_tokens: int = field(
        default=128,
        metadata={"help": "Token budget of each candidate in the selector prompt, so all N candidates always fit."},
    )
    max_prompt_length: int | None = field(
        default=None,
        metadata={"help": "Cap on the selector prompt in tokens; the per-passage budget shrinks to fit all N."},
    )
    generator_max_passage_tokens: int = field(
        default=128, metadata={"help": "Token budget of each selected passage in the generator prompt."}
    )
    generator_max_prompt_length: int | None = field(
        default=None, metadata={"help": "Cap on the generator prompt in tokens; passages shrink to fit all K."}
    )
    repeat_ids: bool = field(
        default=False,
        metadata={"help": "Also write each passage's id after it (`[3] text [3]`); helps small models bind ids."},
    )
    use_chat_template: bool = field(
        default=True,
        metadata={"help": "Wrap selector and generator prompts in the tokenizer's chat template when it has one."},
    )
    max_answer_tokens: int = field(
        default=32,
        metadata={"help": "Longest greedy answer (evaluation, prediction, and the answer_em / answer_f1 rewards)."},
    )
    retriever: Literal["dense", "bm25", "none"] = field(
        default="dense",
        metadata={"help": "First-stage retriever that orders each question's candidates (and searches a corpus): "
                  "`dense` (sentence-transformers), `bm25`, or `none` to keep the order the data file gives."},
    )
    retriever_model: str = field(
        default=DEFAULT_DENSE_MODEL,
        metadata={"help": "sentence-transformers model name or path of the dense retriever."},
    )
    top_n: int = field(default=20, metadata={"help": "Candidates retrieved per question from a corpus (N)."})

    def check_pipeline(self) -> None:
        """Refuse values no pipeline can honour, with the field's name."""
        for name in ("num_docs_selected", "max_passage_tokens", "generator_max_passage_tokens", "max_answer_tokens",
                     "top_n"):
            check_positive_int(name, getattr(self, name))
        for name in ("max_prompt_length", "generator_max_prompt_length"):
            if getattr(self, name) is not None:
                check_positive_int(name, getattr(self, name))
        for name in ("repeat_ids", "use_chat_template"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be true or false, got {getattr(self, name)!r}")
        if self.retriever not in RETRIEVERS:
            raise ValueError(f"retriever={self.retriever!r} is not one of {RETRIEVERS}")

    # ---- what the settings build ------------------------------------------------------------------------------

    def selector_prompt(self) -> SelectorPrompt:
        return SelectorPrompt(self.num_docs_selected, self.max_passage_tokens, self.use_chat_template,
                              self.repeat_ids, self.max_prompt_length)

    def generator_prompt(self) -> GeneratorPrompt:
        return GeneratorPrompt(self.generator_max_passage_tokens, self.use_chat_template,
                               self.generator_max_prompt_length)

    # ---- saved with every run -----------------------------------------------------------------------------------

    def pipeline_dict(self) -> dict[str, Any]:
        """Only the pipeline's own fields (a DROConfig holds many more)."""
        return {f.name: getattr(self, f.name) for f in fields(PipelineConfig)}

    def save_pipeline(self, folder: str) -> str:
        """Write ``pipeline.json`` into ``folder`` (atomically) and return its path."""
        path = os.path.join(folder, PIPELINE_FILE)
        write_json(self.pipeline_dict(), path)
        return path

    @classmethod
    def from_dict(cls, values: dict[str, Any], source: str = "settings") -> PipelineConfig:
        known = {f.name for f in fields(PipelineConfig)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"{source}: unknown pipeline settings {unknown}")
        config = PipelineConfig(**values)
        config.check_pipeline()
        return config

    @classmethod
    def load_pipeline(cls, folder: str) -> PipelineConfig:
        """The settings saved in a run or checkpoint folder."""
        path = os.path.join(folder, PIPELINE_FILE)
        if not os.path.exists(path):
            raise FileNotFoundError(f"{path} not found: {folder} is not a dro-rl run or checkpoint folder")
        try:
            with open(path) as f:
                values = json.load(f)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path} is not valid JSON ({err.msg}); the save was interrupted?") from err
        return cls.from_dict(values, path)

    def pipeline_differences(self, other: PipelineConfig) -> list[str]:
        """``name: ours != theirs`` for every pipeline field that differs."""
        mine, theirs = self.pipeline_dict(), other.pipeline_dict()
        return [f"{k}: {mine[k]!r} != {theirs[k]!r}" for k in mine if mine[k] != theirs[k]]


def check_positive_int(name: str, value: Any) -> None:
    """Refuse ``value`` unless it is an integer >= 1, naming the setting."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an integer, got {value!r} ({type(value).__name__})")
    if value < 1:
        raise ValueError(f"{name} must be >= 1, got {value}")
