"""Tiny DRO runs, trained for a step and saved with ``DROTrainer.save_model``, in each layout a run folder can hold."""

import os

from conftest import make_model
from datasets import Dataset, DatasetInfo
from peft import LoraConfig
from tiny_run import COLUMNS, tiny_config
from transformers import AutoModelForCausalLM

from dro_rl import DROTrainer
from dro_rl.pipeline import retrieval_order
from dro_rl.retrieval import BM25Retriever

LAYOUTS = ("full", "lora", "shared", "named_lora")


def lora() -> LoraConfig:
    # init_lora_weights=False: the adapters change the outputs from the start, so a load that drops them shows
    return LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM",
                      init_lora_weights=False)


def ranked(rows):
    """The rows in BM25 order, the run's first-stage retriever here (fast, no model to load)."""
    return retrieval_order(rows, BM25Retriever())


def train_and_save(out, rows, tok, layout: str = "full", eval_rows=None, save: bool = True, **overrides) -> DROTrainer:
    """Train one DRO step on ``rows`` (BM25-ordered) in ``layout`` and save the run into ``out``."""
    settings = dict(max_steps=1, retriever="bm25", top_n=4, max_answer_tokens=4, share_base_model=layout == "shared")
    args = tiny_config(str(out), **{**settings, **overrides})
    data = Dataset.from_list([{k: r[k] for k in COLUMNS} for r in ranked(rows)],
                             info=DatasetInfo(dataset_name="demo-world"))
    models = dict(model=make_model(tok, seed=0), generator=make_model(tok, seed=1))
    if layout in ("lora", "named_lora"):
        models.update(peft_config=lora(), generator_peft_config=lora())
    if layout == "named_lora":  # a base with a name (a local folder) is named in the adapter config, not copied
        base = os.path.join(str(out) + "-base")
        make_model(tok, seed=0).save_pretrained(base)
        tok.save_pretrained(base)
        models["model"] = AutoModelForCausalLM.from_pretrained(base)
    if layout == "shared":
        models = dict(model=make_model(tok, seed=0), peft_config=lora())
    eval_data = None
    if eval_rows is not None:
        eval_data = Dataset.from_list([{k: r[k] for k in COLUMNS} for r in ranked(eval_rows)])
    trainer = DROTrainer(args=args, train_dataset=data, eval_dataset=eval_data, processing_class=tok,
                         generator_processing_class=tok, **models)
    trainer.train()
    if save:
        trainer.save_model()
    return trainer


_RUNS: dict = {}


def lazy_runs(tmp_path_factory, demo_rows, tok):
    """layout -> (run folder, trainer), trained on 16 demo questions (the other 8 held out for evaluation) and saved
    once per test session, when first asked for; tests may add files but must not change the models."""

    def get(layout):
        if layout not in _RUNS:
            out = tmp_path_factory.mktemp(layout) / "run"
            _RUNS[layout] = out, train_and_save(out, demo_rows[:16], tok, layout, eval_rows=demo_rows[16:])
        return _RUNS[layout]

    return get
